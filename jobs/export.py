"""Export a ViT checkpoint for Hugging Face transformers or timm.

    vit-export --checkpoint ~/vit-runs/smoke/step_00000150 --out ~/exports/smoke-hf
    vit-export --checkpoint s3://bucket/runs/vit-b16/step_00312000 \\
        --out s3://bucket/exports/b16-timm --format timm

CHECKPOINT is anything `load_vit` reads: our checkpoints (a step directory or a run folder's
latest), Hugging Face or timm directories, the authors' .npz, or hf://org/name. OUT is a local
folder or s3:// prefix.

  hf    config.json + model.safetensors + preprocessor_config.json:
        transformers.ViTForImageClassification.from_pretrained(OUT) (ViTModel when the model
        has the tanh pre-logits layer, which becomes the pooler)
  timm  config.json (architecture, model_args, pretrained_cfg) + model.safetensors with the
        names of timm's VisionTransformer: timm.create_model("local-dir:OUT", pretrained=True)
        (or "hf-hub:org/name" once uploaded), with our class count and logits

It prints the Python that loads the export, as the tests run it.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cli
from pipeline.storage import StorageError
from pipeline.weights import EXPORT_FORMATS, CheckpointError, export_recipe, export_vit


def parse_args(argv=None):
    ap = cli.parser(__doc__, prog="vit-export")
    ap.add_argument("--checkpoint", metavar="URI",
                    help="what to export (any format load_vit reads; required)")
    ap.add_argument("--out", metavar="URI", help="output folder or s3:// prefix (required)")
    ap.add_argument("--format", choices=EXPORT_FORMATS, default="hf",
                    help="hf: for transformers' from_pretrained; timm: for timm.create_model")
    cli.add_common(ap, mlflow=False)
    # The spelling before 0.2: `vit-export CHECKPOINT OUT`.
    ap.add_argument("old_checkpoint", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("old_out", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cli.positional_deprecated(args, {"old_checkpoint": "checkpoint", "old_out": "out"})
    cli.require(ap, args, "checkpoint", "out")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.configure_logging(args.log_level)
    from pipeline.weights import resolve_checkpoint

    try:
        src = resolve_checkpoint(args.checkpoint)
        out = export_vit(src, args.out, args.format)
        recipe = export_recipe(out, args.format)
    except (CheckpointError, StorageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT
    print(f"exported {src} -> {out} ({args.format}); load it with:\n"
          + "".join(f"    {line}\n" for line in recipe.splitlines()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
