"""Inspect a ViT checkpoint as the paper does (§4.5, Fig. 6 and 7): mean attention distance
per layer and head, attention rollout, position-embedding similarity, embedding filters.

    vit-analyze --checkpoint ~/vit-runs/smoke --data ~/vit-runs/demo/shards
    vit-analyze --checkpoint s3://bucket/runs/vit-b16/step_00312000 \\
        --data /data/vtab-1k/eurosat --num-images 256 --resolution 384

CHECKPOINT is anything `load_vit` reads: our checkpoints (a step folder, or a run folder for
its newest), Hugging Face or timm directories, the authors' .npz, hf://org/name.
DATA, local or s3://: a dataset folder with manifest.json, WebDataset shards (a .tar, a brace
pattern, a folder of them), a VTAB-1k task folder (--split, default test), or a folder of
.jpg / .png images. Images are resized to the model's resolution (or --resolution, with the
position embedding resampled) and normalised as the checkpoint expects.

Writes to --out (default ~/vit-runs/analysis/<model>): attention.json, attention_distance.png,
attention_rollout.png, position_embedding_similarity.png, embedding_filters.png; and logs
them to MLflow (MLFLOW_TRACKING_URI, default the local store ~/vit-runs/mlflow.db) as a run of
experiment `analysis`, tagged with the checkpoint's pretraining run (pretrain_run_id).
Plain PyTorch: no Ray. On a GPU the forward runs in bf16, the measures in fp32.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("jobs.analyze")


def parse_args(argv=None):
    from pipeline import cli

    ap = cli.parser(__doc__, prog="vit-analyze")
    ap.add_argument("--checkpoint", required=True, metavar="URI",
                    help="the model (any format load_vit reads)")
    ap.add_argument("--data", required=True, metavar="URI",
                    help="shards, a dataset or VTAB-1k task folder, or a folder of images")
    ap.add_argument("--split", help="split of a dataset or VTAB-1k task (default: train for a "
                                    "dataset, test for a VTAB-1k task)")
    ap.add_argument("--num-images", type=int, default=128, help="images to average over")
    ap.add_argument("--resolution", type=int,
                    help="input size (default: the checkpoint's); the position embedding is "
                         "resampled")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    ap.add_argument("--rollout-images", type=int, default=6,
                    help="images drawn with their attention rollout")
    ap.add_argument("--out", metavar="URI", help="output folder or s3:// prefix (default "
                                                 "~/vit-runs/analysis/<model>)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    cli.add_common(ap)
    cli.deprecated(ap, "--images", "--data")
    args = ap.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.rollout_images < 0:
        ap.error("--rollout-images must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline import cli

    cli.configure_logging(args.log_level)
    from pipeline.analysis import AnalysisError
    from pipeline.data.shards import DatasetError
    from pipeline.storage import StorageError
    from pipeline.weights import CheckpointError

    try:
        return run(args)
    except (AnalysisError, CheckpointError, DatasetError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT


def run(args) -> int:
    import torch

    from eval.trial import model_label
    from pipeline import analysis, storage
    from pipeline.cli import clock
    from pipeline.weights import load_vit, read_metadata, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_vit(checkpoint)
    cfg = model.cfg
    # What the weights hold, at the resolution they were trained at: the learned position
    # embedding (not a resampled one) and the patch-embedding filters.
    pos_similarity = analysis.pos_embed_similarity(model.pos_embed.detach(),
                                                   cfg.num_prefix_tokens)
    components = analysis.embedding_components(model.pixel_filters())
    if args.resolution and args.resolution != cfg.image_size:
        if args.resolution < cfg.effective_patch_size:
            raise analysis.AnalysisError(f"--resolution {args.resolution} is smaller than the "
                                         f"patch size {cfg.effective_patch_size}")
        model.set_image_size(args.resolution)
    size = model.cfg.image_size
    label = model_label(checkpoint)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda"
    source, items = analysis.image_source(args.data, args.split)
    variant = cfg.variant or (f"{'R+' if cfg.is_hybrid else ''}{cfg.depth}x{cfg.hidden_size}"
                              f"/{cfg.effective_patch_size}")
    print(f"Inspecting {checkpoint}\n  ViT {variant}, {cfg.pool} pooling, {size} px "
          f"({model.cfg.grid_size}x{model.cfg.grid_size} "
          f"{'feature-map cells' if cfg.is_hybrid else 'patches'}), on {device}"
          f"{' in bf16' if bf16 else ''}\n  images: {source}, up to {args.num_images}",
          flush=True)

    start, last = time.monotonic(), [0.0]

    def progress(done: int) -> None:
        now = time.monotonic() - start
        if done >= args.num_images or now - last[0] >= 2.0:
            last[0] = now
            left = (args.num_images - done) * now / done
            print(f"  {done}/{args.num_images} images, {clock(now)} elapsed"
                  + (f", ~{clock(left)} left" if done < args.num_images else ""), flush=True)

    result = analysis.analyze(
        model, analysis.image_batches(items, size, args.num_images, args.batch_size),
        device=device, bf16=bf16, keep=args.rollout_images, progress=progress)
    if result.num_images < args.num_images:
        print(f"  (the source has only {result.num_images} images)")

    meta = read_metadata(checkpoint)
    doc_meta = {"checkpoint": checkpoint, "images": source, "model": label,
                "variant": cfg.variant, "trained_image_size": cfg.image_size}
    out = args.out or str(Path("~/vit-runs/analysis").expanduser() / label)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if storage.is_s3(out) else Path(out).expanduser()
        files = analysis.write(result, pos_similarity, components, local, doc_meta,
                               title=f"{label} ({variant}, {size} px)")
        if storage.is_s3(out):
            for path in files.values():
                storage.upload_file(path, storage.join(out, path.name))
        print()
        print(analysis.layer_table(result))
        print(f"\nWritten to {out}:")
        for path in files.values():
            print(f"  {path.name}")
        if not args.no_mlflow:
            log_to_mlflow(args, result, meta, checkpoint, source, label, files)
    return 0


def log_to_mlflow(args, result, meta: dict, checkpoint: str, source: str, label: str,
                  files: dict) -> None:
    from pipeline import tracking

    uri = tracking.default_tracking_uri()
    tags = {"checkpoint": checkpoint,
            "mlflow.note.content": f"Inspection (ViT paper §4.5) of {checkpoint}"}
    tags.update(tracking.pretrain_tags(meta))
    d = result.mean_distance
    metrics = {f"attention_distance/{stat}": [(layer, float(fn(row)))
                                              for layer, row in enumerate(d, 1)]
               for stat, fn in (("min", min), ("mean", lambda r: r.mean()), ("max", max))}
    params = {"checkpoint": checkpoint, "images": source, "split": args.split or "",
              "num_images": result.num_images, "image_size": result.image_size,
              "patch_size": result.patch_size, "pool": result.pool}
    try:
        run_id = tracking.log_analysis(uri, f"analysis-{label}", params, tags, metrics,
                                       list(files.values()))
    except Exception as err:  # noqa: BLE001 - the files are written; tracking is a copy
        log.warning("MLflow unavailable (%s); the files are in the output folder",
                    tracking.redact(str(err).splitlines()[0][:160]) if str(err)
                    else type(err).__name__)
        return
    link = f", linked to pretraining run {meta['mlflow_run_id']}" \
        if meta.get("mlflow_run_id") else ""
    print(f"MLflow: run {run_id} in experiment 'analysis'{link}; "
          f"{tracking.how_to_open(uri, run_id)}")


if __name__ == "__main__":
    sys.exit(main())
