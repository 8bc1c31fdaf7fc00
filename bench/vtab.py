"""VTAB sweep overhead: the wall time of the Ray Tune sweep (`eval.sweep.run`: data decoded in
Ray tasks, both protocol phases, one Tune trial per (task, lr) and (task, seed)) against the
sum of its trials' pure training time (the `finetune` loop of each trial). Baseline in the
same run: the same trials in a plain Python loop, no Ray, data decoded once.

Trials run one at a time with every core (`--cpus-per-trial`), so the ratio is what the
harness adds around training: data decoding and transfer, trial start-up, model build,
evaluation, bookkeeping. Goal: <= 1.10x.

    python bench/vtab.py                  # tiny ViT on CPU: 4 tasks x 2 lrs + 4 finals, ~6 min
    python bench/vtab.py --tasks 2        # 6 trials: the fixed cost weighs more
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from eval.config import VtabConfig, VtabRunConfig
from eval.data import TaskDataConfig, decode, read_encoded, train_size, write_grating_task
from eval.finetune import FinetuneConfig, build_model, finetune, predict, top1
from eval.sweep import SweepConfig, choose_lrs, run
from eval.tasks import BY_NAME
from eval.trial import load_pretrained
from pipeline.model import ViT, ViTConfig
from pipeline.weights import save_vit

TASK_ORDER = ("eurosat", "kitti", "dsprites_ori", "dtd")


def plain(cfg: VtabConfig, pretrained) -> tuple[float, float, list]:
    """The same protocol without Ray: -> (wall s, sum of training s, records)."""
    torch.set_num_threads(int(cfg.sweep.cpus_per_trial))
    recipe, root, res = cfg.finetune, cfg.data.uri, cfg.finetune.resolution
    start = time.perf_counter()
    train_s, records = 0.0, []

    def one(task, split_train, split_eval, lr, seed):
        nonlocal train_s
        t = BY_NAME[task]
        tr = decode(read_encoded(root, t, split_train), train_size(t, res))
        ev = decode(read_encoded(root, t, split_eval), res)
        model = build_model(pretrained.config, pretrained.state, t.num_classes, res)
        stats = finetune(model, tr.images, tr.labels, recipe, lr=lr, seed=seed, crop=t.crop,
                         flip=t.flip)
        train_s += stats["train_time_s"]
        return {"task": task, "lr": lr, "top1": top1(predict(model, [ev.images]), ev.labels)}

    sweep = cfg.sweep
    selection = [one(t, "train800", "val200", lr, 0) for t in sweep.tasks for lr in sweep.lrs]
    chosen = choose_lrs(sweep, selection)
    records = selection + [one(t, "train800val200", "test", chosen[t], s)
                           for t in sweep.tasks for s in range(sweep.seeds)]
    return time.perf_counter() - start, train_s, records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=4, help="number of generated tasks (1-4)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--cpus-per-trial", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-vtab-"))
    tasks = TASK_ORDER[:args.tasks]
    for i, name in enumerate(tasks):
        write_grating_task(tmp / "vtab", BY_NAME[name], train=80, val=20, test=100,
                           image_size=48, seed=i)
    torch.manual_seed(0)
    ckpt = save_vit(ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=96, depth=4,
                                  num_heads=3, mlp_dim=384, num_classes=10)), tmp / "ckpt")
    cfg = VtabConfig(
        finetune=FinetuneConfig(resolution=args.resolution, steps=args.steps,
                                batch_size=args.batch_size),
        sweep=SweepConfig(tasks=tasks, lrs=(0.003, 0.03), seeds=1, gpus_per_trial=0.0,
                          cpus_per_trial=args.cpus_per_trial, max_concurrent_trials=1,
                          progress_reports=4),
        data=TaskDataConfig(uri=str(tmp / "vtab")),
        run=VtabRunConfig(checkpoint=str(ckpt), storage=str(tmp / "evals"), name="bench"))
    pretrained = load_pretrained(cfg)
    trials = len(tasks) * (len(cfg.sweep.lrs) + cfg.sweep.seeds)
    print(f"{trials} trials ({len(tasks)} tasks x {len(cfg.sweep.lrs)} lrs on val200, then "
          f"{len(tasks)} finals), {args.steps} steps of batch {args.batch_size} at "
          f"{args.resolution} px, {args.cpus_per_trial} CPU per trial, one at a time")

    plain_wall, plain_train, _ = plain(cfg, pretrained)

    ray.init(address="local", num_cpus=args.cpus_per_trial, include_dashboard=False,
             configure_logging=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        start = time.perf_counter()
        outcome = run(cfg, pretrained)
        ray_wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    ray_train = sum(r["train_time_s"] for r in outcome["selection"] + outcome["final"])

    print()
    print(f"{'':<26}{'wall s':>9}{'training s':>12}{'ratio':>8}")
    print(f"{'plain loop (no Ray)':<26}{plain_wall:>9.1f}{plain_train:>12.1f}"
          f"{plain_wall / plain_train:>8.3f}")
    print(f"{'Ray Tune sweep':<26}{ray_wall:>9.1f}{ray_train:>12.1f}"
          f"{ray_wall / ray_train:>8.3f}")
    t = outcome["timings"]
    in_trials = sum(v for k, v in t.items() if k.endswith("trials_s"))
    print("\nsweep parts (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items())
          + f"; per trial outside training: {(in_trials - ray_train) / trials:.2f} s")
    print(f"overhead ratio (sweep wall / sum of trial training): {ray_wall / ray_train:.3f}x "
          f"(goal <= 1.10x); sweep wall / plain wall: {ray_wall / plain_wall:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
