"""MLflow tracking that never stops training.

`MLFLOW_TRACKING_URI` chooses the server; without it, runs go to a local SQLite store
(`sqlite:///<storage>/mlflow.db`) that needs no setup. The run is created once, on the
driver (`start_run`), and rank 0 logs to it by id (`Tracker`), so a restarted worker group
keeps logging into the same run.

If the tracking server goes away, `Tracker` warns once, keeps training, buffers the
metrics, retries every `retry_every_s`, and flushes them when the server is back; what is
still unsent at the end is written to `pending_metrics.jsonl` beside the checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")


def default_tracking_uri(storage_root: str) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(storage_root).expanduser().resolve() / 'mlflow.db'}"


def how_to_open(tracking_uri: str) -> str:
    """What a person runs or opens to see the runs of `tracking_uri`."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {redact(tracking_uri)} in a browser"
    return f"mlflow ui --backend-store-uri {redact(tracking_uri)}"


def redact(value: str) -> str:
    """Strip credentials from URIs (scheme://user:pass@host -> scheme://host)."""
    if "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return value


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 \
            else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(tracking_uri: str, experiment: str, run_name: str, artifact_root: str | None,
              params: dict, tags: dict, continuing: bool = False) -> str:
    """Create the MLflow run, or, when `continuing` a run that has checkpoints, find the
    latest run of that name and log into it again; -> run id. Params are logged on
    creation; values are stringified and secrets never included."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_root)
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], f"tags.`vit.run_name` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if continuing and found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s (%s)", run_id, run_name)
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={**tags, "vit.run_name": run_name})
    items = [(k, _param(v)) for k, v in params.items()
             if not any(w in k.upper() for w in SECRET_WORDS)]
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    return run.info.run_id


def _param(v) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s[:6000]


class Tracker:
    """Rank-0 metric logging into an existing run, resilient to a tracking server outage."""

    def __init__(self, tracking_uri: str, run_id: str, spill_uri: str | None = None,
                 retry_every_s: float = 30.0):
        from mlflow.tracking import MlflowClient

        # Fail fast and retry ourselves: MLflow's own retries (7, exponential backoff) would
        # block a training step for minutes while the server is away. This runs on rank 0,
        # whose only MLflow traffic is this tracker's.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        self.client = MlflowClient(tracking_uri)
        self.run_id, self.spill_uri = run_id, spill_uri
        self.retry_every_s = retry_every_s
        self.pending: list[tuple[str, float, int, int]] = []
        self.down_since: float | None = None
        self.last_try = 0.0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.pending += [(k, float(v), step, ts) for k, v in metrics.items()]
        now = time.monotonic()
        if self.down_since is not None and now - self.last_try < self.retry_every_s:
            return
        self.flush()

    def flush(self) -> bool:
        from mlflow.entities import Metric

        self.last_try = time.monotonic()
        try:
            while self.pending:
                chunk = self.pending[:1000]
                self.client.log_batch(self.run_id, metrics=[
                    Metric(k, v, ts, s) for k, v, s, ts in chunk])
                del self.pending[:len(chunk)]
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop training
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("MLflow tracking unavailable (%s: %s); training continues and "
                            "metrics are kept until it is back", type(err).__name__,
                            str(err).splitlines()[0][:120] if str(err) else "")
            return False
        if self.down_since is not None:
            log.warning("MLflow tracking is back after %.0f s; buffered metrics sent",
                        time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        try:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
        except Exception as err:  # noqa: BLE001
            log.warning("could not set MLflow tags: %s", type(err).__name__)

    def log_text(self, text: str, name: str) -> None:
        try:
            self.client.log_text(self.run_id, text, name)
        except Exception as err:  # noqa: BLE001
            log.warning("could not log MLflow artifact %s: %s", name, type(err).__name__)

    def close(self) -> None:
        """Final flush; what the server did not take is written to `spill_uri` (local or
        s3://) as JSON lines, so no metric is lost."""
        if self.flush() or not self.pending:
            return
        from pipeline import storage

        lines = "".join(json.dumps({"run_id": self.run_id, "key": k, "value": v, "step": s,
                                    "timestamp": ts}) + "\n" for k, v, s, ts in self.pending)
        target = storage.join(self.spill_uri or ".", f"pending_metrics-{int(time.time())}.jsonl")
        storage.write_bytes(target, lines.encode())
        log.warning("MLflow still unavailable: %d metric values written to %s",
                    len(self.pending), target)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001
        log.warning("could not close MLflow run %s: %s", run_id, type(err).__name__)
