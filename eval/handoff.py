"""Pretraining hands its checkpoints to VTAB-1k itself: the `eval` section of the pretraining
config (pipeline/train/config.py `EvalConfig`) names the protocol, tasks and data, and
jobs/pretrain.py calls this module (the import rules put the handoff here: `pipeline` never
imports `eval`; nor does this module import the training package: `cfg` below is the
pretraining config, `PretrainConfig`, read by its fields).

Each evaluation is `vit-vtab`'s own code path, `eval.evaluate.evaluate`, on the same Ray
cluster, so its report, records, resume and MLflow runs are those of the command:

- `eval.at_end`: the final checkpoint, once training has returned;
- `eval.vtab_every=N`: every N-th checkpoint the run writes, counted whatever made it
  (`checkpoint.every` or `checkpoint.minutes`; pipeline.weights.integrity.vtab_due), as it
  appears (a driver thread watches the run's folder). On a cluster (an address given) each
  goes at once to a Ray task that holds no CPU (`num_cpus=0`) and drives the Tune sweep, whose
  trials queue for the resources training leaves free: training is never blocked. On one
  machine (a local Ray that cannot grow) the trials would only compete with the training
  workers, so they run after training, in order.

A due checkpoint whose evaluation has no report yet (an earlier start was stopped during it)
is evaluated again by the next start, which resumes its finished trials (vit-vtab's records).
An evaluation that fails is reported in one line; the command's exit code stays training's.
Ctrl-C stops both: on one machine as it stops `vit-vtab` (the runs KILLED, the finished
trials kept); on a cluster the waiting driver cancels its evaluation tasks.
"""

from __future__ import annotations

import logging
import os
import threading

from eval.config import PRESETS, VtabConfig, absolute_paths
from pipeline import storage
from pipeline.config import apply_overrides

log = logging.getLogger("eval.vtab")

POLL_S = 2.0           # how often the watcher lists the run's checkpoints (one LIST)


def vtab_config(cfg, checkpoint: str = "") -> VtabConfig:
    """The evaluation config of a checkpoint of this run: the `eval.protocol` preset with the
    section's tasks, data and sizes; the evaluations under `<run.storage>/vtab` (vit-vtab's
    default place beside the default run storage). Raises ValueError on a bad name."""
    e = cfg.eval
    if e.protocol not in PRESETS:
        raise ValueError(f"eval.protocol {e.protocol!r} is not a vit-vtab preset; use one of "
                         f"{', '.join(sorted(PRESETS))}")
    root = cfg.run.storage or "~/vit-runs"
    out = storage.join(root, "vtab") if storage.is_s3(root) else \
        os.path.join(os.path.expanduser(root), "vtab")
    sets = [f"sweep.tasks={','.join(e.tasks)}", f"sweep.test_images={e.test_images}",
            f"data.uri={e.data or os.environ.get('VTAB_DATA', '~/vtab-1k')}",
            f"run.storage={out}"]
    if e.resolution:
        sets.append(f"finetune.resolution={e.resolution}")
    if checkpoint:
        sets.append(f"run.checkpoint={checkpoint}")
    try:
        return absolute_paths(apply_overrides(PRESETS[e.protocol](), sets))
    except ValueError as err:
        raise ValueError(f"{err} (the eval section of the pretraining config)") from None


def check(cfg) -> VtabConfig | None:
    """Before Ray starts: the protocol and tasks exist, the VTAB-1k folder holds every task
    (eval/data.py's checks), the resolution fits the model. Raises ValueError or
    TaskDataError; None when the section asks for no evaluation."""
    from eval.data import check_task
    from eval.tasks import BY_NAME

    if not cfg.eval.enabled:
        return None
    vc = vtab_config(cfg)
    storage.check_filled_in(vc.data.uri, "eval.data")
    patch = cfg.model.effective_patch_size
    if vc.finetune.resolution < patch:
        raise ValueError(f"eval.resolution {vc.finetune.resolution} is below the model's patch "
                         f"size {patch}")
    for name in vc.sweep.tasks:
        check_task(vc.data.uri, BY_NAME[name])
    return vc


def evaluate_checkpoint(vc: VtabConfig, mlflow: bool) -> str:
    """Run the evaluation `vc` here; -> one line saying how it went. Interrupts pass
    through; any other failure becomes the line."""
    from eval.evaluate import evaluate

    try:
        doc, where = evaluate(vc, mlflow=mlflow)
    except Exception as err:  # noqa: BLE001 - training's result stands; say why in one line
        from pipeline import interrupt

        if interrupt.received():
            raise interrupt.Interrupted(interrupt.received()) from None
        return _failed_line(vc.run.checkpoint, err)
    return _done_line(vc.run.checkpoint, doc, where)


def _failed_line(checkpoint: str, err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return (f"warning: VTAB evaluation of {checkpoint} failed: "
            f"{lines[-1] if lines else type(err).__name__}")


def _done_line(checkpoint: str, doc: dict, where: list[str]) -> str:
    s = doc["summary"]
    return (f"VTAB-1k ({doc['settings']['protocol']}) of {checkpoint}: mean {s['mean']:.2f}; "
            f"{where[0]}")


def _reported(vc: VtabConfig) -> bool:
    """The evaluation has finished: its report is written (eval/report.py, last)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(storage.join(vc.root, "vtab.json"))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _remote_evaluate(vc: VtabConfig, mlflow: bool, tracking_uri: str, log_level: str) -> str:
    """The evaluation in a Ray task on a cluster node, whose process does not inherit the
    driver's environment: the driver's MLflow store and log level are set here, as the
    command sets them (this worker process serves this job alone, so the settings cannot
    reach another's)."""
    from pipeline import cli

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    cli.configure_logging(log_level)      # also: no MLflow "View run" lines
    return evaluate_checkpoint(vc, mlflow)


class Handoff:
    """The evaluations of one pretraining start. `start()` before training, `finish(final)`
    after it: -> the lines to print. `on_cluster`: evaluate during training (Ray tasks);
    else every evaluation runs after training, here."""

    def __init__(self, cfg, run_uri: str, on_cluster: bool, mlflow: bool):
        self.cfg, self.run_uri, self.on_cluster, self.mlflow = cfg, run_uri, on_cluster, mlflow
        self.queued: list[str] = []      # checkpoints seen, in order
        self.refs: list = []             # their Ray tasks (cluster)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: set[str] = set()

    def start(self) -> None:
        if not self.cfg.eval.vtab_every:
            return
        self._thread = threading.Thread(target=self._watch, name="vtab-handoff", daemon=True)
        self._thread.start()

    def _checkpoints(self) -> list[str]:
        from pipeline.weights.integrity import complete_checkpoints

        try:
            return list(complete_checkpoints(self.run_uri))
        except Exception as err:  # noqa: BLE001 - a storage hiccup: try at the next poll
            log.debug("listing %s: %s", self.run_uri, err)
            return []

    def due(self, uri: str) -> bool:
        """Every `vtab_every`-th checkpoint the run wrote (by count, integrity.vtab_due),
        unless its evaluation has a report already (an earlier start's). Raises OSError (and
        the like) where the checkpoint cannot be read now."""
        from pipeline.weights.integrity import read_state, vtab_due

        if not vtab_due(read_state(uri), self.cfg.eval.vtab_every):
            return False
        return not _reported(vtab_config(self.cfg, uri))

    def _poll(self) -> None:
        for uri in reversed(self._checkpoints()):        # oldest first
            if uri in self._seen:
                continue
            try:
                due = self.due(uri)
            except Exception as err:  # noqa: BLE001 - gone (retention) or a hiccup: next poll
                log.debug("reading %s: %s", uri, err)
                continue
            self._seen.add(uri)
            if due:
                self._queue(uri)

    def _queue(self, uri: str) -> None:
        self.queued.append(uri)
        if self.on_cluster:
            import ray

            from pipeline import tracking

            log.info("VTAB-1k evaluation of %s queued on the cluster", uri)
            task = ray.remote(num_cpus=0, max_retries=0)(_remote_evaluate)
            self.refs.append(task.remote(
                vtab_config(self.cfg, uri), self.mlflow, tracking.default_tracking_uri(),
                logging.getLevelName(log.getEffectiveLevel())))

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def finish(self, final: str | None) -> list[str]:
        """After training: the checkpoints not yet seen, then the final one (`at_end`); waits
        for every evaluation. -> one line per evaluation."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._poll()
        lines = self._wait() if self.refs else []
        todo = [] if self.on_cluster else list(self.queued)
        if self.cfg.eval.at_end and final and final not in self.queued:
            todo.append(final)
        for uri in todo:
            log.info("VTAB-1k evaluation of %s", uri)
            lines.append(evaluate_checkpoint(vtab_config(self.cfg, uri), self.mlflow))
        return lines

    def _wait(self) -> list[str]:
        """The cluster's evaluations, in order. Ctrl-C cancels them (KeyboardInterrupt in
        each task: its runs are marked KILLED, its finished trials kept) and raises
        Interrupted once they have ended."""
        import ray

        from pipeline import interrupt

        def cancel():
            for ref in self.refs:
                ray.cancel(ref)

        lines = []
        # Deferred: a signal inside ray.get (C++) would come back mangled (see interrupt).
        with interrupt.deferred(cancel):
            for uri, ref in zip(self.queued, self.refs, strict=False):
                try:
                    lines.append(ray.get(ref))
                except ray.exceptions.RayError as err:
                    lines.append(_failed_line(uri, err))
        if interrupt.received():
            raise interrupt.Interrupted(interrupt.received(), "evaluations stopped; the same "
                                        "command resumes them")
        return lines
