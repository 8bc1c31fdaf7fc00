"""The record of finished trials: one JSON file per phase in the evaluation's storage, written
by the driver as each trial finishes, so that the same command after an interruption runs
only the trials that did not finish (eval/sweep.py). Plain JSON, because Tune's own restore
unpickles state that anyone who can write the storage could plant.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from eval.errors import SweepError
from pipeline import storage

if TYPE_CHECKING:
    from eval.config import VtabConfig

log = logging.getLogger("eval.vtab")


def trial_record(phase: str, conf: dict, metrics: dict, error: str | None) -> dict:
    """One finished trial, as `run_phase` returns it and the record file keeps it (`curve`:
    its loss, lr and val200 top-1 over steps, eval/trial.py's Curve; None if unknown)."""
    try:
        curve = json.loads(metrics["curve"]) if metrics.get("curve") else None
    except ValueError:
        curve = None
    return {"phase": phase, **conf, "top1": metrics.get("top1"),
            "diverged": bool(metrics.get("diverged", False)),
            "error": error or metrics.get("error"),
            "train_time_s": metrics.get("train_time_s"),
            "images_per_s": metrics.get("images_per_s"),
            "micro_batch_size": metrics.get("micro_batch_size"),
            "started_at": metrics.get("started_at"),
            # The trial's own clock; Tune's `timestamp` (whole seconds) in older records.
            "finished_at": metrics.get("finished_at") or metrics.get("timestamp"),
            "trial_id": metrics.get("trial_id"), "curve": curve,
            # protocol linear (eval/linear.py): the L2 regulariser chosen on val200
            **({"l2": metrics["l2"]} if "l2" in metrics else {})}


def combo_name(conf: dict) -> str:
    """A trial's name and key: `<task>-lr<lr>-seed<seed>` (also its Tune folder)."""
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
        self.trials = {combo_name(t): t for t in trials}
        return dict(self.trials)

    def add(self, record: dict) -> None:
        self.trials[combo_name(record)] = record
        doc = {"phase": self.phase, "settings": self.settings,
               "trials": list(self.trials.values())}
        try:
            storage.write_bytes(self.uri, json.dumps(doc, indent=1).encode())
        except (storage.StorageError, OSError) as err:
            log.warning("could not record the finished trial %s (%s); a rerun would run it "
                        "again", combo_name(record), str(err).splitlines()[0][:160])

    def callback(self):
        """A Tune callback that adds each trial when its final result (with `top1`) comes
        in, before Tune's own loggers write it."""
        from ray import tune

        record = self

        class Record(tune.Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                if "top1" in result:
                    record.add(trial_record(record.phase, trial.config["trial"], result,
                                            None))

        return Record()


def check_records(cfg: VtabConfig) -> None:
    """Read the records of finished trials an earlier run left (before Ray starts): one
    that is not ours, or one of other settings, stops the evaluation here."""
    for phase in ("select", "final"):
        TrialRecord(cfg, phase).read()
