"""Evaluate a ViT checkpoint on VTAB-1k with Ray Tune (Zhai et al. 2019; ViT paper App. B.1.1).

    python eval/vtab.py --checkpoint ~/vit-runs/demo/step_00000150 --data /data/vtab-1k
    ray job submit --working-dir . -- python eval/vtab.py --checkpoint s3://bucket/ckpt \\
        --data s3://bucket/vtab-1k --gpus-per-trial 0.25

The protocol of the ViT paper (App. B.1.1): for each task and learning rate, fine-tune on
train800 and score val200; keep the one rate best on average (`--protocol vit`) or each task's
best (`--protocol per-task`); retrain on train800val200 and report top-1 on test. Fine-tuning
drops the whole head for one zero-initialised linear layer and uses SGD momentum 0.9, batch
512, warmup + cosine decay, no weight decay, clipping at norm 1, position embeddings resampled
to the resolution, bf16 on GPU. Defaults follow the paper: 384 px, 2500 steps, batch 512,
learning rates {0.001, 0.003, 0.01, 0.03} (the sweep of vit_jax's AugReg notebook).

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
import logging
import os
import sys

from pipeline import interrupt

interrupt.install()   # before the heavy imports: a Ctrl-C while they load ends quietly too

from eval.report import REFERENCE  # noqa: E402
from eval.sweep import DEFAULT_STORAGE, PRESETS, PROTOCOLS, SweepConfig, eval_config  # noqa: E402


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, metavar="URI",
                    help="the ViT to evaluate: a checkpoint folder or s3:// prefix (ours or "
                         "Hugging Face), a timm / Hugging Face state dict, the authors' .npz, "
                         "or a pretraining run's folder (its newest checkpoint)")
    ap.add_argument("--data", default=os.environ.get("VTAB_DATA", "~/vtab-1k"),
                    metavar="ROOT", help="VTAB-1k root, local or s3:// (default: $VTAB_DATA or "
                                         "~/vtab-1k)")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="the evaluation config to start from: vit (the learning-rate sweep; "
                         "the default), per-task, paper (lr 0.01, 2500 steps, 3 seeds; the "
                         "default with --reference), demo (small and fast); the options "
                         "below and --set change it")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="set any field of the evaluation config, e.g. "
                                              "steps=500 (repeatable; --show-config lists them)")
    ap.add_argument("--show-config", action="store_true",
                    help="print the resolved evaluation config and exit")
    ap.add_argument("--tasks", default=None,
                    help="all, natural, specialized, structured, or comma-separated task names "
                         "(default: all 19)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="fine-tuning resolution (default: 384, the paper's); where it is not "
                         "a multiple of the patch size, the last pixels go unused, as in "
                         "vit_jax (H/14 at 384: 27 x 27 patches)")
    ap.add_argument("--lrs", type=_floats, default=None,
                    help="learning rates to select from on val200 (default: "
                         "0.001,0.003,0.01,0.03; one value skips the selection; protocol "
                         "paper: 0.01)")
    ap.add_argument("--steps", type=int, default=None,
                    help="fine-tuning steps (default: 2500)")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="linear warmup steps (default: min(500, steps / 5), vit_jax's 500 of "
                         "2500)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per optimizer step (default: 512)")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="images per forward pass, accumulated to the batch (default: the "
                         "whole batch on GPU, halved until it fits; 32 on CPU)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="final runs per task, reported as mean and std (default: 1; protocol "
                         "paper: 3, as the paper)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default=None,
                    help="paper: lr 0.01, 2500 steps, mean of 3 seeds, no sweep (as ViT Table "
                         "9; the default with --reference); vit: the learning-rate sweep, one "
                         "rate for all tasks, best on average (the default otherwise); "
                         "per-task: each task's best rate")
    ap.add_argument("--dropout", type=float, default=None,
                    help="dropout while fine-tuning (default: vit_jax's value for the model: "
                         "0.1 for L/16 and H/14, 0 for the others)")
    ap.add_argument("--gpus-per-trial", type=float, default=None,
                    help="GPU fraction per trial; small tasks pack onto one device (default: "
                         "0.25; ignored where the cluster has no GPU)")
    ap.add_argument("--cpus-per-trial", type=float, default=None,
                    help="CPUs per trial (default: 1)")
    ap.add_argument("--max-concurrent-trials", type=int, default=None,
                    help="cap on trials at once (default: as many as resources allow)")
    ap.add_argument("--reference", choices=sorted(REFERENCE),
                    help="print ViT Table 9's numbers for this model beside ours")
    ap.add_argument("--name", help="evaluation name (default: derived from the checkpoint and "
                                   "settings, so the same command resumes)")
    ap.add_argument("--storage", default=None,
                    help=f"where trials and reports go, a folder or s3:// prefix (default: "
                         f"{DEFAULT_STORAGE})")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or a local "
                                      "Ray started on demand)")
    ap.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    type=str.upper, help="log level (default: VIT_LOG_LEVEL or INFO)")
    return ap.parse_args(argv)


# Flags that are shorthands for --set: (flag attribute, config field).
FLAG_FIELDS = (("tasks", "tasks"), ("resolution", "resolution"), ("lrs", "lrs"),
               ("steps", "steps"), ("warmup_steps", "warmup_steps"),
               ("batch_size", "batch_size"), ("micro_batch_size", "micro_batch_size"),
               ("seeds", "seeds"), ("dropout", "dropout"), ("gpus_per_trial", "gpus_per_trial"),
               ("cpus_per_trial", "cpus_per_trial"),
               ("max_concurrent_trials", "max_concurrent_trials"), ("name", "name"),
               ("storage", "storage"))


def config_from(args) -> SweepConfig:
    """One mechanism: a preset, then --set, then the flags (shorthands for --set). Without
    --preset: `paper` where --reference compares with Table 9 and the command does not choose
    the sweep itself (any other protocol is then named beside the reference numbers), the
    preset of --protocol where given, else `vit`."""
    chosen = any(v is not None for v in (args.lrs, args.steps, args.seeds)) or any(
        o.split("=", 1)[0].strip() in ("lrs", "steps", "seeds", "protocol")
        for o in args.overrides)
    if args.preset:
        preset = args.preset
    elif args.protocol:
        preset = args.protocol
    else:
        preset = "paper" if args.reference and not chosen else "vit"
    sets = list(args.overrides)
    if args.protocol and args.preset:
        sets.append(f"protocol={args.protocol}")
    for attr, key in FLAG_FIELDS:
        value = getattr(args, attr)
        if value is not None:
            sets.append(f"{key}=" + (",".join(f"{v:g}" for v in value)
                                     if isinstance(value, tuple) else str(value)))
    return eval_config(args.checkpoint, args.data, preset, sets)


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
        import dataclasses
        import json

        print(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))
        return 0
    from pipeline.storage import check_filled_in

    try:   # the cluster files' placeholders, refused before anything starts
        for value, what in ((args.checkpoint, "--checkpoint"), (args.data, "--data"),
                            (cfg.storage, "--storage")):
            check_filled_in(value, what)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from eval.evaluate import evaluate
    from eval.report import table

    level = args.log_level or os.environ.get("VIT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        doc, where = evaluate(cfg, reference=args.reference, address=args.address)
    except Exception as err:  # noqa: BLE001 - every failure ends in one line and exit != 0
        from eval.evaluate import USER_ERRORS

        if interrupt.received():    # a signal Ray's C++ code turned into another error
            raise interrupt.Interrupted(interrupt.received()) from None

        if isinstance(err, USER_ERRORS):
            print(f"error: {err}", file=sys.stderr)
            return 2
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        print(f"error: evaluation failed: {lines[-1] if lines else type(err).__name__}",
              file=sys.stderr)
        return 1
    print()
    print(table(doc))
    print()
    for line in where:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
