"""The driver side of pretraining: resolve storage, data, tracking; build the TorchTrainer;
run it; report where things are. `jobs/pretrain.py` only parses and calls `pretrain`."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import interrupt, registry, resources, storage, timeline, tracking
from pipeline.train import checkpoints, failures, lease
from pipeline.train.config import PretrainConfig
from pipeline.train.spec import GroupStart, WorkerSpec, attach_start, train_fn

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
        fs, path = storage.filesystem(root)   # explicit endpoint (apache/arrow#49643)
        return path, fs
    Path(root).mkdir(parents=True, exist_ok=True)
    return root, None


def check_storage(cfg: PretrainConfig, root: str, bucket: bool = True) -> None:
    """Fail at start, not at the first checkpoint: a missing bucket (`bucket`: not checked
    already), or a node-local folder on a cluster of several nodes (each node would keep its
    own, partial checkpoints)."""
    import ray

    if storage.is_s3(root):
        if bucket:
            storage.check_bucket(root)
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not cfg.run.shared_storage:
        raise PretrainError(f"--out {root} is a local folder but the cluster has "
                            f"{len(nodes)} nodes; use --out s3://bucket/prefix (or set "
                            f"run.shared_storage=true for a folder every node mounts)")


def check_tracking(tracking_uri: str, num_nodes: int, shared: bool = False) -> None:
    """A local MLflow store (SQLite, a folder) lives on the driver's disk; rank 0 may train
    on another node and would log into a store of its own there: fail at start instead,
    unless the run says its local paths are on a filesystem every node mounts."""
    local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
    if local and num_nodes > 1 and not shared:
        raise PretrainError(
            f"MLflow store {tracking.redact(tracking_uri)} is local to this node but the "
            f"cluster has {num_nodes} nodes; set MLFLOW_TRACKING_URI to a tracking server "
            f"(e.g. infra/mlflow/compose.yaml) that every node reaches (or "
            f"run.shared_storage=true if every node mounts that path)")


# What defines a run: a run name that has checkpoints continues only with these unchanged
# (the rest, such as train.total_steps, the scale or logging, may change between starts).
DEFINING = {"model": None, "optim": None,
            "data": ("source", "uri", "split", "augment", "randaug_layers",
                     "randaug_magnitude", "mixup", "synthetic_samples", "synthetic_classes"),
            "train": ("global_batch_size", "objective", "head_bias", "seed")}


def config_changes(stored: dict, cfg: PretrainConfig) -> list[str]:
    """The run-defining values of `cfg` that differ from a checkpoint's config (a dict read
    back from JSON; fields it predates count as their defaults)."""
    old = PretrainConfig.from_dict(stored).to_dict()
    new = cfg.to_dict()
    changes = []
    for section, keys in DEFINING.items():
        for key in keys or new[section]:
            if old[section].get(key) != new[section].get(key):
                changes.append(f"{section}.{key}: {old[section].get(key)!r} -> "
                               f"{new[section].get(key)!r}")
    return changes


def check_start(cfg: PretrainConfig, point: checkpoints.ResumePoint,
                resume: str | None = None, thorough: bool = True) -> None:
    """--resume / --init are checked here, before any worker starts; so is a run name that
    has checkpoints made with another config (a rerun with different --set values). Not
    `thorough` (the command's check before Ray starts, `preflight`): without the checksums
    of a --resume checkpoint and without loading the --init weights."""
    if point.kind == "own":
        try:
            stored = checkpoints.read_state(point.uri).get("config")
            changes = config_changes(stored, cfg) if stored else []
        except (ValueError, TypeError, KeyError):
            changes = []          # a config this code cannot read: the architecture check says
        if changes and not resume:
            raise PretrainError(
                f"run {cfg.run.name!r} already has checkpoints made with another config "
                f"({'; '.join(changes[:6])}{'; ...' if len(changes) > 6 else ''}); choose "
                f"another --name, or continue it with these changes: --resume {point.uri}")
        if changes:
            log.warning("continuing run %r with changed settings: %s", cfg.run.name,
                        "; ".join(changes))
    if point.kind == "resume":
        checkpoints.check_resume(point.uri, cfg.model, checksums=thorough)
    elif point.kind == "init":
        checkpoints.check_init(point.uri, cfg.model, load=thorough)


@dataclass
class TrainData:
    """Ray Train's dataset factory: called in its controller when a worker group starts (also
    after a failure), it decides where that start continues from, once for all workers
    (`checkpoints.resume_point`: this run's newest complete checkpoint, after a failure the
    one the failed group wrote last), builds the training stream from that checkpoint's data
    position, and sends the two with the stream (`spec.GroupStart`): the workers restore
    exactly the checkpoint the stream continues, and none of them reads the storage to find
    it again."""

    cfg: PretrainConfig
    run_uri: str
    resume: str | None
    init: str | None
    manifest: dict | None
    health_name: str
    # Ray Data's progress bars, only where the driver's output is a terminal that redraws
    # them (in a job log or CI, each redraw is a line). Decided by the driver; applied here,
    # in the process that builds the dataset (Ray Train's controller), whose context the
    # dataset carries to the processes that run it.
    progress_bars: bool = False
    # The driver's resume point, checksums verified (`resume_point(verified=True)`), for the
    # first start; later starts ask again (without re-hashing what this run just wrote; a
    # checkpoint the driver found damaged is marked, so they pass over it too).
    first: checkpoints.ResumePoint | None = None
    # A Ray Dataset to train on instead of the one `cfg.data` describes (`pretrain(dataset=)`;
    # its data position is not tracked).
    dataset: Any = None

    def __call__(self):
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = self.progress_bars
        point = self.first or checkpoints.resume_point(self.run_uri, self.resume, self.init)
        self.first = None                 # a later start (after a failure) asks again
        if self.dataset is not None:
            return attach_start(self.dataset, GroupStart(point))
        start = GroupStart(point, checkpoints.start_position(point, self.cfg))
        return attach_start(self.stream(start.position), start)

    def stream(self, start):
        """The training stream from the data position `start`."""
        from pipeline.data import health, stream, synthetic
        from pipeline.data.transforms import Augment

        cfg, d, m = self.cfg, self.cfg.data, self.cfg.model
        needed = cfg.train.total_steps * cfg.train.global_batch_size
        if d.source == "synthetic":
            epochs = -(-needed // d.synthetic_samples) + 1
            slots, cpus = read_slots(cfg)
            return synthetic.noise_dataset(d.synthetic_samples, d.synthetic_classes,
                                           m.image_size, epochs, block_rows=d.block_rows,
                                           start=start, seed=cfg.train.seed, read_tasks=slots,
                                           num_cpus_per_read=cpus,
                                           workers=cfg.scale.num_workers if own_streams(cfg)
                                           else 1)
        slots, cpus = read_slots(cfg)
        inp = stream.InputConfig(uri=d.uri, split=d.split, augment=Augment(d.augment,
                                                                           m.image_size),
                                 seed=cfg.train.seed, strict=d.strict,
                                 shuffle_buffer=d.shuffle_buffer, block_rows=d.block_rows,
                                 num_cpus_per_read=cpus, read_tasks=slots,
                                 preserve_order=d.preserve_order)
        # From the epoch the position is in: skipped samples make epochs shorter than the
        # manifest says, and a resumed run may be past what the whole run needed by its count.
        epochs = start.epoch + health.epochs_for(self.manifest, d.split, needed)
        ds, _, _ = stream.shard_dataset(inp, epochs, start=start, health_name=self.health_name,
                                        manifest=self.manifest,
                                        workers=cfg.scale.num_workers if own_streams(cfg) else 1)
        return ds


def build_data(cfg: PretrainConfig, run_uri: str, resume: str | None, init: str | None,
               first: checkpoints.ResumePoint | None = None, checked=None):
    """-> (dataset factory, stream plan, manifest or None, data-health actor or None).
    `first`: the driver's resume point, for the first worker-group start; `checked`: the
    manifest read and its shards listed already (`preflight.Checked`)."""
    from pipeline.data.health import check_shards, data_health
    from pipeline.data.plan import StreamPlan
    from pipeline.train.preflight import read_dataset

    d = cfg.data
    health_name = f"data-health-{cfg.run.name}"
    if d.source == "synthetic":
        stream = StreamPlan.synthetic(d.synthetic_samples, cfg.train.seed)
        factory = TrainData(cfg, run_uri, resume, init, None, health_name, sys.stdout.isatty(),
                            first)
        return factory, stream, None, None
    if checked is not None:
        manifest = checked.manifest
    else:
        manifest = read_dataset(cfg)
        for line in check_shards(manifest, d.uri, d.split):   # one listing, before start
            log.warning("%s", line)
    stream = StreamPlan.from_manifest(manifest, d.split, cfg.train.seed)
    health = data_health(health_name)     # the driver's handle keeps it alive
    factory = TrainData(cfg, run_uri, resume, init, manifest, health_name, sys.stdout.isatty(),
                        first)
    return factory, stream, manifest, health


def _probe(cfg: PretrainConfig, manifest: dict | None):
    """The few-shot probe (pipeline.train.fewshot) in the object store, or None when it is
    off: every worker gets it from there once, not pickled into each worker's spec."""
    import ray

    from pipeline.train.fewshot import FewShotProbe

    probe = FewShotProbe.build(cfg, manifest)
    return ray.put(probe) if probe is not None else None


def pretrain(cfg: PretrainConfig, resume: str | None = None, init: str | None = None,
             tracking_uri: str | None = None, dataset=None, mlflow: bool = True,
             checked=None) -> Outcome:
    """Run (or continue) the pretraining run `cfg.run.name` on the connected Ray cluster.
    `dataset`: a Ray Dataset with the columns of `pipeline.data.stream` to train on instead
    of the one `cfg.data` describes (its data position is not tracked). `checked`: what
    `preflight.check` found before Ray started (the bucket, the manifest, MLflow), not
    asked again."""
    # Bounded MLflow retries on the driver: an unreachable server costs seconds, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    root = storage_root(cfg)
    check_storage(cfg, root, bucket=checked is None)
    check_fits(cfg)
    run_uri = storage.join(root, cfg.run.name)
    run_lease = lease.Lease(run_uri)
    try:
        run_lease.acquire()
    except lease.LeaseHeld as err:
        raise PretrainError(str(err)) from None
    try:
        return _pretrain(cfg, run_uri, root, resume, init, tracking_uri, dataset, mlflow,
                         checked)
    finally:
        run_lease.release()


def _pretrain(cfg: PretrainConfig, run_uri: str, root: str, resume: str | None,
              init: str | None, tracking_uri: str | None, dataset, mlflow: bool,
              checked) -> Outcome:
    point = checkpoints.resume_point(run_uri, resume, init, verified=True)
    check_start(cfg, point, resume)
    if point.kind == "own":
        log.info("run %r has a checkpoint at %s: continuing it", cfg.run.name, point.uri)
    if dataset is None:
        factory, stream, manifest, health = build_data(cfg, run_uri, resume, init, point,
                                                       checked)
        probe = _probe(cfg, manifest)
    else:
        factory = TrainData(cfg, run_uri, resume, init, None, "", first=point, dataset=dataset)
        stream, manifest, health, probe = None, None, None, None
    if mlflow:
        # A server that did not answer before Ray started (said then) is asked again: one
        # that was only slow, or came back, still gets this run.
        tracking_uri, run_id = open_run(cfg, root, tracking_uri, manifest, resume, init,
                                        continuing=point.kind == "own", run_uri=run_uri,
                                        warned=bool(checked and checked.tracking_down))
    else:   # --no-mlflow: the workers keep the metrics in the run folder (a metrics spill)
        tracking_uri, run_id = tracking_uri or tracking.default_tracking_uri(), None
        log.info("MLflow is off (--no-mlflow): the metrics stay in %s", run_uri)
    try:
        return _train(cfg, run_uri, root, resume, init, tracking_uri, run_id, factory, stream,
                      manifest, health, probe)
    except interrupt.Interrupted:
        if run_id:                   # interrupted before training began (or while closing)
            tracking.finish_run(tracking_uri, run_id, "KILLED")
        raise


def _train(cfg: PretrainConfig, run_uri: str, root: str, resume: str | None, init: str | None,
           tracking_uri: str, run_id: str | None, factory, stream, manifest, health,
           probe) -> Outcome:
    spec = WorkerSpec(cfg=cfg, run_uri=run_uri, resume=resume, init=init, run_id=run_id,
                      tracking_uri=tracking_uri, stream=stream,
                      health=health, probe=probe, log_level=logging.getLevelName(
                          logging.getLogger("pipeline").getEffectiveLevel()))
    _forget_ray_snapshot(run_uri)
    trainer = make_trainer(cfg, spec, factory, root)
    try:
        with interrupt.deferred(trainer.request_abort):
            timeline.mark("driver.fit")
            result = trainer.fit()
            timeline.mark("driver.fit_done")
    except Exception as err:
        if interrupt.received():
            raise _stopped(cfg, run_uri) from None
        _sweep_killed_workers()
        if run_id:
            tracking.finish_run(tracking_uri, run_id, "FAILED")
        message = failures.fatal_message(err)
        if message:
            raise PretrainError(message) from None
        raise
    if interrupt.received():
        raise _stopped(cfg, run_uri)
    checkpoints.prune(run_uri, cfg.checkpoint.keep, cfg.eval.vtab_every)
    uri = checkpoints.latest(run_uri) or ""
    step = checkpoints.read_state(uri)["step"] if uri else 0
    if run_id:
        tracker = tracking.Tracker(tracking_uri, run_id)
        tracker.log_text(uri + "\n", "checkpoint_uri.txt")
        tags = {"checkpoint": uri}
        if uri:
            try:
                name = registry.registered_model_name(
                    tracking.experiment_name(cfg.run.experiment), cfg.run.registered_model)
                version = registry.register_checkpoint(tracking_uri, run_id, name, uri, step,
                                                       newest=True)
                tags["registered_model"] = f"{name}/{version.version}"
            except Exception as err:  # noqa: BLE001 - the model registry is not essential
                log.warning("could not register the checkpoint as a model version: %s",
                            tracking.redact(str(err).splitlines()[0][:160]))
        tracker.set_tags(tags)
        tracking.finish_run(tracking_uri, run_id, "FINISHED")
    return Outcome(checkpoint=uri, step=step, metrics=dict(result.metrics or {}),
                   run_id=run_id, tracking_uri=tracking_uri, storage=root)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _forget_ray_snapshot(run_uri: str) -> None:
    """Ray Train's run snapshot lists the checkpoints its controller registered; retention
    (`checkpoints.prune`) deletes old ones, and a controller that reloads a snapshot naming a
    deleted checkpoint refuses to start (CheckpointManagerInitializationError). Where a run
    continues from is ours to say (`checkpoints.resume_point`), so each start begins
    without it."""
    storage.delete(storage.join(run_uri, RAY_SNAPSHOT), missing_ok=True)


def _sweep_killed_workers() -> None:
    """After an abort or a failure, Ray kills the workers, maybe mid-checkpoint: this node's
    staging folders of the killed workers are removed (other nodes' workers sweep theirs
    when they next start)."""
    import time

    deadline = time.monotonic() + 10          # the killed workers take a moment to be gone
    while True:
        checkpoints.sweep_staging()
        left = list(Path(tempfile.gettempdir()).glob(f"{checkpoints.STAGING_PREFIX}*"))
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)


def _stopped(cfg: PretrainConfig, run_uri: str) -> interrupt.Interrupted:
    """After an abort: the killed workers' staging swept, and where the run stands."""
    _sweep_killed_workers()
    newest = checkpoints.latest(run_uri)
    where = (f"newest checkpoint {newest}; the same command continues from it" if newest
             else "no checkpoint yet")
    return interrupt.Interrupted(interrupt.received(), f"run {cfg.run.name!r} stopped; {where}")


def open_run(cfg: PretrainConfig, root: str, tracking_uri: str | None, manifest: dict | None,
             resume: str | None, init: str | None, continuing: bool,
             run_uri: str | None = None, warned: bool = False) -> tuple[str, str | None]:
    """Create (or reopen) the MLflow run on the driver -> (tracking URI, run id or None),
    and send it the metrics an earlier start spilled. Tracking never stops training: without
    a server the run goes on, its metrics kept in the run folder until a later start; a
    server that refuses the credentials (or the host name) is an error, before any step.
    `warned`: the preflight has already said that the server does not answer."""
    import ray

    tracking_uri = tracking_uri or tracking.default_tracking_uri()
    check_tracking(tracking_uri, len([n for n in ray.nodes() if n.get("Alive")]),
                   cfg.run.shared_storage)
    totals = ray.cluster_resources()
    tags = {"cluster": f"{cfg.scale.num_workers} workers x "
                       f"{cfg.scale.gpus_per_worker if cfg.scale.use_gpu else 0} GPU, "
                       f"{cfg.scale.cpus_per_worker} CPU; cluster {totals.get('CPU', 0):.0f} "
                       f"CPU, {totals.get('GPU', 0):.0f} GPU",
            "data_manifest": _manifest_tag(cfg, manifest),
            "host": platform.node(), "mlflow.note.content": f"pretraining run {cfg.run.name}"}
    try:
        params = {**cfg.flat(), "resume": resume or "", "init": init or ""}
        run_id = tracking.start_run(tracking_uri, cfg.run.experiment, cfg.run.name,
                                    params, tags, continuing=continuing,
                                    source="jobs/pretrain.py")
        tracking.Tracker(tracking_uri, run_id).log_text(cfg.to_json(), "config.json")
        if manifest is not None and not continuing:
            digest = tags["data_manifest"].rsplit("sha256:", 1)[-1]
            tracking.log_dataset(tracking_uri, run_id, f"{cfg.data.uri}#{cfg.data.split}",
                                 cfg.data.uri, digest)
        if run_uri:
            tracking.import_spills(tracking_uri, run_id, run_uri)
        return tracking_uri, run_id
    except Exception as err:  # noqa: BLE001 - tracking must not stop training
        if why := tracking.refusal(err, tracking_uri):
            raise PretrainError(why) from None   # wrong settings, not an outage: say so now
        (log.info if warned else log.warning)(
            "MLflow unavailable at start (%s); training goes on, its metrics kept in the run "
            "folder and sent by the next start of this run",
            tracking.redact(str(err).splitlines()[0][:160]) if str(err) else
            type(err).__name__)
        return tracking_uri, None


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's
# default 2 s), and it notices that the workers have finished only at a poll: with 2 s, a
# smoke run's fit() returned 4.6 s after its last worker ended, 1.0 s with 0.5 s
# (bench/startup.py). Each poll is one RPC per worker to one controller actor, so the
# interval grows with the group back to Ray's 2 s at 1,024 workers.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def poll_interval(num_workers: int) -> float:
    """Seconds between the Train controller's polls of `num_workers` workers."""
    return min(2.0, max(0.5, num_workers / 512))


_poll_set: str | None = None      # the value set_poll_interval last put in the environment


def set_poll_interval(num_workers: int) -> None:
    """Ray Train reads the interval from the driver's environment and passes it to its
    controller: set it there, unless the user did."""
    global _poll_set
    if os.environ.get(POLL_INTERVAL_ENV) == _poll_set:
        _poll_set = os.environ[POLL_INTERVAL_ENV] = str(poll_interval(num_workers))


def make_trainer(cfg: PretrainConfig, spec: WorkerSpec, dataset, root: str):
    import ray.train

    path, fs = ray_storage(root)
    scale = cfg.scale
    set_poll_interval(scale.num_workers)
    resources_per_worker = {"CPU": scale.cpus_per_worker}
    if scale.use_gpu:
        resources_per_worker["GPU"] = scale.gpus_per_worker
    return failures.trainer_class()(
        train_fn,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=scale.num_workers,
                                               use_gpu=scale.use_gpu,
                                               resources_per_worker=resources_per_worker,
                                               placement_strategy=scale.placement_strategy),
        datasets={"train": dataset},
        dataset_config=_data_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Retention is ours (checkpoints.prune): Ray's deletes only what its current
            # controller registered, never the older checkpoints of earlier starts.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None)))


def own_streams(cfg: PretrainConfig) -> bool:
    """Whether this start's stream is built for a stream per worker (`streams_per_worker`
    on the cluster as it is now: GPUs, several nodes alive, or one worker)."""
    import ray

    s = cfg.scale
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    return not cfg.data.preserve_order and streams_per_worker(
        cfg.data.worker_streams, s.num_workers, s.use_gpu, nodes)


def read_slots(cfg: PretrainConfig) -> tuple[int, float]:
    """-> (read tasks, CPUs each) for the CPUs the Train workers leave: `data.num_cpus_per_read`
    each. Where the workers may each execute a stream of their own (`streams_per_worker`),
    the same number for each worker, all able to run at once: a worker's tasks are
    long-lived, so a worker whose tasks found no CPU (taken by the others' tasks) would starve
    while the others waited for it at the next collective. Where the free CPUs are fewer
    than that, each task asks for a share of them (fractional CPUs)."""
    import ray

    s = cfg.scale
    free = ray.cluster_resources().get("CPU", 0) - s.num_workers * s.cpus_per_worker
    per = max(cfg.data.num_cpus_per_read, 0.05)
    tasks = max(int(free / per), 1)
    if own_streams(cfg):
        tasks = -(-tasks // s.num_workers) * s.num_workers    # the same number per worker
    return tasks, min(per, free / tasks) if free > 0 else per


def check_fits(cfg: PretrainConfig) -> None:
    """The workers plus one data task must fit the cluster, or the Train controller waits
    for them forever (pipeline.resources): stop at once where the cluster cannot grow."""
    s = cfg.scale
    bundle = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    spare = min(cfg.data.num_cpus_per_read, 1.0)
    each = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    try:
        resources.ensure_fits(
            [bundle] * s.num_workers, spare,
            what=f"{s.num_workers} worker{'s' if s.num_workers > 1 else ''} x {each}, plus "
                 f"{spare:g} CPU for the data tasks that feed them,",
            fix="lower --cpus-per-worker (e.g. 0.5) or use fewer --workers",
            wait_s=s.wait_for_resources_s, spread=s.placement_strategy == "STRICT_SPREAD")
    except resources.DoesNotFit as err:
        raise PretrainError(str(err)) from None


def _data_config(cfg: PretrainConfig):
    """Ray Train's default ingest options (`DataConfig.default_ingest_options`: the
    context's resource limits and verbosity) with our ordering, built here because Ray's own
    helper passes `exclude_resources`, deprecated in 2.60, and warns on every run; a stream
    per worker where the stream allows it (`WorkerStreams`)."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=current.resource_limits,
                               preserve_order=cfg.data.preserve_order,
                               verbose_progress=current.verbose_progress)
    return _worker_streams()(execution_options=options)


def streams_per_worker(mode: str, world: int, gpu: bool, nodes) -> bool:
    """`data.worker_streams`: whether each worker executes a stream of its own
    (`stream.per_worker`) rather than its part of Ray Train's split, one executor in one
    `SplitCoordinator` actor that every worker asks for every block. "auto": on GPUs, on a
    cluster of several nodes, and for one worker; not for several CPU workers on one machine
    (`nodes`: the cluster's), where the workers
    and one executor each share the same cores (an executor is ~0.25 of a core at ~20 blocks
    a second, `bench/processes.py`), and one coordinator is enough for CPU speed."""
    if mode != "auto":
        return mode == "on"
    return world == 1 or gpu or len(set(nodes or ())) > 1


def _worker_streams():
    import ray.train

    from pipeline.data import stream

    class WorkerStreams(ray.train.DataConfig):
        """A stream per worker (`stream.per_worker`) where the stream was built for as many
        workers (`TrainData.stream`, as `streams_per_worker` decides): no `SplitCoordinator`
        between the read tasks and the workers. Else (streams in order, streams built for
        one, datasets not built of read slots) Ray Train's split. A stream built for N
        workers is never split instead: its slots take their reads from N queues, and one
        executor that ran fewer tasks than slots would leave a queue unread (a node-loss
        restart trained half of each epoch that way)."""

        def own_streams(self, datasets, world_size, worker_node_ids) -> list | None:
            """Each rank's iterator of a stream of its own, or None (Ray's split)."""
            if set(datasets) != {"train"}:
                return None
            parts = stream.per_worker(datasets["train"], world_size,
                                      self._resolve_execution_options("train"),
                                      worker_node_ids)
            for part in parts or ():
                part.set_name("train")
            return None if parts is None else [part.iterator() for part in parts]

        def configure(self, datasets, world_size, worker_handles, worker_node_ids,
                      **kwargs):
            own = self.own_streams(datasets, world_size, worker_node_ids)
            if own is not None:
                return [{"train": it} for it in own]
            return super().configure(datasets, world_size, worker_handles, worker_node_ids,
                                     **kwargs)

    return WorkerStreams


@dataclass(frozen=True)
class OwnStream:
    """What a Train worker asks for its dataset shard (Ray Train's `DatasetShardProvider`):
    the iterator of its own stream, which it executes itself."""

    iterator: Any

    def get_dataset_shard(self, dataset_info):
        if dataset_info.dataset_name != "train":
            raise KeyError(f"no dataset {dataset_info.dataset_name!r}: only 'train'")
        return self.iterator


def streams_callback(train_run_context, datasets):
    """Ray Train's datasets callback, without its `DatasetManager` actor where the workers
    each execute a stream of their own (`WorkerStreams.own_streams`): the controller builds
    the rank streams (lazy plans, no data) when the worker group starts, and gives each
    worker its own iterator. Ray's callback starts that actor for every worker group, to
    build and hand out the iterators, and it only has work for Ray's split (a process
    importing Ray Data: ~2.7 CPU-seconds a run here, `bench/processes.py`). Where the stream
    is split, Ray's provider, with that actor, as before; either way the dataset factory
    (`TrainData`) is called once a start."""
    from ray.train.v2._internal.callbacks.datasets import (
        DatasetsCallback,
        RayDatasetShardProvider,
    )

    class StreamsCallback(DatasetsCallback):
        def before_init_train_context(self, workers):
            world = len(workers)
            nodes = [w.metadata.node_id for w in workers]
            built = {k: v() if callable(v) else v for k, v in self._datasets.items()}
            own = getattr(self._data_config, "own_streams", None)
            iterators = own(built, world, nodes) if own else None
            if iterators is not None:
                self._dataset_shard_provider = None     # nothing to shut down: the
                return {"dataset_shard_provider": [    # executors are the workers'
                    OwnStream(it) for it in iterators]}
            self._dataset_shard_provider = RayDatasetShardProvider(
                datasets=built, data_config=self._data_config,
                data_context=self._data_context, world_size=world, worker_node_ids=nodes)
            return {"dataset_shard_provider": [self._dataset_shard_provider] * world}

    return StreamsCallback(train_run_context=train_run_context, datasets=datasets)


def _manifest_tag(cfg: PretrainConfig, manifest: dict | None) -> str:
    if manifest is None:
        return f"synthetic({cfg.data.synthetic_samples} samples, {cfg.data.synthetic_classes} " \
               f"classes)"
    import hashlib

    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.data.uri} sha256:{digest}"
