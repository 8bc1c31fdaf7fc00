"""Evaluate a ViT checkpoint on VTAB-1k with Ray Tune (Zhai et al. 2019; ViT paper App. B.1.1).

    python eval/vtab.py --checkpoint ~/vit-runs/demo/step_00000150 --data /data/vtab-1k
    ray job submit --working-dir . -- python eval/vtab.py --checkpoint s3://bucket/ckpt \\
        --data s3://bucket/vtab-1k --gpus-per-trial 0.25

The ViT paper's fine-tuning (App. B.1.1) under a learning-rate sweep: for each task and
learning rate, fine-tune on train800 and score val200; keep the one rate best on average
(`--protocol vit`; the paper chose its one setting so, from 2 learning rates x 2 schedules)
or each task's best (`--protocol per-task`); retrain on train800val200 and report top-1 on
test. `--protocol paper` runs the setting the paper chose (lr 0.01, 2500 steps, 3 seeds).
Fine-tuning drops the whole head for one zero-initialised linear layer and uses SGD momentum
0.9, batch 512, warmup + cosine decay, no weight decay, clipping at norm 1, position
embeddings resampled to the resolution, bf16 on GPU. Defaults follow the paper (384 px, 2500
steps, batch 512); the learning rates {0.001, 0.003, 0.01, 0.03} are the sweep of vit_jax's
AugReg notebook.

The config (eval/config.py) has sections finetune, sweep, data and run: a preset or --config
FILE, then --set section.key=value, then the options below, each a shorthand of one key
(named in its help); --show-config prints the result.

The checkpoint can be ours (a `jobs/pretrain.py` checkpoint), Hugging Face, timm or the
authors' .npz. --data is a folder or s3:// prefix holding the VTAB-1k layout
(<task>/{train800,val200,train800val200,test}.txt + images/) or, per task, shards written by
`jobs/make_shards.py vtab`. The same command after an interruption resumes: finished trials
are kept. Results: a table here, vtab.{txt,csv,json,png} in the output folder, and an MLflow
parent run (experiment "vtab") with one nested run per task; MLFLOW_TRACKING_URI chooses the
server (default: the local store that pretraining uses).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

from pipeline import cli, interrupt, timeline

interrupt.install()   # before the heavy imports: a Ctrl-C while they load ends quietly too

from eval.config import DEFAULT_STORAGE, PRESETS, VtabConfig, absolute_paths  # noqa: E402
from eval.report import REFERENCE  # noqa: E402
from pipeline.config import (  # noqa: E402
    BadValue,
    apply_overrides,
    hint_of,
    load_config,
    parse_value,
)

# The flags that are shorthands of --set: `--steps 500` is `--set finetune.steps=500`.
# (flag, config key, metavar, help)
FLAGS = (
    ("--checkpoint", "run.checkpoint", "URI",
     "the ViT to evaluate: a checkpoint folder or s3:// prefix (ours or Hugging Face), a "
     "timm / Hugging Face state dict, the authors' .npz, or a pretraining run's folder (its "
     "newest checkpoint); required unless --config names one"),
    ("--data", "data.uri", "ROOT",
     "VTAB-1k root, local or s3:// (default: $VTAB_DATA or ~/vtab-1k)"),
    ("--tasks", "sweep.tasks", None,
     "all, natural, specialized, structured, or comma-separated task names (default: all 19)"),
    ("--resolution", "finetune.resolution", None,
     "fine-tuning resolution (default: 384, the paper's); where it is not a multiple of the "
     "patch size, the last pixels go unused, as in vit_jax (H/14 at 384: 27 x 27 patches)"),
    ("--lrs", "sweep.lrs", None,
     "learning rates to select from on val200 (default: 0.001,0.003,0.01,0.03; one value "
     "skips the selection; protocol paper: 0.01)"),
    ("--steps", "finetune.steps", None, "fine-tuning steps (default: 2500)"),
    ("--warmup-steps", "finetune.warmup_steps", None,
     "linear warmup steps (default: min(500, steps / 5), vit_jax's 500 of 2500)"),
    ("--batch-size", "finetune.batch_size", None, "images per optimizer step (default: 512)"),
    ("--micro-batch-size", "finetune.micro_batch_size", None,
     "images per forward pass, accumulated to the batch (default: the whole batch on GPU, "
     "halved until it fits; 32 on CPU)"),
    ("--seeds", "sweep.seeds", None,
     "final runs per task, reported as mean and std (default: 1; protocol paper: 3, as the "
     "paper)"),
    ("--protocol", "sweep.protocol", None,
     "paper: lr 0.01, 2500 steps, mean of 3 seeds, no sweep (as ViT Table 9; the default with "
     "--reference); vit: the learning-rate sweep, one rate for all tasks, best on average (the "
     "default otherwise); per-task: each task's best rate"),
    ("--dropout", "finetune.dropout", None,
     "dropout while fine-tuning (default: vit_jax's value for the checkpoint: 0 for AugReg "
     "ones, else 0.1 for L/16, H/14 and R50+B/16 and 0 for the others)"),
    ("--gpus-per-trial", "sweep.gpus_per_trial", None,
     "GPU fraction per trial; small tasks pack onto one device (default: 0.25; ignored where "
     "the cluster has no GPU)"),
    ("--cpus-per-trial", "sweep.cpus_per_trial", None, "CPUs per trial (default: 1)"),
    ("--max-concurrent-trials", "sweep.max_concurrent_trials", None,
     "cap on trials at once (default: as many as resources allow)"),
    ("--name", "run.name", None,
     "evaluation name (default: derived from the checkpoint and settings, so the same command "
     "resumes)"),
    ("--out", "run.storage", "URI",
     f"where trials and reports go, a folder or s3:// prefix, the evaluation in "
     f"<out>/<name> (default: {DEFAULT_STORAGE})"),
)


def _checked(flag: str, key: str):
    """argparse's `type` for a flag: the text as given (it becomes `--set key=text`), once
    it parses as the key's type."""
    hint = hint_of(VtabConfig, key)

    def check(raw: str) -> str:
        try:
            parse_value(raw, hint, key)
        except BadValue as err:
            raise argparse.ArgumentTypeError(f"{err.reason}, got {err.raw!r} ({key})") \
                from None
        return raw

    check.__name__ = flag.lstrip("-")    # argparse names the type in some messages
    return check


def parse_args(argv=None):
    ap = cli.parser(__doc__, prog="vit-vtab")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="the evaluation config to start from: vit (the learning-rate sweep; "
                         "the default), per-task, paper (lr 0.01, 2500 steps, 3 seeds; the "
                         "default with --reference), demo (small and fast); documented in "
                         "eval/config.py; --set and the options below change it")
    ap.add_argument("--config", metavar="FILE",
                    help="start from a resolved configuration instead of a preset (JSON, as "
                         "--show-config prints and MLflow keeps as config.json, also the flat "
                         "one of earlier releases; a local path or s3://)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="set any key of the evaluation config, e.g. "
                                              "finetune.steps=500 (repeatable; sections "
                                              "finetune, sweep, data, run; --show-config "
                                              "lists the keys)")
    ap.add_argument("--show-config", action="store_true",
                    help="print the resolved evaluation config and exit")
    for flag, key, metavar, text in FLAGS:
        hint = hint_of(VtabConfig, key)
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        ap.add_argument(flag, type=_checked(flag, key), metavar=metavar, choices=choices,
                        help=f"{text} [{key}]")
    ap.add_argument("--reference", choices=sorted(REFERENCE),
                    help="print ViT Table 9's numbers for this model beside ours")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or a local "
                                      "Ray started on demand)")
    cli.add_common(ap)
    cli.deprecated(ap, "--storage", "--out")
    return ap.parse_args(argv)


def _flag_sets(args) -> list[str]:
    """The flags given, as the `--set` items they stand for."""
    sets = []
    for flag, key, _, _ in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            sets.append(f"{key}={value}")
    return sets


def config_from(args) -> VtabConfig:
    """One mechanism, pretraining's: a starting config (--config FILE or a preset), then
    --set and the flags (shorthands of --set, after it), all at once. Without --preset or
    --config: `paper` where --reference compares with Table 9 and the command does not
    choose the sweep itself (any other protocol is then named beside the reference numbers),
    the preset of --protocol where given, else `vit`."""
    if args.config and args.preset:
        raise ValueError("--config and --preset both name a starting configuration; give one")
    sets = [*args.overrides, *_flag_sets(args)]
    if args.config:
        cfg = load_config(VtabConfig, args.config)
    else:
        keys = {VtabConfig.ALIASES.get(k, k) for k in
                (item.split("=", 1)[0].strip() for item in sets)}
        chosen = keys & {"sweep.lrs", "finetune.steps", "sweep.seeds", "sweep.protocol"}
        preset = args.preset or args.protocol or (
            "paper" if args.reference and not chosen else "vit")
        cfg = PRESETS[preset]()
    cfg = apply_overrides(cfg, sets)
    if not cfg.data.uri:
        cfg = cfg.updated({"data.uri": os.environ.get("VTAB_DATA", "~/vtab-1k")})
    if not cfg.run.checkpoint:
        raise ValueError("no checkpoint to evaluate: give --checkpoint (or run.checkpoint in "
                         "--config)")
    return absolute_paths(cfg)


def main(argv=None) -> int:
    """The command; Ctrl-C or SIGTERM stop it cleanly (exit 130 / 143, finished trials kept;
    see pipeline.interrupt)."""
    return interrupt.run(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    # This command says where the runs are; MLflow need not print a URL per run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        cfg = config_from(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.show_config:
        print(cfg.to_json())
        return 0
    from pipeline.storage import check_filled_in

    try:   # the cluster files' placeholders, refused before anything starts
        for value, what in ((cfg.run.checkpoint, "--checkpoint"), (cfg.data.uri, "--data"),
                            (cfg.run.storage, "--out")):
            check_filled_in(value, what)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from eval.evaluate import evaluate
    from eval.report import table

    timeline.mark("driver.imports")

    cli.configure_logging(args.log_level)
    try:
        doc, where = evaluate(cfg, reference=args.reference, address=args.address,
                              mlflow=not args.no_mlflow)
    except Exception as err:  # noqa: BLE001 - every failure ends in one line and exit != 0
        from eval.evaluate import USER_ERRORS

        if interrupt.received():    # a signal Ray's C++ code turned into another error
            raise interrupt.Interrupted(interrupt.received()) from None

        if isinstance(err, USER_ERRORS):
            print(f"error: {err}", file=sys.stderr)
            return cli.BAD_INPUT
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        print(f"error: evaluation failed: {lines[-1] if lines else type(err).__name__}",
              file=sys.stderr)
        return cli.FAILED
    print()
    print(table(doc))
    print()
    for line in where:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
