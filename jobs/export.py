"""Export a ViT checkpoint for Hugging Face transformers or timm.

    python jobs/export.py ~/vit-runs/smoke/step_00000150 ~/exports/smoke-hf --format hf
    python jobs/export.py s3://bucket/runs/vit-b16/step_00312000 s3://bucket/exports/b16-timm \
        --format timm

CHECKPOINT is anything `load_vit` reads: our checkpoints (a step directory or a run folder's
latest), Hugging Face or timm directories, the authors' .npz, or hf://org/name. OUT is a local
folder or s3:// prefix.

  hf    config.json + model.safetensors + preprocessor_config.json:
        transformers.ViTForImageClassification.from_pretrained(OUT) (ViTModel when the model
        has the tanh pre-logits layer, which becomes the pooler)
  timm  config.json (architecture, model_args, pretrained_cfg) + model.safetensors with the
        names of timm's VisionTransformer
"""

from __future__ import annotations

import argparse
import sys

from pipeline.storage import StorageError
from pipeline.weights import EXPORT_FORMATS, CheckpointError, export_vit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split(
        "\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="what to export (any format load_vit reads)")
    ap.add_argument("out", help="output folder or s3:// prefix")
    ap.add_argument("--format", choices=EXPORT_FORMATS, default="hf")
    args = ap.parse_args(argv)
    from pipeline.weights import resolve_checkpoint

    try:
        src = resolve_checkpoint(args.checkpoint)
        out = export_vit(src, args.out, args.format)
    except (CheckpointError, StorageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    hint = {"hf": "transformers: ViTForImageClassification.from_pretrained(...) (ViTModel "
                  "for a model with pre-logits)",
            "timm": "timm: timm.create_model(<architecture in config.json>, "
                    "pretrained_cfg_overlay=dict(file=.../model.safetensors), **model_args)"}
    print(f"exported {src} -> {out} ({args.format})\n  load it with {hint[args.format]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
