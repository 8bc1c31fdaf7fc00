"""What `vit-pretrain` checks before Ray starts: the inputs a user can get wrong, refused with
one line in a second or two instead of after the 5-20 s a Ray start takes.

    storage    --out (run.storage) is a folder that can be written, not a file nor under
               one, and so is the run folder in it; on S3, the bucket exists (one HEAD)
    data       the dataset's manifest.json, the split (it has shards with samples), the
               number of classes, and the split's shards there (one listing of the folder)
    start      where the run starts from, in the resume order (`checkpoints.resume_point`):
               this run's own checkpoint with an unchanged config; else `--resume`, a
               complete training checkpoint of this architecture; else `--init`, weights a
               format reads and whose architecture matches (`weights.registry.peek`)
    MLflow     a tracking server that does not answer within 2 s: one warning; the run asks
               it again when it starts, and goes on without it if it still does not answer
               (metrics kept in the run folder, sent by the next start of this run); one
               that refuses the credentials (HTTP 401): refused

Cheap on purpose: on S3 a HEAD, a listing and the small JSON files, never a shard or a
weights file; nothing is created or written (a refused start leaves no run folder). Nothing
is unpickled: the same readers as loading (safetensors headers, JSON, DCP metadata through
its allow-list). What needs the cluster (a node-local --out or MLflow store on several
nodes, resources that cannot fit) and what costs real time (the SHA-256 of a --resume
checkpoint, loading the --init weights) stays in `run.pretrain`, which takes what was done
here (`Checked`) and does not do it again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline import storage, tracking
from pipeline.data.reader import DataError
from pipeline.data.shards import DatasetError
from pipeline.train import checkpoints
from pipeline.train.config import PretrainConfig
from pipeline.train.run import PretrainError, check_start, storage_root
from pipeline.weights import CheckpointError

log = logging.getLogger("pipeline.train")

# What a refused start raises: each a user's mistake, said in one line.
REFUSALS = (PretrainError, CheckpointError, DatasetError, DataError, storage.StorageError)
TRACKING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Checked:
    """What the checks found, for `run.pretrain(checked=...)`."""

    manifest: dict | None           # the dataset's manifest (None: synthetic data)
    tracking_down: str | None       # why the MLflow server did not answer (None: it did)


def check(cfg: PretrainConfig, resume: str | None = None, init: str | None = None,
          mlflow: bool = True) -> Checked:
    """Run every check; raise one of REFUSALS at the first input that is wrong."""
    root = storage_root(cfg)
    run_uri = storage.join(root, cfg.run.name)
    if storage.is_s3(root):
        storage.check_bucket(root)
    else:
        for folder, what in ((root, "the --out folder"), (run_uri, "the run folder")):
            if why := storage.unwritable(folder, what):
                raise storage.StorageError(why)
    manifest = read_dataset(cfg)
    if manifest is not None:
        from pipeline.data.health import check_shards

        for line in check_shards(manifest, cfg.data.uri, cfg.data.split):
            log.warning("%s", line)
    check_start(cfg, checkpoints.resume_point(run_uri, resume, init), resume, thorough=False)
    down, uri = None, os.environ.get("MLFLOW_TRACKING_URI", "")
    if mlflow and not (down := tracking_problem(uri)) and \
            (refused := tracking.access_refusal(uri, TRACKING_TIMEOUT_S)):
        raise PretrainError(refused)
    if down:
        log.warning("MLflow server %s does not answer (%s); training goes on, and if it "
                    "still does not when the run starts, its metrics are kept in the run "
                    "folder and sent by the next start of this run",
                    tracking.redact(os.environ["MLFLOW_TRACKING_URI"]), down)
    return Checked(manifest, down)


def read_dataset(cfg: PretrainConfig) -> dict | None:
    """The manifest of the training data, checked for the split and the number of classes
    (None for synthetic data)."""
    from pipeline.data.plan import StreamPlan
    from pipeline.data.shards import read_manifest

    d, m = cfg.data, cfg.model
    if d.source == "synthetic":
        return None
    manifest = read_manifest(d.uri)
    StreamPlan.from_manifest(manifest, d.split, cfg.train.seed)     # the split has samples
    if manifest["num_classes"] > m.num_classes and cfg.train.objective != "mpp":
        raise PretrainError(f"the dataset has {manifest['num_classes']} classes but "
                            f"model.num_classes={m.num_classes}; set model.num_classes")
    return manifest


def tracking_problem(uri: str, timeout_s: float = TRACKING_TIMEOUT_S) -> str | None:
    """Why an http(s) MLflow server does not answer within `timeout_s`, or None; None too
    for a local store. Any HTTP answer counts (a 401 or 404 is a server, and `open_run` says
    what is wrong with the settings), except a gateway's 502-504: the proxy in front of the
    server answered, not the server."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} from a gateway" if err.code in (502, 503, 504) else None
    except Exception as err:  # noqa: BLE001 - refused, unresolvable, timed out: one line
        reason = getattr(err, "reason", err)
        return tracking.redact(str(reason).splitlines()[0][:120] if str(reason)
                               else type(err).__name__)
    return None
