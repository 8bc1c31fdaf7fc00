"""The driver side of a VTAB-1k evaluation: validate everything, start Ray and the MLflow
parent run, run the sweep, write the report. `eval/vtab.py` only parses and calls `evaluate`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from eval import report
from eval.config import VtabConfig
from eval.data import TaskDataError
from eval.errors import SweepError
from eval.finetune import FinetuneError
from eval.records import check_records
from eval.sweep import run
from eval.tasks import BY_NAME
from eval.trial import check_data, load_pretrained
from pipeline import cli, interrupt, resources, storage, timeline
from pipeline.data.shards import DatasetError
from pipeline.storage import StorageError
from pipeline.weights import CheckpointError, resolve_checkpoint

log = logging.getLogger("eval.vtab")

USER_ERRORS = (SweepError, CheckpointError, TaskDataError, DatasetError, StorageError,
               FinetuneError)


def evaluate(cfg: VtabConfig, reference: str | None = None, address: str | None = None,
             mlflow: bool = True) -> tuple[dict, list[str]]:
    """Run (or resume) the evaluation; -> (report document, lines saying where things are).
    `mlflow` False (--no-mlflow): the report files only."""
    import ray

    from pipeline import tracking

    # Everything a user can get wrong fails here, before Ray starts a trial.
    if not ray.is_initialized() and (why := cli.temp_dir_problem(address)):
        raise SweepError(why)                          # a local Ray could not start there
    cfg = cfg.updated({"run.checkpoint": resolve_checkpoint(cfg.run.checkpoint)})
    pretrained = load_pretrained(cfg)
    sizes = check_data(cfg)
    log.info("checkpoint %s: %s, %d px; %d task(s) checked: %s", cfg.run.checkpoint,
             pretrained.config.get("hidden_size"), pretrained.config["image_size"],
             len(sizes), ", ".join(f"{t} ({s['train800val200']}/{s['test']})"
                                   for t, s in sizes.items()))
    unofficial = [f"{t} ({s['train800']}/{s['val200']}/{s['test']})" for t, s in sizes.items()
                  if (s["train800"], s["val200"], s["test"]) != (800, 200,
                                                                 BY_NAME[t].test_size)]
    if unofficial:
        log.warning("not the official VTAB-1k splits (train800/val200/test sizes): %s; the "
                    "numbers are not comparable with published ones", ", ".join(unofficial))
    if storage.is_s3(cfg.root):
        storage.check_bucket(cfg.root)
    check_records(cfg)

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    tracking_uri = tracking.default_tracking_uri()
    parent = report.start_parent(tracking_uri, cfg, pretrained.metadata) if mlflow else None

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        repo = str(Path(__file__).resolve().parents[1])
        # No address: a new local Ray ("local"), never a stray `ray start` cluster that
        # ray.init() would otherwise attach to (or a dead one it would wait for).
        interrupt.ray_init(configure_logging=False, log_to_driver=True,
                           **cli.ray_init_args(address, **({} if address else
                                                           {"PYTHONPATH": repo})))
    timeline.mark("driver.ray_ready")
    if cfg.sweep.gpus_per_trial and not ray.cluster_resources().get("GPU"):
        log.info("the Ray cluster has no GPU: trials run on CPU (%s CPU each)",
                 f"{cfg.sweep.cpus_per_trial:g}")
        cfg = cfg.updated({"sweep.gpus_per_trial": 0.0})
    try:
        check_fits(cfg)
        outcome = run(cfg, pretrained)
    except BaseException as err:
        if parent:
            # KeyboardInterrupt: a Ray task's cancellation (eval/handoff.py on a cluster).
            interrupted = isinstance(err, (interrupt.Interrupted, KeyboardInterrupt)) or \
                interrupt.received()
            tracking.finish_run(tracking_uri, parent, "KILLED" if interrupted else "FAILED")
        if interrupt.received() and not address and not os.environ.get("RAY_ADDRESS"):
            ray.shutdown()           # the local Ray this command started goes with it
        raise
    doc = report.build(cfg, outcome, pretrained.metadata, reference,
                       dropout=pretrained.config["dropout"])
    doc["split_sizes"], doc["official_splits"] = sizes, not unofficial
    local = Path(cfg.root) if not storage.is_s3(cfg.root) else \
        Path(tempfile.mkdtemp(prefix="vtab-report-"))
    files = report.write(doc, cfg.root, local)
    where = [f"report: {storage.join(cfg.root, 'vtab.txt')} (.csv .json .png beside it)"]
    if parent:
        try:
            report.log_results(tracking_uri, parent, doc, files)
            where.append(f"MLflow run: {parent} (experiment "
                         f"{tracking.experiment_name(report.EXPERIMENT)!r}, one nested run "
                         f"per task)")
            where.append(f"  open it:  {tracking.how_to_open(tracking_uri, parent)}")
        except Exception as err:  # noqa: BLE001
            print(f"warning: could not log to MLflow ({type(err).__name__}); the report files "
                  f"are complete", file=sys.stderr)
    return doc, where


def check_fits(cfg: VtabConfig) -> None:
    """One trial must fit a node, or Tune keeps it pending forever (pipeline.resources)."""
    sweep = cfg.sweep
    bundle = {"CPU": sweep.cpus_per_trial,
              **({"GPU": sweep.gpus_per_trial} if sweep.gpus_per_trial else {})}
    each = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    try:
        resources.ensure_fits([bundle], 0.0, what=f"trials of {each} each",
                              fix="lower --cpus-per-trial / --gpus-per-trial",
                              wait_s=sweep.wait_for_resources_s)
    except resources.DoesNotFit as err:
        raise SweepError(str(err)) from None
