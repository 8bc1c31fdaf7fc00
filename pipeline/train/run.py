"""The driver side of pretraining: resolve storage, data, tracking; build the TorchTrainer;
run it; report where things are. `jobs/pretrain.py` only parses and calls `pretrain`."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.train.config import PretrainConfig

log = logging.getLogger("pipeline.train")

DEFAULT_ROOT = "~/vit-runs"


class PretrainError(RuntimeError):
    """The run stopped for a reason a user must act on (one line)."""


@dataclass
class Outcome:
    checkpoint: str            # URI of the final checkpoint (our format + trainer state)
    step: int
    metrics: dict
    run_id: str | None
    tracking_uri: str
    storage: str


def storage_root(cfg: PretrainConfig) -> str:
    root = cfg.run.storage or DEFAULT_ROOT
    return root if storage.is_s3(root) else str(Path(root).expanduser().resolve())


def ray_storage(root: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    if storage.is_s3(root):
        fs, path = storage.filesystem(root)   # explicit endpoint: see ../shared/docs/ray.md §1.4
        return path, fs
    Path(root).mkdir(parents=True, exist_ok=True)
    return root, None


def latest_checkpoint(root: str, name: str) -> str | None:
    """This run's newest checkpoint directory in storage, if it has one."""
    run_dir = storage.join(root, name)
    try:
        if storage.is_s3(root):
            names = {k.split("/", 1)[0] for k in storage.list_objects(run_dir)}
        else:
            names = {p.name for p in Path(run_dir).iterdir()} if Path(run_dir).is_dir() else set()
    except storage.StorageError:
        return None
    steps = sorted(n for n in names if n.startswith("step_"))
    for candidate in reversed(steps):
        uri = storage.join(run_dir, candidate)
        try:
            storage.read_bytes(storage.join(uri, "train_state.json"))
            return uri
        except storage.StorageError:
            continue
    return None


def samples_seen(checkpoint_uri: str) -> int:
    doc = json.loads(storage.read_bytes(storage.join(checkpoint_uri, "train_state.json")))
    return int(doc["samples_seen"])


def build_data(cfg: PretrainConfig, start_samples: int):
    """-> (train dataset, manifest or None, data-health actor or None, probe set or None)."""

    from pipeline.data import source
    from pipeline.data.transforms import Augment

    d, m = cfg.data, cfg.model
    needed = cfg.train.total_steps * cfg.train.global_batch_size
    if d.source == "synthetic":
        epochs = -(-needed // d.synthetic_samples) + 1
        ds = source.synthetic_dataset(d.synthetic_samples, d.synthetic_classes, m.image_size,
                                      epochs, block_rows=d.block_rows)
        probe = None
        if cfg.train.fewshot_every and d.fewshot_split:
            import numpy as np

            ids = np.arange(min(d.fewshot_images, 50 * d.synthetic_classes)) + 10**9
            rows = source.synthetic_rows(ids, d.synthetic_samples, d.synthetic_classes,
                                         m.image_size)
            probe = {"images": rows["image"], "labels": rows["label"]}
        return ds, None, None, _probe(probe, "synthetic", d.fewshot_shots)
    inp = source.InputConfig(uri=d.uri, split=d.split, augment=Augment(d.augment, m.image_size),
                             seed=cfg.train.seed, strict=d.strict, shuffle_buffer=d.shuffle_buffer,
                             block_rows=d.block_rows, num_cpus_per_read=d.num_cpus_per_read)
    manifest = source.read_manifest(d.uri)
    if manifest["num_classes"] > m.num_classes and cfg.train.objective != "mpp":
        raise PretrainError(f"the dataset has {manifest['num_classes']} classes but "
                            f"model.num_classes={m.num_classes}; set model.num_classes")
    epochs = source.epochs_for(manifest, d.split, needed)
    start = source.position_after(manifest, d.split, cfg.train.seed, start_samples)
    ds, _, health = source.shard_dataset(inp, epochs, start=start,
                                         health_name=f"data-health-{cfg.run.name}",
                                         manifest=manifest)
    probe = None
    if cfg.train.fewshot_every and d.fewshot_split and d.fewshot_split in manifest["splits"]:
        probe = source.load_probe(d.uri, d.fewshot_split, m.image_size, d.fewshot_images)
    elif cfg.train.fewshot_every and d.fewshot_split:
        log.warning("no split %r in %s: the few-shot probe is off", d.fewshot_split, d.uri)
    return ds, manifest, health, _probe(probe, d.fewshot_split, d.fewshot_shots)


def _probe(probe, name, shots):
    import ray

    if probe is None or not len(probe["labels"]):
        return None
    return ray.put({**probe, "name": name, "shots": list(shots)})


def run_status():
    """A tiny actor through which the workers tell the driver why a run stopped early."""
    import ray

    @ray.remote(num_cpus=0)
    class RunStatus:
        def __init__(self):
            self.error = None

        def fail(self, message: str) -> None:
            self.error = self.error or message

        def get(self) -> str | None:
            return self.error

    return RunStatus.remote()


def pretrain(cfg: PretrainConfig, resume: str | None = None, init: str | None = None,
             tracking_uri: str | None = None, dataset=None) -> Outcome:
    """Run (or continue) the pretraining run `cfg.run.name` on the connected Ray cluster.
    `dataset`: a Ray Dataset with the columns of `pipeline.data.source` to train on instead
    of the one `cfg.data` describes."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import tracking
    from pipeline.train.loop import train_loop

    # Bounded MLflow retries on the driver: an unreachable server costs seconds, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    root = storage_root(cfg)
    if storage.is_s3(root):
        storage.check_bucket(root)
    path, fs = ray_storage(root)
    own = latest_checkpoint(root, cfg.run.name)
    start = samples_seen(own) if own else (samples_seen(resume) if resume else 0)
    if own:
        log.info("run %r has a checkpoint at %s: continuing it", cfg.run.name, own)

    if dataset is None:
        ds, manifest, health, probe = build_data(cfg, start)
    else:
        ds, manifest, health, probe = dataset, None, None, None

    tracking_uri = tracking_uri or tracking.default_tracking_uri(
        root if not storage.is_s3(root) else DEFAULT_ROOT)
    resources = ray.cluster_resources()
    tags = {"git_commit": tracking.git_commit(),
            "cluster": f"{cfg.scale.num_workers} workers x "
                       f"{cfg.scale.gpus_per_worker if cfg.scale.use_gpu else 0} GPU, "
                       f"{cfg.scale.cpus_per_worker} CPU; cluster {resources.get('CPU', 0):.0f} "
                       f"CPU, {resources.get('GPU', 0):.0f} GPU",
            "data_manifest": _manifest_tag(cfg, manifest),
            "host": platform.node(), "mlflow.note.content": f"pretraining run {cfg.run.name}"}
    run_id = None
    try:
        artifact_root = None if "://" in tracking_uri and not tracking_uri.startswith(
            "sqlite") else str(Path(root if not storage.is_s3(root) else
                                    Path(DEFAULT_ROOT).expanduser()) / "mlartifacts")
        params = {**cfg.flat(), "resume": resume or "", "init": init or ""}
        run_id = tracking.start_run(tracking_uri, cfg.run.experiment, cfg.run.name,
                                    artifact_root, params, tags, continuing=own is not None)
        tracker = tracking.Tracker(tracking_uri, run_id)
        tracker.log_text(cfg.to_json(), "config.json")
    except Exception as err:  # noqa: BLE001 - tracking must not stop training
        log.warning("MLflow unavailable at start (%s); training without tracking",
                    tracking.redact(str(err).splitlines()[0][:160]) if str(err) else
                    type(err).__name__)

    status = run_status()
    scale = cfg.scale
    resources_per_worker = {"CPU": scale.cpus_per_worker}
    if scale.use_gpu:
        resources_per_worker["GPU"] = scale.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri,
                           "health": health, "status": status, "resume": resume,
                           "init": init,
                           "fewshot": probe, "spill_uri": storage.join(root, cfg.run.name),
                           "data_plan": _data_plan(cfg, manifest)},
        scaling_config=ray.train.ScalingConfig(num_workers=scale.num_workers,
                                               use_gpu=scale.use_gpu,
                                               resources_per_worker=resources_per_worker,
                                               placement_strategy=scale.placement_strategy),
        datasets={"train": ds},
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
    try:
        result = trainer.fit()
    except Exception:
        if run_id:
            tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise
    metrics = dict(result.metrics or {})
    error = ray.get(status.get.remote())
    if error:
        if run_id:
            tracking.finish_run(tracking_uri, run_id, "FAILED")
        raise PretrainError(error)
    ckpt = result.checkpoint
    uri = ckpt.path if ckpt is not None else ""
    if storage.is_s3(root) and uri and not uri.startswith("s3://"):
        uri = "s3://" + uri
    if run_id:
        tracker = tracking.Tracker(tracking_uri, run_id)
        tracker.log_text(uri + "\n", "checkpoint_uri.txt")
        tracker.set_tags({"checkpoint": uri})
        tracking.finish_run(tracking_uri, run_id, "FINISHED")
    step = int(metrics.get("step", 0))
    if uri and not step:  # nothing left to train: the run was already at total_steps
        step = int(json.loads(storage.read_bytes(storage.join(uri, "train_state.json")))["step"])
    return Outcome(checkpoint=uri, step=step, metrics=metrics,
                   run_id=run_id, tracking_uri=tracking_uri, storage=root)


def _data_plan(cfg: PretrainConfig, manifest: dict | None) -> dict | None:
    """What a worker needs to turn samples seen into a data position: the shard sizes."""
    if manifest is None:
        return None
    split = manifest["splits"][cfg.data.split]
    slim = {"splits": {cfg.data.split: {"num_samples": split["num_samples"], "shards": [
        {"samples": s["samples"]} for s in split["shards"]]}}}
    return {"manifest": slim, "split": cfg.data.split, "seed": cfg.train.seed}


def _manifest_tag(cfg: PretrainConfig, manifest: dict | None) -> str:
    if manifest is None:
        return f"synthetic({cfg.data.synthetic_samples} samples, {cfg.data.synthetic_classes} " \
               f"classes)"
    import hashlib

    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.data.uri} sha256:{digest}"


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("VIT_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
