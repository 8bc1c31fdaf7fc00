"""The VTAB-1k protocol on Ray Tune (ViT paper App. B.1.1).

    1. selection  one trial per (task, learning rate): fine-tune on train800, score val200;
    2. choice     `vit`: the one learning rate best on average over the tasks (the paper's
                  way); `per-task`: the best learning rate of each task;
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
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from eval.tasks import BY_NAME, GROUPS, TASKS, Task, select
from pipeline import interrupt, storage, timeline

if TYPE_CHECKING:
    from eval.config import VtabConfig
    from eval.finetune import FinetuneConfig

log = logging.getLogger("eval.vtab")

# paper: ViT App. B.1.1 as Table 9 was made: lr 0.01, 2,500 steps, mean of 3 runs, no sweep.
# vit: the sweep over learning rates, one for all tasks (best mean on val200); per-task: each
# task's best rate.
PROTOCOLS = ("paper", "vit", "per-task")
PAPER = {"lrs": (0.01,), "steps": 2500, "seeds": 3}


class SweepError(RuntimeError):
    """The evaluation cannot start or finish, for a reason a user must act on (one line)."""


@dataclass(frozen=True)
class SweepConfig:
    """Which trials an evaluation runs and how Ray Tune places them (the `sweep` section of
    `vit-vtab`'s config; each trial fine-tunes by the `finetune` section's recipe)."""

    protocol: Literal["paper", "vit", "per-task"] = "vit"
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

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; use {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "tasks", _task_names(self.tasks))
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"learning rates must be positive, got {list(self.lrs)} (--lrs, "
                             f"sweep.lrs)")
        if self.seeds < 1:
            raise ValueError("--seeds (sweep.seeds) must be at least 1")
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


@functools.lru_cache(maxsize=64)
def model_label(checkpoint: str) -> str:
    """What a person calls the model: `<pretraining run>-step<N>` for our checkpoints (from
    their metadata), the Hub name for hf://, else the file or folder name."""
    from pipeline.weights import HUB_SCHEME, read_metadata

    if checkpoint.startswith(HUB_SCHEME):
        return checkpoint[len(HUB_SCHEME):].replace("/", "-").replace("@", "-")
    meta = read_metadata(checkpoint)
    if meta.get("run_name") and meta.get("step") is not None:
        return f"{meta['run_name']}-step{meta['step']}"
    return checkpoint.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"


@dataclass
class Pretrained:
    config: dict              # ViTConfig fields
    metadata: dict            # our format's vit.json metadata ({} for imports)
    state: dict = field(repr=False)


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be wrong is found before any trial starts
# ---------------------------------------------------------------------------------------------
def load_pretrained(cfg: VtabConfig) -> Pretrained:
    from pipeline.weights import load_vit, read_metadata

    model = load_vit(cfg.run.checkpoint)
    patch = model.cfg.effective_patch_size          # a hybrid's: pixels per token
    resolution, dropout = cfg.finetune.resolution, cfg.finetune.dropout
    if resolution < patch:
        raise SweepError(f"--resolution {resolution} is smaller than the checkpoint's "
                         f"patch size {patch}; use at least {patch}")
    # Not a multiple (H/14 at the paper's 384 px): the last resolution % patch rows and
    # columns go unused, as in vit_jax (VALID patch convolution; see ViTConfig.grid_size).
    from eval.finetune import finetune_dropout

    # Fine-tuning dropout: vit_jax's per-model value, not whatever the checkpoint was
    # pretrained with (0.1 for ours, 0.0 for imports), unless --dropout says otherwise; no
    # stochastic depth ("No AugReg during fine-tuning", vit_jax configs/augreg.py).
    config = {**model.cfg.to_dict(), "attention_dropout": 0.0, "drop_path": 0.0,
              "dropout": dropout if dropout is not None else finetune_dropout(model.cfg)}
    return Pretrained(config, read_metadata(cfg.run.checkpoint),
                      {k: v.detach().cpu() for k, v in model.state_dict().items()})


def check_data(cfg: VtabConfig) -> dict[str, dict[str, int]]:
    from eval.data import check_task

    return {name: check_task(cfg.data.uri, BY_NAME[name]) for name in cfg.sweep.tasks}


# ---------------------------------------------------------------------------------------------
# Data: decoded once per phase in Ray tasks, shared through the object store
# ---------------------------------------------------------------------------------------------
def _load(data_root: str, task_name: str, split: str, resolution: int, kind: str):
    """-> (the split, decoded or encoded; its size). Two returns, so that the driver can
    wait on the small one and never pull the images to itself."""
    from eval.data import decode, read_encoded, train_size

    task = BY_NAME[task_name]
    encoded = read_encoded(data_root, task, split)
    if kind == "encoded":
        return encoded, len(encoded.labels)
    size = train_size(task, resolution) if kind == "train" else resolution
    return decode(encoded, size, f"{task_name}/{split}"), len(encoded.labels)


def load_phase_data(cfg: VtabConfig, phase: str) -> dict[str, dict[str, object]]:
    """{task: {"train": ref, "eval": ref}} for a phase, loaded in parallel Ray tasks and left
    in the object store; raises TaskDataError on bad data."""
    import ray

    load = ray.remote(num_cpus=1, max_retries=2, num_returns=2)(_load)
    train_split, eval_split, eval_kind = (("train800", "val200", "eval") if phase == "select"
                                          else ("train800val200", "test", "encoded"))
    refs, sizes = {}, []
    root, resolution = cfg.data.uri, cfg.finetune.resolution
    for name in cfg.sweep.tasks:
        train, n_train = load.remote(root, name, train_split, resolution, "train")
        evaluation, n_eval = load.remote(root, name, eval_split, resolution, eval_kind)
        refs[name] = {"train": train, "eval": evaluation}
        sizes += [n_train, n_eval]
    try:
        ray.get(sizes)   # surfaces a data error here, before any trial
    except ray.exceptions.RayTaskError as err:
        raise (err.cause if err.cause is not None else err) from None
    return refs


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune actor)
# ---------------------------------------------------------------------------------------------
def trial(config: dict, *, data: dict, pretrained, recipe: FinetuneConfig,
          sweep: SweepConfig) -> None:
    """One fine-tuning run by `recipe`: config = {"trial": {"task", "lr", "seed", "phase"}}."""
    import numpy as np
    import ray
    import torch
    from ray import tune

    from eval.data import Encoded, decode
    from eval.finetune import FinetuneError, build_model, finetune, predict, top1

    config = config["trial"]
    timeline.mark("trial.start")
    task: Task = BY_NAME[config["task"]]
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))
    use_gpu = sweep.gpus_per_trial > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    if use_gpu and sweep.gpus_per_trial < 1:
        # Ray's GPU fractions are logical: cap this trial's share of the device memory, so
        # that co-located trials cannot starve each other (the batch is accumulated instead).
        torch.cuda.set_per_process_memory_fraction(sweep.gpus_per_trial)
    weights = pretrained   # tune.with_parameters fetched it from the object store
    res = recipe.resolution
    model = build_model(weights.config, weights.state, task.num_classes, res)
    train = ray.get(data[task.name]["train"])
    every = max(1, recipe.steps // max(1, sweep.progress_reports))

    def progress(step: int, loss: float) -> None:
        if step < recipe.steps:
            tune.report({"step": step, "train_loss": loss})

    try:
        stats = finetune(model, train.images, train.labels, recipe, lr=config["lr"],
                         seed=config["seed"], crop=task.crop, flip=task.flip, device=device,
                         progress=progress, progress_every=every)
    except FinetuneError as err:
        # A learning rate that diverges is a result of the sweep, not a failure of it.
        tune.report({"step": recipe.steps, "diverged": True, "top1": float("nan"),
                     "error": str(err), "task": task.name})
        return
    del train
    evaluation = ray.get(data[task.name]["eval"])
    if isinstance(evaluation, Encoded):   # test: decoded in chunks, never whole
        chunk = 512

        def chunks():
            for lo in range(0, len(evaluation.labels), chunk):
                yield decode(Encoded(evaluation.images[lo:lo + chunk],
                                     evaluation.labels[lo:lo + chunk]), res,
                             f"{task.name}/test").images
        preds = predict(model, chunks(), device)
    else:
        preds = predict(model, [evaluation.images], device)
    labels = np.asarray(evaluation.labels)
    tune.report({"step": recipe.steps, "top1": top1(preds, labels), "eval_images": len(labels),
                 "diverged": False, "task": task.name, **stats})


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
              pretrained: Pretrained) -> list[dict]:
    """Run one phase, or the trials of it that an earlier run of the same command did not
    finish; -> one record per trial (in `combos` order): config, metrics, error.
    `tune.with_parameters` puts the weights and the dict of data refs into the object store
    once; every trial reads them from there, and its recipe and placement (typed configs)."""
    from ray import tune

    path, fs = _tune_storage(cfg)
    sweep = cfg.sweep
    record = TrialRecord(cfg, phase)
    done = record.read()
    todo = [c for c in combos if _combo_name(c) not in done]
    if done:
        log.info("%s: resuming from %s (%d of %d trials finished are kept)", phase,
                 record.uri, len(combos) - len(todo), len(combos))
    results: dict[str, dict] = {}
    if todo:
        resources = {"cpu": sweep.cpus_per_trial}
        if sweep.gpus_per_trial > 0:
            resources["gpu"] = sweep.gpus_per_trial
        trainable = tune.with_resources(
            tune.with_parameters(trial, data=data, pretrained=pretrained, recipe=cfg.finetune,
                                 sweep=sweep),
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
            results[_combo_name(conf)] = _trial_record(phase, conf, result.metrics or {}, error)
    return [results.get(_combo_name(c)) or done[_combo_name(c)] for c in combos]


def _trial_record(phase: str, conf: dict, metrics: dict, error: str | None) -> dict:
    return {"phase": phase, **conf, "top1": metrics.get("top1"),
            "diverged": bool(metrics.get("diverged", False)),
            "error": error or metrics.get("error"),
            "train_time_s": metrics.get("train_time_s"),
            "images_per_s": metrics.get("images_per_s"),
            "micro_batch_size": metrics.get("micro_batch_size"),
            "finished_at": metrics.get("timestamp"),
            "trial_id": metrics.get("trial_id")}


def _combo_name(conf: dict) -> str:
    return f"{conf['task']}-lr{conf['lr']:g}-seed{conf['seed']}"


class TrialRecord:
    """The finished trials of a phase, as JSON in the evaluation's storage: what a rerun of
    the same command keeps. Written whole (atomically) by the driver each time a trial
    finishes; it names the settings the results depend on, so a rerun under the same --name
    with other settings is refused instead of mixing results."""

    def __init__(self, cfg: VtabConfig, phase: str):
        self.uri = storage.join(cfg.root, f"{phase}_trials.json")
        self.phase = phase
        ft = cfg.finetune
        # These keys and values as records of earlier releases hold them, so that those
        # still resume; a recipe key added since joins them only where it is not at its
        # default (a record without it was made at the default).
        self.settings = {"checkpoint": cfg.run.checkpoint, "data": cfg.data.uri,
                         "resolution": ft.resolution, "steps": ft.steps,
                         "warmup": ft.warmup, "batch_size": ft.batch_size,
                         "dropout": ft.dropout, **cfg.changed_recipe()}
        self.trials: dict[str, dict] = {}

    def read(self) -> dict[str, dict]:
        """{trial name: record} of the trials an earlier run finished ({} if none)."""
        try:
            raw = storage.read_bytes(self.uri)
        except storage.StorageError:
            return {}
        try:
            doc = json.loads(raw)
            trials = doc["trials"]
            ok = doc.get("phase") == self.phase and isinstance(trials, list) and all(
                isinstance(t, dict) and isinstance(t.get("task"), str) and
                isinstance(t.get("lr"), (int, float)) and isinstance(t.get("seed"), int) and
                (t.get("top1") is None or isinstance(t["top1"], (int, float)))
                for t in trials)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise SweepError(f"{self.uri} is not a record of finished trials that this "
                             f"pipeline wrote; delete it to run the {self.phase} phase again")
        if doc.get("settings") != json.loads(json.dumps(self.settings)):
            theirs = doc.get("settings") or {}
            diff = ", ".join(f"{k}: {theirs.get(k)!r} vs {v!r}" for k, v in
                             self.settings.items() if theirs.get(k) != v)
            raise SweepError(f"{self.uri} holds trials run with other settings ({diff}); "
                             f"use another --name, or delete it to start the phase again")
        self.trials = {_combo_name(t): t for t in trials}
        return dict(self.trials)

    def add(self, record: dict) -> None:
        self.trials[_combo_name(record)] = record
        doc = {"phase": self.phase, "settings": self.settings,
               "trials": list(self.trials.values())}
        try:
            storage.write_bytes(self.uri, json.dumps(doc, indent=1).encode())
        except (storage.StorageError, OSError) as err:
            log.warning("could not record the finished trial %s (%s); a rerun would run it "
                        "again", _combo_name(record), str(err).splitlines()[0][:160])

    def callback(self):
        """A Tune callback that adds each trial when its final result (with `top1`) comes
        in, before Tune's own loggers write it."""
        from ray import tune

        record = self

        class Record(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "top1" in result:
                    record.add(_trial_record(record.phase, trial.config["trial"], result,
                                             None))

        return Record()


def check_records(cfg: VtabConfig) -> None:
    """Read the records of finished trials an earlier run left (before Ray starts): one
    that is not ours, or one of other settings, stops the evaluation here."""
    for phase in ("select", "final"):
        TrialRecord(cfg, phase).read()


@contextlib.contextmanager
def no_credentials_in_trial_env():
    """Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the session tokens from the
    driver's environment into every trial actor's runtime env (ray/tune/execution/
    class_cache.py, ENV_VARS_TO_PROPAGATE), and Ray's runtime_env_agent.log then prints them
    in plain text on every node. Trials need none of the driver's: they read data and weights
    from the object store, and whatever a node's processes write to storage resolves its
    credentials through the standard AWS chain of that node's own environment."""
    from ray.tune.execution import class_cache

    saved = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in saved if not v.startswith("AWS_")}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = saved


@contextlib.contextmanager
def quiet_tune():
    """Tune's own terminal output (the boxed experiment tables, the TensorBoard hint, the
    "wrote the experiment state" lines, a traceback per failed attempt of a trial, also one
    that is retried) says nothing our one line per finished, retried or failed trial and the
    heartbeat do not; keep it off the user's terminal. Tune reads the variables per call."""
    quiet = {"RAY_AIR_NEW_OUTPUT": "0",            # the legacy reporter: silent at verbose=0
             "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}   # read when tuner.fit() starts
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tune_log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def progress_callback(phase: str, total: int):
    """A Tune callback (Tune is imported here, not when the CLI parses its arguments)."""
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished trial and a heartbeat a minute: readable for 95 trials."""

        def __init__(self, phase: str, total: int, every_s: float = 60.0):
            self.phase, self.total, self.every_s = phase, total, every_s
            self.done, self.last = 0, time.monotonic()
            self.started = time.monotonic()

        def pace(self) -> str:
            """Elapsed time and, at this phase's mean pace, the time left."""
            from pipeline.cli import clock

            elapsed = time.monotonic() - self.started
            left = (self.total - self.done) * elapsed / self.done if self.done else None
            return f"{clock(elapsed)} elapsed" + (f", ~{clock(left)} left"
                                                  if left is not None else "")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            c, m = trial.config["trial"], trial.last_result or {}
            what = "val200" if self.phase == "select" else "test"
            score = (f"{what} top-1 {m['top1']:.2f}" if not m.get("diverged")
                     else "diverged")
            log.info("%s [%d/%d] %s lr %g seed %d: %s (%.0f s) | %s", self.phase,
                     self.done, self.total, c["task"], c["lr"], c["seed"], score,
                     m.get("time_total_s", 0.0), self.pace())

        def on_trial_recover(self, iteration, trials, trial, **info):
            # Its actor failed (the node was lost, say) and Tune runs it again from the start.
            c = trial.config["trial"]
            log.warning("%s: trial %s lr %g seed %d failed (%s); running it again (retry %d "
                        "of %d)", self.phase, c["task"], c["lr"], c["seed"],
                        _last_error(trial), trial.num_failures, trial.max_failures)

        def on_trial_error(self, iteration, trials, trial, **info):
            c = trial.config["trial"]
            log.warning("%s: trial %s lr %g seed %d failed (error file: %s)", self.phase,
                        c["task"], c["lr"], c["seed"], trial.error_file)

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last < self.every_s:
                return
            self.last = time.monotonic()
            states = [t.status for t in trials]
            log.info("%s: %d/%d done, %d running, %d pending | %s", self.phase,
                     states.count("TERMINATED") + states.count("ERROR"), len(states),
                     states.count("RUNNING"), states.count("PENDING"), self.pace())

    return Progress(phase, total)


def _last_error(trial) -> str:
    """The last line of a trial's error file (Tune appends each failure's message there)."""
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines()
    except (OSError, TypeError):
        return "no error file"
    if not lines:
        return "no message"
    return lines[-1] if len(lines[-1]) <= 200 else lines[-1][:197] + "..."


def _trial_name(t) -> str:
    return _combo_name(t.config["trial"])


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
        data = load_phase_data(cfg, name) if any(_combo_name(c) not in done
                                                 for c in combos) else {}
        timings[f"{name}/data_s"] = time.perf_counter() - start
        start = time.perf_counter()
        records = run_phase(cfg, name, combos, data, pretrained)
        timings[f"{name}/trials_s"] = time.perf_counter() - start
        return records

    sweep = cfg.sweep
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


def _raise_failed(records: list[dict], phase: str) -> None:
    failed = [r for r in records if r["error"] and not r["diverged"]]
    if failed:
        first = failed[0]
        raise SweepError(f"{len(failed)} {phase} trial(s) failed, e.g. {first['task']} "
                         f"(lr {first['lr']:g}, seed {first['seed']}): {first['error']}; run "
                         f"the same command again to retry them (finished trials are kept)")
