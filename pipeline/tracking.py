"""The pipeline's MLflow: the store, run creation with MLflow's standard tags, the VTAB
parent, task and trial runs, dataset inputs, system metrics, the queries comparisons make,
and metric buffering that never stops training. The model registry and what VTAB results
write back into pretraining runs: pipeline/registry.py.

One store for every command: `MLFLOW_TRACKING_URI`, else the local SQLite store
`~/vit-runs/mlflow.db` (artifacts in `~/vit-runs/mlartifacts`), whatever `--out` a run
writes its checkpoints to, so evaluations and comparisons find every run.
`MLFLOW_EXPERIMENT_NAME` replaces the default experiment names, as in MLflow itself.

The run is created once, on the driver (`start_run`), and rank 0 logs to it by id
(`Tracker`), so a restarted worker group keeps logging into the same run.

If the tracking server goes away, `Tracker` warns once, keeps training, buffers the
metrics, retries every `retry_every_s`, and flushes them when the server is back; what is
still unsent at the end is written to `pending_metrics.jsonl` beside the checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")


LOCAL_ROOT = "~/vit-runs"          # the local store when MLFLOW_TRACKING_URI is not set
GIT_COMMIT_ENV = "VIT_GIT_COMMIT"  # the commit, set by the submitting side (infra/submit.sh)


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else the one local store: sqlite:///~/vit-runs/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(LOCAL_ROOT).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite store (so
    ~/vit-runs/mlartifacts for the default); the store's or the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None                    # a folder store keeps them itself; a server chooses


def experiment_name(default: str) -> str:
    """`MLFLOW_EXPERIMENT_NAME` when set, else `default`."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or default


def standard_tags(source: str | None = None) -> dict[str, str]:
    """MLflow's own run-context tags (mlflow.user, mlflow.source.name / type) and the git
    commit (mlflow.source.git.commit), which under `ray job submit` (no .git in the uploaded
    working dir) comes from VIT_GIT_COMMIT, set where the job was submitted."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = dict(resolve_tags({}))
    if source:
        tags["mlflow.source.name"] = source
    # A `ray job submit` entrypoint gets its job config in this variable.
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        tags["mlflow.source.type"] = "JOB"
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    tags["git_commit"] = commit
    return tags


def how_to_open(tracking_uri: str, run_id: str | None = None) -> str:
    """What a person runs or opens to see the runs of `tracking_uri`, with the run's page
    where `run_id` is given. The link asks for MLflow 3's model-training view: its UI opens
    in GenAI mode in a browser that has not chosen one (the mode is the browser's, kept
    in its local storage, which the experiment's kind tag does not override in 3.17)."""
    page = f"#/?{ML_VIEW}"
    if run_id:
        try:
            exp = client(tracking_uri).get_run(run_id).info.experiment_id
            page = f"#/experiments/{exp}/runs/{run_id}?{ML_VIEW}"
        except Exception:  # noqa: BLE001 - the store's address is still worth printing
            pass
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {redact(tracking_uri).rstrip('/')}/{page} in a browser"
    return (f"mlflow ui --backend-store-uri {redact(tracking_uri)}, then "
            f"http://127.0.0.1:5000/{page}")


ML_VIEW = "workflowType=machine_learning"


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")


def redact(value: str) -> str:
    """Strip credentials from every URI in `value` (scheme://user:pass@host -> scheme://host):
    a URI alone, or a message that quotes one (MLflow's errors name the request URL)."""
    return _USERINFO.sub(r"\1", value)


def _unauthorized(tracking_uri: str) -> str:
    """The line for an HTTP 401: no credentials, or credentials the server does not take."""
    from urllib.parse import urlsplit

    server = f"MLflow server {redact(tracking_uri)}"
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or urlsplit(tracking_uri).username
    if not user and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return (f"{server} refused a request without credentials (HTTP 401): set "
                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of it")
    return (f"{server} refused the credentials{f' of user {user!r}' if user else ''} "
            f"(HTTP 401): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


def access_refusal(tracking_uri: str, timeout_s: float = 2.0) -> str | None:
    """`refusal`'s line for a server that does not take this process's credentials (HTTP
    401), found with one request before anything starts, or None: any other answer, or none
    (what else is wrong, the run's own requests say), a local store, and credentials that an
    MLflow plugin supplies (MLFLOW_TRACKING_AUTH). The request carries what MLflow's client
    would send: user:password in the URI, else MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, else MLFLOW_TRACKING_TOKEN. Only a 401: a 403 may be this
    request's own (no permission on the experiment it names), not the run's."""
    import base64
    import urllib.error
    import urllib.request
    from urllib.parse import quote, urlsplit, urlunsplit

    if not tracking_uri.startswith(("http://", "https://")) or \
            os.environ.get("MLFLOW_TRACKING_AUTH"):
        return None
    parts = urlsplit(tracking_uri)
    user, password = parts.username, parts.password
    if user is None:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {}
    if user:
        pair = f"{user}:{password or ''}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
    elif token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    url = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1],
                      parts.path.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name",
                      f"experiment_name={quote('Default')}", ""))
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                               timeout=timeout_s).close()
    except urllib.error.HTTPError as err:
        return _unauthorized(tracking_uri) if err.code == 401 else None
    except Exception:  # noqa: BLE001 - no answer: the caller's reachability check says so
        return None
    return None


def refusal(err: Exception, tracking_uri: str) -> str | None:
    """One line when the tracking server refused the request itself (HTTP 401: missing or
    wrong credentials; 403: no permission, or a host name the server does not serve), None
    for anything else. A refusal is a setting to fix: unlike an outage, waiting never ends it."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return None
    status, server = err.get_http_status_code(), f"MLflow server {redact(tracking_uri)}"
    if status == 401:
        return _unauthorized(tracking_uri)
    if status == 403:
        reason = str(err.message).rsplit("Response body: ", 1)[-1].strip("' \n")
        reason = redact(reason.splitlines()[0][:160]) if reason else "permission denied"
        return (f"{server} refused the request (HTTP 403: {reason}): the account in "
                f"MLFLOW_TRACKING_USERNAME needs permission, or the server must allow this "
                f"host name (infra/mlflow/compose.yaml: MLFLOW_ALLOWED_HOSTS)")
    return None


def set_terminated(client, tracking_uri: str, run_id: str, status: str = "FINISHED",
                   end_time: int | None = None) -> None:
    """End a run. MLflow then prints "View run <name> at: <URL>", the URL built from the
    tracking URI as given, user:password included (mlflow/tracking/_tracking_service/
    client.py, `_log_url`); with credentials in the URI the line is left out (the commands
    print where their runs are, redacted)."""
    if redact(tracking_uri) == tracking_uri:
        client.set_terminated(run_id, status=status, end_time=end_time)
        return
    key = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    saved = os.environ.get(key)
    os.environ[key] = "true"
    try:
        client.set_terminated(run_id, status=status, end_time=end_time)
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def git_commit() -> str:
    """This checkout's commit ("-dirty" with uncommitted changes); VIT_GIT_COMMIT wins (the
    submitting side's, where the job's copy has no .git); "unknown" otherwise."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
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


# MLflow 3's UI opens an experiment on its GenAI pages (traces) unless the experiment says it
# is for model training: the tag its "experiment type" selector sets (mlflow/server/js,
# `mlflow.experimentKind`; the values are ExperimentKind's).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The experiment's id, created when missing; either way marked as a model-training
    experiment unless someone chose its kind already."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(tracking_uri),
                                            tags=dict([EXPERIMENT_KIND]))
        except MlflowException as err:      # another run, starting at the same time, made it
            exp = client.get_experiment_by_name(name)
            if exp is None or err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    if EXPERIMENT_KIND[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              continuing: bool = False, source: str | None = None) -> str:
    """Create the MLflow run in `experiment` (or MLFLOW_EXPERIMENT_NAME), with MLflow's
    standard tags and `tags`, or, when `continuing` a run that has checkpoints, find the
    latest run of that name and log into it again; -> run id. Params are logged on
    creation; values are stringified and secrets never included."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment_name(experiment), tracking_uri)
    found = client.search_runs([exp_id], f"tags.`vit.run_name` = '{run_name}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if continuing and found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s (%s)", run_id, run_name)
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={
        **standard_tags(source), **tags, "vit.run_name": run_name})
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
    """Rank-0 metric logging into an existing run, resilient to a tracking server outage.
    With `run_id` None (MLflow was down when the run started, so it has no MLflow run yet)
    it only keeps the metrics: `save` writes them to the spill at each checkpoint, and the
    next start of the run imports them (`import_spills`)."""

    def __init__(self, tracking_uri: str, run_id: str | None, spill_uri: str | None = None,
                 retry_every_s: float = 30.0, flush_every_s: float = 0.0):
        from mlflow.tracking import MlflowClient

        # Fail fast and retry ourselves: MLflow's own retries (7, exponential backoff) would
        # block a training step for minutes while the server is away. This runs on rank 0,
        # whose only MLflow traffic is this tracker's.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        self.client = MlflowClient(tracking_uri)
        self.run_id, self.spill_uri = run_id, spill_uri
        self.retry_every_s = retry_every_s
        # Send at most this often (0: at every call); `close` and `save` send the rest.
        self.flush_every_s = flush_every_s
        self.pending: list[tuple[str, float, int, int]] = []
        self.pending_params: dict[str, str] = {}
        self.constants: dict[str, float] = {}     # CONSTANTS' first values
        self.changed: set[str] = set()            # CONSTANTS that changed after all
        self.down_since: float | None = None
        # Never tried: the first call sends. (Not 0.0: time.monotonic() counts from boot,
        # and on a machine up for less than `flush_every_s` nothing was sent; CI.)
        self.last_try = -math.inf
        self.logged_through = self._logged_steps()

    def _logged_steps(self) -> dict[str, int]:
        """{metric: the last step the run has for it}. A run continued from a checkpoint
        retrains the steps after it, which the run may already hold (it was stopped, or
        lost a worker, after logging them): those are not logged twice. (A resumed run
        retraces them exactly, so the values already there are the ones it would log.)"""
        if self.run_id is None:
            return {}
        try:
            run = self.client.get_run(self.run_id)
        except Exception:  # noqa: BLE001 - the server may be down: nothing to skip then
            return {}
        return {m.key: m.step for m in run.data._metric_objs}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        metrics = self._constants(metrics)
        ts = int(time.time() * 1000)
        self.pending += [(k, float(v), step, ts) for k, v in metrics.items()
                         if step > self.logged_through.get(k, -1)]
        now = time.monotonic()
        wait = self.retry_every_s if self.down_since is not None else self.flush_every_s
        if now - self.last_try < wait:
            return
        self.flush()

    def _constants(self, metrics: dict[str, float]) -> dict[str, float]:
        """CONSTANTS' values become params (a line on a chart says nothing); one that
        changes stays a metric, with a warning, where the change shows."""
        out = dict(metrics)
        for key, param in CONSTANTS.items():
            if key not in out:
                continue
            value = out.pop(key)
            first = self.constants.setdefault(key, value)
            if first == value and key not in self.changed:
                self.pending_params.setdefault(param, f"{value:g}")
                continue
            if key not in self.changed:               # warn once, at the first change
                log.warning("%s changed from %g to %g; logged as a metric from here on",
                            key, first, value)
                self.changed.add(key)
            out[key] = value
        return out

    def note_start(self, step: int) -> None:
        """This (re)start's step, appended to the run's tag `start_steps` ("0,150": started
        at step 0, restarted from the checkpoint of step 150). Best effort: an outage here
        loses the note, never a metric."""
        if self.run_id is None:
            return
        try:
            steps = start_steps(self.client.get_run(self.run_id)) + [step]
            self.client.set_tag(self.run_id, START_STEPS, ",".join(map(str, steps)))
        except Exception as err:  # noqa: BLE001 - a note must not stop training
            log.warning("could not note the start step in MLflow: %s", type(err).__name__)

    def _send_params(self) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if not self.pending_params:
            return
        try:
            self.client.log_batch(self.run_id, params=[
                Param(k, v) for k, v in self.pending_params.items()])
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":
                raise                       # an outage: flush keeps them for the next try
            # A continued run whose param differs (MLflow keeps a param's first value).
            log.warning("MLflow kept the run's earlier value of %s: %s",
                        ", ".join(self.pending_params), redact(str(err.message))[:160])
        self.pending_params = {}

    def flush(self) -> bool:
        from mlflow.entities import Metric

        self.last_try = time.monotonic()
        if self.run_id is None:
            return False
        try:
            self._send_params()
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
                            redact(str(err).splitlines()[0])[:120] if str(err) else "")
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

    def save(self) -> None:
        """At a checkpoint: metrics not sent yet go to the server, or where it has not taken
        them to the spill, so that a run killed later loses none of what its checkpoints
        cover."""
        if self.pending and self.run_id is not None and self.down_since is None:
            self.flush()
        if self.pending and (self.run_id is None or self.down_since is not None):
            self._spill()

    def close(self) -> None:
        """Final flush; what the server did not take is written to `spill_uri` (local or
        s3://) as JSON lines, so no metric is lost."""
        if self.flush() or not self.pending:
            return
        self._spill()

    def _spill(self) -> None:
        from pipeline import storage

        lines = "".join(json.dumps({"run_id": self.run_id, "key": k, "value": v, "step": s,
                                    "timestamp": ts}) + "\n" for k, v, s, ts in self.pending)
        target = storage.join(self.spill_uri or ".",
                              f"{SPILL_PREFIX}{time.time_ns()}.jsonl")
        storage.write_bytes(target, lines.encode())
        log.warning("MLflow unavailable: %d metric values written to %s (the next start of "
                    "this run sends them)", len(self.pending), target)
        self.pending = []


SPILL_PREFIX = "pending_metrics-"
# Measured values that must not change in a run (the batch that really went into each step):
# params, named here, unless they change.
CONSTANTS = {"train/images_per_step": "images_per_step"}
START_STEPS = "start_steps"


def start_steps(run) -> list[int]:
    """The steps a run (re)started at, from its tag `start_steps` (Tracker.note_start)."""
    return [int(s) for s in run.data.tags.get(START_STEPS, "").split(",") if s.strip()]


def import_spills(tracking_uri: str, run_id: str, run_uri: str) -> int:
    """Send the metrics a run spilled while MLflow was away (`pending_metrics-*.jsonl` in
    its folder) into `run_id`, steps it already holds excepted, then delete the spills.
    -> values sent."""
    import pyarrow.fs as pafs
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline import storage

    fs, root = storage.filesystem(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return 0
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                   and i.base_name.startswith(SPILL_PREFIX) and i.base_name.endswith(".jsonl"))
    if not names:
        return 0
    client = MlflowClient(tracking_uri)
    have = {m.key: m.step for m in client.get_run(run_id).data._metric_objs}
    sent = 0
    for name in names:
        uri = storage.join(run_uri, name)
        metrics = []
        for line in storage.read_bytes(uri).decode().splitlines():
            try:
                r = json.loads(line)
                m = Metric(str(r["key"]), float(r["value"]), int(r["timestamp"]), int(r["step"]))
            except (ValueError, KeyError, TypeError):
                continue                           # a torn line: the rest still counts
            if m.step > have.get(m.key, -1):
                metrics.append(m)
        metrics.sort(key=lambda m: (m.step, m.timestamp))
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        sent += len(metrics)
        for m in metrics:
            have[m.key] = max(have.get(m.key, -1), m.step)
        fs.delete_file(storage.filesystem(uri)[1])
    log.info("sent %d metric values that this run spilled while MLflow was unavailable",
             sent)
    return sent


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    try:
        set_terminated(MlflowClient(tracking_uri), tracking_uri, run_id, status)
    except Exception as err:  # noqa: BLE001
        log.warning("could not close MLflow run %s: %s", run_id, type(err).__name__)


# ---------------------------------------------------------------------------------------------
# Pretraining: the data as a dataset input and per-node system metrics (the model registry:
# pipeline/registry.py)
# ---------------------------------------------------------------------------------------------
def log_dataset(tracking_uri: str, run_id: str, name: str, uri: str, digest: str | None,
                context: str = "training") -> None:
    """Data as an MLflow dataset input (name, source, digest), its source typed by the
    URI as MLflow types it: `local` for a path, `s3` for s3://, `http` for a URL."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():
        # "can be interpreted in multiple ways": the file and "" schemes both register the
        # one local source, and MLflow warns that it picked it.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    # No digest: MLflow makes one of the source.
    dataset = MetaDataset(source, name=name, digest=digest[:36] if digest else None)
    entity = DatasetInput(dataset._to_mlflow_entity(),
                          tags=[InputTag("mlflow.data.context", context)])
    _unique_race(lambda: MlflowClient(tracking_uri).log_inputs(run_id, datasets=[entity]))


def _unique_race(call, tries: int = 3):
    """`call()`, again where it lost a race on a unique row to another run doing the same
    at the same moment (two runs of one team starting on the same data: the store adds each
    (experiment, name, digest) dataset once, and the loser gets the database's
    unique-constraint error); the next try finds the row."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            return call()
        except MlflowException as err:
            if attempt == tries - 1 or "unique constraint" not in str(err).lower():
                raise
            time.sleep(0.2 * (attempt + 1))


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network; GPU where nvidia-ml-py finds
    one) of this node, logged into `run_id` as system/<node>/... every `interval_s`. One per
    node: the pretraining loop starts it on each node's local rank 0."""

    def __init__(self, tracking_uri: str, run_id: str, node: str, interval_s: float = 10.0):
        self.monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s,
                                                node_id=node, tracking_uri=tracking_uri)
            self.monitor.start()
        except Exception as err:  # noqa: BLE001 - monitoring must not stop training
            log.warning("system metrics unavailable on %s: %s", node, type(err).__name__)
            self.monitor = None

    def stop(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------------
# VTAB-1k: the parent run and one nested run per task
# ---------------------------------------------------------------------------------------------
VTAB_EVAL = "vtab.eval"       # on every run under a VTAB parent: the parent's id


def log_vtab_results(tracking_uri: str, parent_id: str, doc: dict,
                     task_data: dict[str, str] | None = None) -> None:
    """Metrics on the parent (vtab/<task>/top1, the group and overall means); under it one
    nested run per task, each with the same keys (`top1`, `top1_seed`, `val200/lr_<lr>`, so
    MLflow's compare view lines the tasks up in one column) and the task's data
    (`task_data`: task -> its folder or prefix) as a dataset input; under each task one run
    per trial (`<eval>/<task>/<phase>-lr<lr>-seed<seed>`) with its fine-tuning loss, lr and
    val200 top-1 over steps, timed as the trial ran. Runs made before (an earlier attempt
    at this) are found again, not duplicated."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    ts = int(time.time() * 1000)
    metrics = [Metric(f"vtab/{t['task']}/top1", t["top1"], ts, 0) for t in doc["tasks"]]
    metrics += [Metric(f"vtab/{k}", v, ts, 0) for k, v in doc["summary"].items()]
    metrics += [Metric(f"vtab/{k}_std", v, ts, 0) for k, v in doc["summary_std"].items()]
    client.log_batch(parent_id, metrics=metrics)
    parent = client.get_run(parent_id)
    exp_id, name = parent.info.experiment_id, parent.info.run_name
    existing = {r.info.run_name: r.info.run_id for r in client.search_runs(
        [exp_id], f"tags.`{VTAB_EVAL}` = '{parent_id}'", max_results=5000)}
    inherited = {k: v for k, v in parent.data.tags.items()
                 if k.startswith("mlflow.source.") or k == "mlflow.user"}
    trials = {}
    for r in doc.get("trials", []):
        trials.setdefault(r["task"], []).append(r)
    settings = doc.get("settings", {})
    for t in doc["tasks"]:
        mine = trials.get(t["task"], [])
        times = [_trial_times(r, settings) for r in mine]
        run_name = f"{name}/{t['task']}"
        run_id = existing.get(run_name)
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=run_name, start_time=min(
                (a for a, _ in times), default=None), tags={
                    **inherited, "mlflow.parentRunId": parent_id, VTAB_EVAL: parent_id,
                    "vtab.task": t["task"], "vtab.group": t["group"]}).info.run_id
            client.log_batch(run_id, params=[
                Param("task", t["task"]), Param("lr", f"{t['lr']:g}"),
                Param("group", t["group"]), Param("num_classes", str(t["num_classes"])),
                Param("seeds", str(len(t["seeds"])))])
            if task_data and t["task"] in task_data:
                log_dataset(tracking_uri, run_id, f"vtab-1k/{t['task']}",
                            task_data[t["task"]], None, context="evaluation")
        child = [Metric("top1", t["top1"], ts, 0)]
        child += [Metric("top1_seed", v, ts, i) for i, v in enumerate(t["seeds"])]
        child += [Metric(f"val200/lr_{lr}", v, ts, 0) for lr, v in t["val200"].items()
                  if v is not None and v == v]
        client.log_batch(run_id, metrics=child)
        for r, (start, end) in zip(mine, times, strict=True):
            _log_trial(client, tracking_uri, exp_id, f"{run_name}/{_trial_name(r)}", r,
                       (start, end), settings, existing, {
                           **inherited, "mlflow.parentRunId": run_id, VTAB_EVAL: parent_id,
                           "vtab.task": t["task"], "vtab.phase": r["phase"]})
        set_terminated(client, tracking_uri, run_id, "FINISHED",
                       end_time=max((b for _, b in times), default=None))


def _trial_name(r: dict) -> str:
    return f"{r['phase']}-lr{r['lr']:g}-seed{r['seed']}"


def _trial_times(r: dict, settings: dict) -> tuple[int, int]:
    """(start, end) of a trial in ms: as it ran where its record says (older records do
    not), else now."""
    now = int(time.time() * 1000)
    end = int(r["finished_at"] * 1000) if r.get("finished_at") else now
    start = int(r["started_at"] * 1000) if r.get("started_at") else \
        end - int((r.get("train_time_s") or 0) * 1000)
    return min(start, end), end


def _log_trial(client, tracking_uri: str, exp_id: str, run_name: str, r: dict,
               times: tuple[int, int], settings: dict, existing: dict, tags: dict) -> None:
    """One trial's run: its settings as params, its curve (train/loss, train/lr, and
    val200/top1 in the selection phase) over steps, its final top-1 (val200 when selecting,
    test in the final phase) at the last step."""
    from mlflow.entities import Metric, Param

    if run_name in existing:
        return                      # logged whole by an earlier attempt
    start, end = times
    run_id = client.create_run(exp_id, run_name=run_name, start_time=start,
                               tags=tags).info.run_id
    steps = settings.get("steps") or 0
    params = {"task": r["task"], "phase": r["phase"], "lr": f"{r['lr']:g}",
              "seed": str(r["seed"]), "steps": str(steps),
              "batch_size": str(settings.get("batch_size", ""))}
    curve = r.get("curve") or {}

    def at(step: int) -> int:        # a point's time: the trial's time, spread over steps
        return start + (end - start) * step // max(1, steps)

    points = [Metric("train/loss", v, at(s), s) for s, v in zip(
        curve.get("step", []), curve.get("loss", []), strict=False)]
    points += [Metric("train/lr", v, at(s), s) for s, v in zip(
        curve.get("step", []), curve.get("lr", []), strict=False)]
    points += [Metric("val200/top1", v, at(s), s) for s, v in zip(
        curve.get("val_step", []), curve.get("val_top1", []), strict=False)]
    if r.get("top1") is not None and r["top1"] == r["top1"]:
        points.append(Metric("top1", r["top1"], end, steps))
    if r.get("diverged"):
        points.append(Metric("diverged", 1.0, end, steps))
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i:i + 1000])
    set_terminated(client, tracking_uri, run_id, "FINISHED", end_time=end)


def pretrain_tags(meta: dict) -> dict[str, str]:
    """Tags linking a run (VTAB, analysis) to the pretraining run of its checkpoint, from our
    checkpoint metadata (`read_metadata`); {} for imports."""
    tags = {}
    if meta.get("mlflow_run_id"):
        tags["pretrain_run_id"] = meta["mlflow_run_id"]
    if meta.get("run_name"):
        tags["pretrain_run_name"] = str(meta["run_name"])
    if meta.get("step") is not None:
        tags["pretrain_step"] = str(meta["step"])
    return tags


def log_artifacts(tracking_uri: str, run_id: str, paths: list) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path))


# ---------------------------------------------------------------------------------------------
# Comparisons: finding runs, their histories, and the comparison run
# ---------------------------------------------------------------------------------------------
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RunNotFound(ValueError):
    """A run or experiment that cannot be found (one line)."""


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def find_runs(tracking_uri: str, refs: list[str], experiment: str | None = None,
              filter_string: str = "") -> list:
    """Run ids, names (the newest run of that name) or unique prefixes of top-level runs'
    names, in any experiment; then the finished top-level runs of `experiment` (with an
    MLflow filter) -> MLflow runs, in that order, each once."""
    c = client(tracking_uri)
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = [_find_run(c, tracking_uri, ref, experiments) for ref in refs]
    if experiment:
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise RunNotFound(f"no MLflow experiment {experiment!r} in {redact(tracking_uri)}")
        query = " and ".join(x for x in (filter_string, "attributes.status = 'FINISHED'") if x)
        found = c.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"])
        runs += [r for r in found if r.data.tags.get("mlflow.parentRunId") is None]
    seen: set[str] = set()
    return [r for r in runs if not (r.info.run_id in seen or seen.add(r.info.run_id))]


def _find_run(c, tracking_uri: str, ref: str, experiments: list[str]):
    where = redact(tracking_uri)
    if RUN_ID.match(ref):
        try:
            return c.get_run(ref)
        except Exception:  # noqa: BLE001 - not an id after all; try it as a name
            pass
    missing = RunNotFound(f"no MLflow run with id or name {ref!r} in {where}; list them "
                          f"with `mlflow runs list` or the MLflow UI")
    if not experiments:
        raise missing
    quoted = ref.replace("'", "\\'")
    found = c.search_runs(experiments, f"attributes.run_name = '{quoted}'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0]
    # A prefix: LIKE's own wildcards (% and _) in it match more, so check startswith after.
    like = c.search_runs(experiments, f"attributes.run_name LIKE '{quoted}%'",
                         order_by=["attributes.start_time DESC"], max_results=200)
    like = [r for r in like if (r.info.run_name or "").startswith(ref)
            and r.data.tags.get("mlflow.parentRunId") is None]
    names = sorted({r.info.run_name for r in like})
    if len(names) == 1:
        return like[0]
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise RunNotFound(f"{ref!r} begins the names of {len(names)} runs in {where} "
                          f"({shown}); give more of the name")
    raise missing


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, in step order."""
    return sorted((m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key))


def log_comparison(tracking_uri: str, runs: list, name: str, files: list) -> str:
    """A run of the experiment `comparisons` (or MLFLOW_EXPERIMENT_NAME) naming the runs
    compared, with the comparison files; -> its id."""
    from mlflow.entities import Param

    c = client(tracking_uri)
    exp_id = experiment_id(c, experiment_name("comparisons"), tracking_uri)
    run = c.create_run(exp_id, run_name=name[:250], tags={
        **standard_tags("eval/compare.py"), "vit.kind": "comparison",
        "compared_runs": ",".join(r.info.run_id for r in runs)})
    c.log_batch(run.info.run_id, params=[
        Param(f"run_{i}", f"{r.info.run_name or r.info.run_id[:8]} ({r.info.run_id})")
        for i, r in enumerate(runs)])
    for path in files:
        c.log_artifact(run.info.run_id, str(path))
    set_terminated(c, tracking_uri, run.info.run_id, "FINISHED")
    return run.info.run_id


# ---------------------------------------------------------------------------------------------
# Inspections of a checkpoint (jobs/analyze.py)
# ---------------------------------------------------------------------------------------------
def log_analysis(tracking_uri: str, run_name: str, params: dict, tags: dict,
                 metrics: dict[str, list[tuple[int, float]]], files: list) -> str:
    """A finished run of the experiment `analysis` (or MLFLOW_EXPERIMENT_NAME) with the
    inspection's params, per-layer metrics ({key: [(layer, value), ...]}) and files; -> its
    id. `tags` carry the link to the pretraining run (pretrain_run_id) when there is one."""
    from mlflow.entities import Metric, Param

    c = client(tracking_uri)
    exp_id = experiment_id(c, experiment_name("analysis"), tracking_uri)
    run = c.create_run(exp_id, run_name=run_name[:250], tags={
        **standard_tags("jobs/analyze.py"), "vit.kind": "analysis", **tags})
    run_id = run.info.run_id
    ts = int(time.time() * 1000)
    c.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()
                                if not any(w in k.upper() for w in SECRET_WORDS)])
    points = [Metric(key, float(v), ts, step) for key, series in metrics.items()
              for step, v in series]
    for i in range(0, len(points), 1000):
        c.log_batch(run_id, metrics=points[i:i + 1000])
    for path in files:
        c.log_artifact(run_id, str(path))
    set_terminated(c, tracking_uri, run_id, "FINISHED")
    return run_id
