"""The VTAB-1k protocol on Ray Tune (ViT paper App. B.1.1).

    1. selection  one trial per (task, learning rate): fine-tune on train800, score val200;
    2. choice     `vit`: the one learning rate best on average over the tasks (one setting
                  for all tasks, chosen on val200 as the paper chose its own, though the
                  paper swept 2 learning rates x 2 schedules, not `lrs` at one schedule);
                  `per-task`: the best learning rate of each task;
    3. final      one trial per (task, seed) at the chosen rate: fine-tune on train800val200,
                  score test.
With a single learning rate, step 1 has nothing to choose and is skipped.

Each phase is one Tune experiment under `<storage>/<name>/{select,final}`; the driver records
each finished trial's result in `<storage>/<name>/<phase>_trials.json` (plain JSON), and the
same command after an interruption (driver killed, node lost) reads that record and runs only
the trials that did not finish, as a new experiment. Tune's own restore is never used: it
unpickles `tuner.pkl` and the experiment state, which anyone who can write the storage could
plant. Trials are plain function trainables with fractional GPUs (`--gpus-per-trial
0.25` packs four onto a device). A task's data is decoded once per phase, in Ray tasks, and
shared by all its trials through the object store, as are the pre-trained weights; no trial
re-reads storage.

Here: the `sweep` config section and the phases. One trial and what it is given (weights,
data): eval/trial.py; the record of finished trials: eval/records.py; Tune's environment and
terminal output around `tuner.fit()`: eval/tune_hooks.py.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from eval.errors import SweepError
from eval.records import TrialRecord, combo_name, trial_record
from eval.tasks import GROUPS, TASKS, select
from eval.trial import Pretrained, load_phase_data, trial
from eval.tune_hooks import no_credentials_in_trial_env, progress_callback, quiet_tune
from pipeline import interrupt, storage, timeline

if TYPE_CHECKING:
    from eval.config import VtabConfig

log = logging.getLogger("eval.vtab")

# paper: ViT App. B.1.1 as Table 9 was made: lr 0.01, 2,500 steps, mean of 3 runs, no sweep.
# vit: the sweep over learning rates, one for all tasks (best mean on val200); per-task: each
# task's best rate. linear: no fine-tuning, a closed-form linear probe on frozen features with
# its L2 regulariser chosen on val200 (eval/linear.py), the fast one for use during pretraining.
PROTOCOLS = ("paper", "vit", "per-task", "linear")
PAPER = {"lrs": (0.01,), "steps": 2500, "seeds": 3}


@dataclass(frozen=True)
class SweepConfig:
    """Which trials an evaluation runs and how Ray Tune places them (the `sweep` section of
    `vit-vtab`'s config; each trial fine-tunes by the `finetune` section's recipe)."""

    protocol: Literal["paper", "vit", "per-task", "linear"] = "vit"
    # Task names, `all` or group names (natural, specialized, structured): resolved to the
    # task names, in table order.
    tasks: tuple[str, ...] = tuple(t.name for t in TASKS)
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)   # vit_jax's AugReg notebook sweep
    seeds: int = 1                           # final runs per task (mean and std)
    gpus_per_trial: float = 0.25             # four trials share a device
    cpus_per_trial: float = 1.0
    max_concurrent_trials: int = 0           # 0: as many as the resources allow
    max_failures: int = 2                    # retries of a trial (e.g. its node was lost)
    progress_reports: int = 4                # intermediate Tune reports per trial
    # Where one trial does not fit any node: stop at once when the cluster cannot grow (a
    # local Ray, no autoscaler); with an autoscaler, wait this long for it.
    wait_for_resources_s: float = 600.0
    # Protocol linear: the test images scored per task, the test split's first ones (0: all):
    # a probe during pretraining stays bounded (SUN397's test split has 21,750).
    test_images: int = 2000

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; use {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "tasks", _task_names(self.tasks))
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"learning rates must be positive, got {list(self.lrs)} (--lrs, "
                             f"sweep.lrs)")
        if self.seeds < 1:
            raise ValueError("--seeds (sweep.seeds) must be at least 1")
        if self.test_images < 0:
            raise ValueError("sweep.test_images must be >= 0 (0: the whole test split)")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise ValueError("--gpus-per-trial must be >= 0 and --cpus-per-trial > 0 "
                             "(sweep.gpus_per_trial, sweep.cpus_per_trial)")


def _task_names(specs: tuple[str, ...]) -> tuple[str, ...]:
    """Names and groups -> the task names, in table order; unknown names are errors."""
    groups = [s for s in specs if s == "all" or s in GROUPS]
    names = {t.name for g in groups for t in select(g)}
    rest = [s for s in specs if s not in groups]
    if rest:
        names |= {t.name for t in select(",".join(rest))}
    if not names:
        raise ValueError("no VTAB task given (--tasks, sweep.tasks); use all, natural, "
                         "specialized, structured or task names")
    return tuple(t.name for t in TASKS if t.name in names)


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------
def _tune_storage(cfg: VtabConfig):
    """(storage_path, filesystem) for Tune's RunConfig (explicit endpoint for S3)."""
    root = cfg.root
    if storage.is_s3(root):
        fs, path = storage.filesystem(root)
        return path, fs
    Path(root).mkdir(parents=True, exist_ok=True)
    return root, None


def run_phase(cfg: VtabConfig, phase: str, combos: list[dict], data: dict,
              pretrained: Pretrained, trainable=None) -> list[dict]:
    """Run one phase, or the trials of it that an earlier run of the same command did not
    finish; -> one record per trial (in `combos` order): config, metrics, error.
    `tune.with_parameters` puts the weights and the dict of data refs into the object store
    once; every trial reads them from there, and its recipe and placement (typed configs).
    `trainable`: another trial function with its parameters bound (protocol linear)."""
    from ray import tune

    path, fs = _tune_storage(cfg)
    sweep = cfg.sweep
    record = TrialRecord(cfg, phase)
    done = record.read()
    todo = [c for c in combos if combo_name(c) not in done]
    if done:
        log.info("%s: resuming from %s (%d of %d trials finished are kept)", phase,
                 record.uri, len(combos) - len(todo), len(combos))
    results: dict[str, dict] = {}
    if todo:
        resources = {"cpu": sweep.cpus_per_trial}
        if sweep.gpus_per_trial > 0:
            resources["gpu"] = sweep.gpus_per_trial
        trainable = tune.with_resources(
            trainable or tune.with_parameters(trial, data=data, pretrained=pretrained,
                                              recipe=cfg.finetune, sweep=sweep),
            resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(
                reuse_actors=True,
                max_concurrent_trials=sweep.max_concurrent_trials or None,
                trial_dirname_creator=_trial_name,
                trial_name_creator=_trial_name),
            # With an explicit filesystem (S3), Tune wants the path without its scheme.
            run_config=tune.RunConfig(
                name=phase, storage_path=path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[record.callback(), progress_callback(phase, len(todo))],
                verbose=0))
        # Ctrl-C / SIGTERM: Tune ends its loop when SIGUSR1 comes (its own SIGINT handler is
        # off: it would leave SIGTERM to Ray's sys.exit), stops the trials, and returns.
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        with quiet_tune(), no_credentials_in_trial_env(), \
                interrupt.deferred(lambda: os.kill(os.getpid(), signal.SIGUSR1)):
            timeline.mark("driver.tune")
            grid = tuner.fit()
            timeline.mark("driver.tune_done")
        if interrupt.received():
            raise interrupt.Interrupted(interrupt.received(), (
                f"evaluation stopped; {len(record.read())} {phase} trial(s) finished are kept "
                f"in {record.uri}; the same command resumes"))
        for result in grid:
            conf = result.config["trial"]
            error = (str(result.error).strip().splitlines()[-1] if result.error else None)
            results[combo_name(conf)] = trial_record(phase, conf, result.metrics or {}, error)
    return [results.get(combo_name(c)) or done[combo_name(c)] for c in combos]


def _trial_name(t) -> str:
    return combo_name(t.config["trial"])


def choose_lrs(cfg: SweepConfig, selection: list[dict]) -> dict[str, float]:
    """The learning rate per task: `per-task` takes each task's best val200 score, `vit` the
    single rate with the best mean over tasks. Ties go to the smaller rate; a diverged or
    failed run scores below any real one."""
    if len(cfg.lrs) == 1:
        return {t: cfg.lrs[0] for t in cfg.tasks}

    def score(r):
        v = r.get("top1")
        return v if v is not None and not math.isnan(v) else -1.0

    by = {(r["task"], r["lr"]): score(r) for r in selection}
    lrs = sorted(cfg.lrs)
    if cfg.protocol == "per-task":
        return {t: max(lrs, key=lambda lr: (by.get((t, lr), -1.0), -lr)) for t in cfg.tasks}
    mean = {lr: sum(by.get((t, lr), -1.0) for t in cfg.tasks) / len(cfg.tasks) for lr in lrs}
    best = max(lrs, key=lambda lr: (mean[lr], -lr))
    return {t: best for t in cfg.tasks}


def run(cfg: VtabConfig, pretrained: Pretrained) -> dict:
    """Both phases; -> {"selection": [...], "final": [...], "lrs": {task: lr},
    "timings": {"<phase>/data_s", "<phase>/trials_s"}}."""
    selection: list[dict] = []
    timings = {}

    def phase(name: str, combos: list[dict]) -> list[dict]:
        start = time.perf_counter()
        done = TrialRecord(cfg, name).read()
        data = load_phase_data(cfg, name) if any(combo_name(c) not in done
                                                 for c in combos) else {}
        timings[f"{name}/data_s"] = time.perf_counter() - start
        start = time.perf_counter()
        records = run_phase(cfg, name, combos, data, pretrained)
        timings[f"{name}/trials_s"] = time.perf_counter() - start
        return records

    sweep = cfg.sweep
    if sweep.protocol == "linear":
        return run_linear(cfg, pretrained)
    if len(sweep.lrs) > 1:
        selection = phase("select", [{"task": t, "lr": lr, "seed": 0, "phase": "select"}
                                     for t in sweep.tasks for lr in sweep.lrs])
        _raise_failed(selection, "selection")
    chosen = choose_lrs(sweep, selection)
    final = phase("final", [{"task": t, "lr": chosen[t], "seed": s, "phase": "final"}
                            for t in sweep.tasks for s in range(sweep.seeds)])
    _raise_failed(final, "final")
    diverged = [f"{r['task']} (lr {r['lr']:g}, seed {r['seed']})" for r in final
                if r["diverged"]]
    if diverged:
        raise SweepError(f"the final run diverged for {', '.join(diverged)}; choose smaller "
                         f"--lrs")
    return {"selection": selection, "final": final, "lrs": chosen, "timings": timings}


def run_linear(cfg: VtabConfig, pretrained: Pretrained) -> dict:
    """Protocol linear (eval/linear.py): one trial per task, which chooses its L2 on val200
    and scores test itself; the chosen L2 stands where the other protocols have the rate."""
    from ray import tune

    from eval.linear import linear_trial

    sweep = cfg.sweep
    trainable = tune.with_parameters(
        linear_trial, data_root=cfg.data.uri, pretrained=pretrained,
        resolution=cfg.finetune.resolution, test_images=sweep.test_images,
        gpus=sweep.gpus_per_trial, cpus=sweep.cpus_per_trial)
    start = time.perf_counter()
    final = run_phase(cfg, "final", [{"task": t, "lr": 0.0, "seed": 0, "phase": "final"}
                                     for t in sweep.tasks], {}, pretrained, trainable)
    _raise_failed(final, "final")
    return {"selection": [], "final": final, "lrs": {r["task"]: r.get("l2") for r in final},
            "timings": {"final/trials_s": time.perf_counter() - start}}


def _raise_failed(records: list[dict], phase: str) -> None:
    failed = [r for r in records if r["error"] and not r["diverged"]]
    if failed:
        first = failed[0]
        raise SweepError(f"{len(failed)} {phase} trial(s) failed, e.g. {first['task']} "
                         f"(lr {first['lr']:g}, seed {first['seed']}): {first['error']}; run "
                         f"the same command again to retry them (finished trials are kept)")
