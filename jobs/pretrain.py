"""Pretrain a ViT on Ray Train, as the paper defines it (Dosovitskiy et al., ICLR 2021).

    python jobs/pretrain.py --preset smoke                       # local Ray, CPU, ~25 s
    ray job submit --working-dir . -- python jobs/pretrain.py --preset vit_b16_i21k \\
        --set data.uri=s3://bucket/imagenet21k --workers 64 --gpus-per-worker 1

The same command resumes: a run whose name already has checkpoints in the storage continues
from the newest one (with another run-defining config it stops and says what changed).
MLFLOW_TRACKING_URI chooses the MLflow server (default: the local store ~/vit-runs/mlflow.db,
whatever --out is). S3 settings come from the standard AWS variables. --no-mlflow logs
nothing to MLflow (the metrics stay in the run folder, and a later start of the run that logs
to MLflow sends them).

Presets (each documented in pipeline/train/config.py):
  smoke         tiny ViT, synthetic data, CPU, about a minute
  vit_b16_i21k  ViT-B/16 on ImageNet-21k, Table 3      vit_l16_i21k  ViT-L/16, ImageNet-21k
  vit_b16_jft   ViT-B/16 on JFT-300M, Table 3          vit_h14_jft   ViT-H/14, JFT-300M
  vit_b16_mpp   ViT-B/16 masked patch prediction (App. B.1.2)
  vit_r50_b16_i21k  the hybrid R50+ViT-B/16 (§3.1) on ImageNet-21k; smoke_hybrid: a tiny one
  vit_s16_i21k_augreg, vit_b16_i21k_augreg, vit_l16_i21k_augreg: AugReg, 300 epochs on i21k
Any resolved value can be changed with --set section.field=value (sections: model, optim,
data, train, scale, run, checkpoint, probe, eval; `model.variant=L/16` sets all model sizes).
`--set eval.at_end=true --set eval.data=ROOT` also evaluates the final checkpoint on VTAB-1k
(`eval.protocol=linear`, the fast probe, by default; `eval.vtab_every=N`: every N-th
checkpoint written too, by count), on the same Ray cluster: see eval/handoff.py.
`--show-config` prints the resolved configuration and exits; `--config FILE` starts from
such a file (the config.json every MLflow run keeps) instead of a preset.
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline import cli, interrupt, timeline

interrupt.install()   # before the heavy imports: a Ctrl-C while they load ends quietly too

from pipeline.config import load_config  # noqa: E402
from pipeline.train.config import PRESETS, PretrainConfig, apply_overrides  # noqa: E402


def parse_args(argv=None):
    ap = cli.parser(__doc__, prog="vit-pretrain")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="named configuration to start from (default: smoke)")
    ap.add_argument("--config", metavar="FILE",
                    help="start from a resolved configuration (JSON, as --show-config prints "
                         "and MLflow keeps as config.json; a local path or s3://)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override one value, e.g. optim.lr=3e-4 "
                                              "(repeatable; unknown keys are errors)")
    ap.add_argument("--workers", type=int, help="Ray Train workers (scale.num_workers)")
    ap.add_argument("--gpus-per-worker", type=float,
                    help="GPUs per worker; > 0 turns GPU training on (scale.gpus_per_worker)")
    ap.add_argument("--cpus-per-worker", type=float, help="CPUs per worker "
                                                          "(scale.cpus_per_worker)")
    ap.add_argument("--name", help="run name (run.name): the same name resumes the same run")
    ap.add_argument("--out", metavar="URI",
                    help="where the run's checkpoints go: a folder or s3://bucket/prefix, the "
                         "run in <out>/<name> (run.storage; default ~/vit-runs)")
    ap.add_argument("--data", metavar="URI",
                    help="dataset folder or s3:// prefix with a manifest.json (sets "
                         "data.source=shards and data.uri; default: the preset's)")
    ap.add_argument("--resume", metavar="CHECKPOINT",
                    help="continue from another run's training checkpoint (weights, optimizer, "
                         "step); this run's own checkpoints take precedence")
    ap.add_argument("--init", metavar="WEIGHTS",
                    help="start from these weights (any format load_vit reads: ours, Hugging "
                         "Face, timm, .npz); fresh optimizer and step 0")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, or a local "
                                      "Ray started on demand)")
    ap.add_argument("--show-config", action="store_true",
                    help="print the resolved configuration and exit")
    cli.add_common(ap)
    cli.deprecated(ap, "--storage", "--out")
    return ap.parse_args(argv)


def resolve(args):
    if args.config and args.preset:
        raise ValueError("--config and --preset both name a starting configuration; give one")
    cfg = load_config(PretrainConfig, args.config) if args.config else \
        PRESETS[args.preset or "smoke"]()
    sets = list(args.overrides)
    if args.workers is not None:
        sets.append(f"scale.num_workers={args.workers}")
    if args.gpus_per_worker is not None:
        sets.append(f"scale.gpus_per_worker={args.gpus_per_worker}")
        sets.append(f"scale.use_gpu={args.gpus_per_worker > 0}")
    if args.cpus_per_worker is not None:
        sets.append(f"scale.cpus_per_worker={args.cpus_per_worker}")
    if args.name:
        sets.append(f"run.name={args.name}")
    if args.out:
        sets.append(f"run.storage={args.out}")
    if args.data:
        sets += ["data.source=shards", f"data.uri={args.data}"]
    # All at once: the cross-field checks see the final values, whatever the order given.
    return apply_overrides(cfg, sets)


def check_filled_in(cfg: PretrainConfig, args) -> None:
    """The presets' and cluster files' placeholders refused before anything starts."""
    from pipeline.storage import check_filled_in

    if cfg.data.source == "shards":
        check_filled_in(cfg.data.uri, "data.uri")
    check_filled_in(cfg.run.storage, "run.storage (--out)")
    check_filled_in(args.init, "--init")
    check_filled_in(args.resume, "--resume")


def describe(cfg: PretrainConfig) -> str:
    """The resolved config, one section a paragraph, key=value wrapped to 100 columns."""
    import textwrap

    lines = ["resolved config (--show-config prints it as JSON):"]
    for section, values in cfg.to_dict().items():
        text = " ".join(f"{k}={v}" for k, v in values.items())
        lines += textwrap.wrap(text, 100, initial_indent=f"  {section:<7}",
                               subsequent_indent=" " * 9)
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command; Ctrl-C or SIGTERM stop it cleanly (exit 130 / 143, see
    pipeline.interrupt)."""
    return interrupt.run(_main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.show_config:
        print(cfg.to_json())
        return 0
    try:
        check_filled_in(cfg, args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cli.configure_logging(args.log_level)
    if why := cli.temp_dir_problem(args.address):
        print(f"error: {why}", file=sys.stderr)       # a local Ray could not start there
        return cli.BAD_INPUT
    from pipeline.train import preflight

    try:   # every input a user can get wrong, before Ray starts (pipeline/train/preflight.py)
        checked = preflight.check(cfg, resume=args.resume, init=args.init,
                                  mlflow=not args.no_mlflow)
    except preflight.REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT
    from eval import handoff

    try:   # the `eval` section's VTAB-1k protocol, tasks and data (eval/handoff.py)
        handoff.check(cfg)
    except (ValueError, *preflight.REFUSALS) as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT
    print(describe(cfg), flush=True)
    timeline.mark("driver.imports")

    import ray

    from pipeline import storage
    from pipeline.train import failures
    from pipeline.train.run import pretrain, storage_root

    cli.configure_logging(args.log_level)   # again: `import ray` set up Ray's loggers anew
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    address = args.address or os.environ.get("RAY_ADDRESS")
    # No address: a new local Ray ("local"), never a stray `ray start` cluster that
    # ray.init() would otherwise attach to (or a dead one it would wait for).
    try:
        interrupt.ray_init(configure_logging=False, log_to_driver=True,
                           **cli.ray_init_args(address))
        failures.own_local_ray(not address)
        timeline.mark("driver.ray_ready")
        if not sys.stdout.isatty():  # progress bars only where a terminal can redraw them
            ray.data.DataContext.get_current().enable_progress_bars = False
        # VTAB-1k of its checkpoints (the `eval` section): during training on a cluster,
        # after it on one machine.
        evaluations = handoff.Handoff(cfg, storage.join(storage_root(cfg), cfg.run.name),
                                      on_cluster=bool(address), mlflow=not args.no_mlflow)
        evaluations.start()
        out = pretrain(cfg, resume=args.resume, init=args.init, mlflow=not args.no_mlflow,
                       checked=checked)
    except interrupt.Interrupted:
        # The Ray processes this command started (a local Ray) go with it; a cluster's stay.
        ray.shutdown()
        raise
    except preflight.REFUSALS as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.BAD_INPUT
    except Exception as err:  # noqa: BLE001 - a Ray failure: its last line says why
        if interrupt.received():    # a signal Ray's C++ code turned into another error
            raise interrupt.Interrupted(interrupt.received()) from None
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        print(f"error: training failed: {lines[-1] if lines else type(err).__name__}",
              file=sys.stderr)
        return cli.FAILED
    logging.getLogger("pipeline.train").info("done")
    summary(cfg, out)
    timeline.mark("driver.done")
    if cfg.eval.enabled:    # the exit code stays training's: a failure is one line
        print()
        for line in evaluations.finish(out.checkpoint):
            print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout,
                  flush=True)
    return 0


def summary(cfg, out) -> None:
    m = out.metrics
    print()
    print(f"Pretraining run {cfg.run.name!r} finished at step {out.step}")
    rows = [(k, v) for k, v in sorted(m.items()) if isinstance(v, (int, float)) and "/" in k]
    for key, value in rows:
        print(f"  {key:<28} {value:.4g}")
    print(f"  checkpoint: {out.checkpoint}")
    print(f"    evaluate: vit-vtab --checkpoint {out.checkpoint}")
    print(f"    export:   vit-export --checkpoint {out.checkpoint} --out OUT --format "
              f"hf|timm")
    if out.run_id:
        from pipeline.tracking import experiment_name, how_to_open

        print(f"  MLflow run: {out.run_id} (experiment "
              f"{experiment_name(cfg.run.experiment)!r})")

        print(f"    open it:  {how_to_open(out.tracking_uri, out.run_id)}")


if __name__ == "__main__":
    sys.exit(main())
