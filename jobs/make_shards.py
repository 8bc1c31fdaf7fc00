"""Write WebDataset shards (+ manifest) from an image folder, a VTAB-1k task or a synthetic set,
or index shards that exist already.

    vit-shards folder --data /data/imagenet/train --out s3://bucket/imagenet --resize-short 256
    vit-shards vtab --data /data/vtab-1k/cifar --out s3://bucket/vtab/cifar
    vit-shards synthetic --out runs/demo-shards --num-samples 2048 --num-classes 10
    vit-shards index --data "s3://bucket/imagenet-train-{000000..001281}.tar" --split train
    vit-shards index --data "s3://public/in1k-val-{0000..0049}.tar" --out /data/in1k --split val

`index` reads shards written elsewhere (a brace pattern, one tar, or a folder/prefix of tars;
`jpg`+`cls`/`json` members; multi-label `cls` lists or `labels` in `json`) once, counts their
samples, and writes manifest.json to --out (default: the shards' folder), adding the split to
what is there. The shards are not rewritten; train with --data OUT.

OUT is a local folder or s3://bucket/prefix (any S3 endpoint through AWS_ENDPOINT_URL),
checked before any image is read. Every image is decoded while writing: a file that is not a
decodable image is skipped, logged with its full path and listed in the manifest (--strict:
an error naming it). Re-running the same command resumes an interrupted write: identical
shards already at OUT are kept; the manifest is written last.

folder: labels number the class folders in sorted name order; a class folder without images
is skipped with a warning naming it (it is not a class), as are files at DATA's top level; a
symlink to a folder is a class.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cli
from pipeline.data import shards
from pipeline.storage import StorageError


def parse_args(argv=None):
    ap = cli.parser(__doc__, prog="vit-shards")
    ap.add_argument("kind", choices=["folder", "vtab", "synthetic", "index"],
                    help="folder: DATA/<class>/<image>; vtab: one VTAB-1k task folder (keeps "
                         "train800/val200/train800val200/test); synthetic: procedural images "
                         "(no --data); index: --data names existing shards")
    ap.add_argument("--data", metavar="URI",
                    help="what to read: an image folder, a VTAB-1k task folder, or (index) "
                         "shards: a .tar, a brace pattern, a folder or prefix of them")
    ap.add_argument("--out", metavar="URI",
                    help="where the shards and manifest.json go: a local folder or "
                         "s3://bucket/prefix (index: where manifest.json goes; default: the "
                         "shards' folder)")
    # The spelling before 0.2: `vit-shards KIND SRC [DST]`.
    ap.add_argument("old_data", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("old_out", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--split", default="train", help="split name for a folder source or an "
                                                     "index (default: train)")
    ap.add_argument("--shard-size-mb", type=float, default=256.0,
                    help="target shard size in MB (default: 256)")
    ap.add_argument("--resize-short", type=int, default=None,
                    help="resize the short side to this many pixels before writing (JPEG "
                         "q95); pre-resized shards decode several times faster")
    ap.add_argument("--shuffle-seed", type=int, default=0,
                    help="shuffle samples with this seed before sharding (default: 0)")
    ap.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="vtab: the task's class count (default: max label + 1); "
                         "synthetic: number of classes (default: 10)")
    ap.add_argument("--num-samples", type=int, default=2048, help="synthetic: samples")
    ap.add_argument("--image-size", type=int, default=64, help="synthetic: image side")
    ap.add_argument("--val-fraction", type=float, default=0.1,
                    help="synthetic: fraction written as the 'val' split (default: 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes that decode and verify images (default: every core); "
                         "index: shards read at once (default: 16)")
    ap.add_argument("--strict", action="store_true",
                    help="stop at the first file that is not a decodable image (or has a label "
                         "out of range), naming it; default: skip it, log it and list it in "
                         "the manifest")
    cli.add_common(ap, mlflow=False)
    args = ap.parse_args(argv)
    if args.old_data == "-" and args.kind == "synthetic":
        args.old_data = None            # the old placeholder for "no source"
    cli.positional_deprecated(args, {"old_data": "data", "old_out": "out"})
    return args


def main(argv=None) -> int:
    """The command; Ctrl-C or SIGTERM stop it cleanly (exit 130 / 143): shards already
    written stay (the same command skips identical ones), no partial file and no manifest
    are left (see pipeline.interrupt)."""
    from pipeline import interrupt

    return interrupt.run(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    cli.configure_logging(args.log_level)
    missing = ("--data (what to read)" if args.data is None and args.kind != "synthetic" else
               "--out (a folder or s3://bucket/prefix)" if args.out is None and
               args.kind != "index" else None)
    if missing:
        print(f"error: {args.kind} needs {missing}", file=sys.stderr)
        return cli.BAD_INPUT
    from pipeline import interrupt

    try:
        if args.kind == "index":
            from pipeline.data.index import index_shards

            index_shards(args.data, args.split, args.out, args.num_classes, args.workers or 16)
            return 0
        if args.out is not None:
            shards.check_destination(args.out)
        if args.kind == "folder":
            source = shards.image_folder(args.data, split=args.split,
                                         log=lambda m: print(m, file=sys.stderr))
        elif args.kind == "vtab":
            source = shards.vtab_folder(args.data, num_classes=args.num_classes)
        else:
            source = shards.grating_images(args.num_samples, args.num_classes or 10,
                                           args.image_size, seed=args.seed,
                                           val_fraction=args.val_fraction)
        options = shards.ShardOptions(shard_size_mb=args.shard_size_mb,
                                      resize_short=args.resize_short,
                                      shuffle_seed=None if args.no_shuffle else args.shuffle_seed)
        try:
            manifest = shards.write_shards(source, args.out, options, workers=args.workers,
                                           strict=args.strict)
        except interrupt.Interrupted as stop:
            raise interrupt.Interrupted(stop.signum, (
                f"shard writing stopped; the shards written so far stay at {args.out} and "
                f"the same command skips them (no manifest.json until it completes)")) from None
    except (shards.DatasetError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT
    for split, info in manifest["splits"].items():
        skipped = f", {info['num_skipped']} skipped" if info.get("num_skipped") else ""
        print(f"  {split:<16} {info['num_samples']:>9} samples in {len(info['shards'])} shards"
              f"{skipped}")
    print(f"  classes: {manifest['num_classes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
