"""The Ray Train worker: build, wrap, restore, loop over `train_step`, log, probe, checkpoint.

Everything numeric is plain PyTorch (`step.py`); this file adds the distribution (the Ray
Train context, `parallel.wrap`), the data shard and the exact data position, MLflow from
rank 0, and checkpoints (`checkpoints.CheckpointWriter`). The worker receives one frozen
`WorkerSpec` from the driver, and with its data shard the `GroupStart` of this worker-group
start (the checkpoint to restore and the data position the stream begins at).

`train` reads as torchtitan's `Trainer.train`: set-up, then the step loop, then the hooks
after each step (log and probe, checkpoint), each a small function of its own. What a retry
would repeat (bad data, a non-finite loss, a stream that ends early) raises `Fatal` with the
line the user sees.

The loop does not wait for the device between steps: losses and gradient norms accumulate on
the device and are read (and checked for finiteness) at log steps, where one all-reduce makes
`train/loss` the mean over all workers.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import timeline
from pipeline.cli import clock
from pipeline.data.health import skip_summary
from pipeline.data.plan import compact, sample_ranges
from pipeline.data.reader import DataError
from pipeline.data.stream import LOST, lost_ranges
from pipeline.data.transforms import to_model_input
from pipeline.model import ViT
from pipeline.schedule import learning_rate
from pipeline.train import checkpoints, parallel
from pipeline.train.config import PretrainConfig
from pipeline.train.failures import Fatal
from pipeline.train.spec import GroupStart, WorkerSpec, group_start
from pipeline.train.step import (
    NonFiniteLoss,
    Pretrainer,
    decay_names,
    make_optimizer,
    train_step,
)

log = logging.getLogger("pipeline.train")

# Steps' sample ranges a worker keeps apart before merging them (`record_samples`): merging
# costs a sort of what is kept, so not every step; between merges ~64 x micro-batch rows.
MERGE_EVERY = 64
# The local shuffle buffer's cap in micro-batches (`shuffle_buffer`).
SHUFFLE_STEPS = 16
# Rank 0 sends metrics to MLflow at most this often (and at each checkpoint and the end):
# a log_batch blocks every worker at the next collective for a round trip to the server
# (~20 ms), 34% of a 50-step log interval at 1,024 GPUs (bench/scale.py); once per 10 s, 0.2%.
FLUSH_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    strategy: str


@dataclass
class Start:
    step: int
    position: Any                       # DataPosition or None
    source: str
    saved: int = 0                      # checkpoints the run wrote before (checkpoint_number)


@dataclass
class Worker:
    """What one worker trains with, from set-up to the end of `train`."""

    spec: WorkerSpec
    env: WorkerEnv
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    writer: checkpoints.CheckpointWriter
    tracker: Any = None                 # pipeline.tracking.Tracker on rank 0, else None
    probe: Any = None                   # pipeline.train.fewshot.FewShotProbe, or None
    flops: float | None = None          # training FLOPs per image and the device's peak,
    peak: float | None = None           # for perf/mfu (GPU only)
    skipped: dict = field(default_factory=dict)      # rank 0: the last data-health count,
    skipped_at: float = -math.inf                    # and when it was asked (`_skipped`)

    @property
    def cfg(self) -> PretrainConfig:
        return self.spec.cfg


def train_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; `config` = {"spec": WorkerSpec}."""
    import ray.train

    spec: WorkerSpec = config["spec"]
    timeline.mark("worker.start")
    logging.getLogger("pipeline").setLevel(spec.log_level)
    env = worker_env(spec.cfg)
    shard = ray.train.get_dataset_shard("train")
    group = group_start(shard)
    stream = FirstFetched(batches(shard, spec.cfg, env))    # its read tasks start now
    model, optimizer, start = build(spec, env, group)
    timeline.mark("worker.model")
    worker = Worker(spec, env, model, optimizer,
                    checkpoints.CheckpointWriter(env.rank, spec.cfg.checkpoint.asynchronous),
                    open_tracker(spec, env, start), fetch_probe(spec),
                    *_mfu_terms(spec.cfg, env))
    system = node_metrics(spec)
    timeline.mark("worker.ready")
    try:
        # Fatal from here: Ray Train stops every worker without spending max_failures (these
        # errors would recur on a retry), and the driver prints the line (failures.py).
        train(worker, start, stream)
    finally:
        worker.writer.close()
        if worker.tracker is not None:
            worker.tracker.close()
        if system is not None:
            system.stop()
        timeline.mark("worker.end")


def worker_env(cfg: PretrainConfig) -> WorkerEnv:
    import ray.train
    import ray.train.torch

    _quiet_ray_reports()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    amp = torch.bfloat16 if (cfg.train.precision == "bf16" or
                             (cfg.train.precision == "auto" and gpu)) else None
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Subnormal floats appear as training goes on and make CPU math ~10x slower
        # (measured: 4.3k -> 0.32k images/s on the smoke run after 30 steps).
        torch.set_flush_denormal(True)
    strategy = parallel.resolve_strategy(cfg.train.parallel, cfg.model.hidden_size, gpu)
    return WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), device, amp, strategy)


def build(spec: WorkerSpec, env: WorkerEnv, group: GroupStart):
    """Build the model on every rank from the same seed, apply `--init`, compile, wrap, make
    the optimizer, and load the checkpoint `group` names (this run's, or `--resume`'s) into
    the wrapped model. -> (model, optimizer, Start)."""
    cfg = spec.cfg
    point = group.point
    torch.manual_seed(cfg.train.seed)
    module = Pretrainer(ViT(cfg.model), cfg.train.objective, cfg.train.head_bias)
    if point.kind == "init":
        checkpoints.init_model(module.vit, point.uri)
    decay = decay_names(module)
    if cfg.compile_enabled(env.device.type == "cuda"):
        for unit in module.vit.shard_units():   # in place: parameter names stay as they are
            unit.compile()
    model = parallel.wrap(module, module.vit.shard_units(), env.strategy, env.device, env.amp,
                          cfg.train.shard_group_size)
    optimizer = make_optimizer(model, decay, cfg, env.device)
    step = saved = 0
    if point.kind in ("own", "resume"):
        state = checkpoints.load(point.uri, model, optimizer, cfg.model, point.describe())
        step = state["step"]
        # The count goes on from this run's own checkpoint; another run's starts a new count.
        saved = checkpoints.checkpoint_number(state) if point.kind == "own" else 0
    # Dropout and MPP noise: a function of (seed, rank, step), so a resumed run draws what an
    # uninterrupted one would have drawn from there.
    torch.manual_seed(cfg.train.seed + 1000 * env.rank + step)
    np.random.seed((cfg.train.seed + 1000 * env.rank + step) % 2**32)
    return model, optimizer, Start(step, group.position, point.describe(), saved)


def open_tracker(spec: WorkerSpec, env: WorkerEnv, start: Start):
    if env.rank == 0:
        cfg = spec.cfg
        log.info("start at step %d (%s); %d workers (%s) x %d micro-batch x %d accumulation = "
                 "global batch %d; device %s", start.step, start.source, env.world,
                 env.strategy, cfg.micro_batch, cfg.accumulation_steps,
                 cfg.train.global_batch_size, env.device)
    if env.rank != 0:
        return None
    from pipeline.tracking import Tracker

    # No run id: MLflow was down at start; the tracker keeps the metrics in the run folder.
    tracker = Tracker(spec.tracking_uri, spec.run_id, spec.run_uri, flush_every_s=FLUSH_EVERY_S)
    tracker.note_start(start.step)                   # every (re)start: tag start_steps
    return tracker


def node_metrics(spec: WorkerSpec):
    """MLflow system metrics of this node (CPU, memory, disk, network, GPUs), from its local
    rank 0, as system/node_<i>/...: one series per node of the cluster."""
    import ray.train

    ctx = ray.train.get_context()
    interval = spec.cfg.train.system_metrics_s
    if not spec.run_id or not interval or ctx.get_local_rank() != 0:
        return None
    from pipeline.tracking import SystemMetrics

    return SystemMetrics(spec.tracking_uri, spec.run_id, f"node_{ctx.get_node_rank()}",
                         interval_s=interval)


def fetch_probe(spec: WorkerSpec):
    """The few-shot probe the driver built, from the object store (None: off)."""
    if spec.probe is None:
        return None
    import ray

    return ray.get(spec.probe)


def batches(shard, cfg: PretrainConfig, env: WorkerEnv):
    from pipeline.data.stream import InputConfig, iter_batches

    return iter(iter_batches(shard, cfg.micro_batch, InputConfig(
        shuffle_buffer=shuffle_buffer(cfg)), drop_last=True, seed=cfg.train.seed + env.rank))


class FirstFetched:
    """An iterator whose first item is fetched at once, in a thread: the stream's executor
    starts its read tasks (new processes importing the readers: the ~3 s "dataset: first
    batch" of bench/startup.py) while the worker builds its model and opens its tracker,
    instead of after them. The first `next` waits for that item, and raises what fetching it
    raised; the rest come from the iterator itself, in the caller's thread."""

    def __init__(self, items):
        self._items, self._first, self._error = items, None, None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._items)
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            self._error = err

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._items)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        first, self._first = self._first, None
        return first


def shuffle_buffer(cfg: PretrainConfig) -> int:
    """Each worker's local shuffle buffer: `data.shuffle_buffer`, at most `SHUFFLE_STEPS`
    micro-batches. Why the cap: the samples in the buffers at a checkpoint are holes in the
    data position (not trained yet, they are listed one by one), and a buffer sized per
    worker makes them grow with the cluster: 4,096 x 1,024 workers held 4M samples, half of
    a B/16 checkpoint interval, and made each checkpoint's position ~80 MB (bench/scale.py).
    Capped, all buffers together hold at most `SHUFFLE_STEPS` global batches on any cluster.
    The mixing is not worse where it matters: the global batch still draws from every
    worker's stream, and those come from as many shards as there are read tasks."""
    return min(cfg.data.shuffle_buffer, SHUFFLE_STEPS * cfg.micro_batch)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class Meter:
    """Per-interval sums kept on the device; `read` synchronises once."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        # The first non-finite step of the interval (inf: none) and its loss / norm.
        self.bad_step = torch.full((), math.inf, device=self.device)
        self.bad = torch.zeros(2, device=self.device)
        self.steps = self.images = 0
        self.data_s = 0.0
        self.start = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, images: int):
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        first = ~finite & torch.isinf(self.bad_step)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad = torch.where(first, torch.stack([loss, grad_norm]), self.bad)
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.images += images

    def read(self, world: int) -> dict:
        """All-reduce over workers (one collective), raise NonFiniteLoss for the first bad
        step, -> interval means."""
        summed = torch.stack([self.loss, torch.tensor(float(self.images), device=self.device)])
        bad = self.bad_step.clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(summed)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            summed[0] /= world
        loss_sum, images = summed.tolist()
        bad_step = bad.item()
        if math.isfinite(bad_step):
            loss, norm = self.bad.tolist()
            raise NonFiniteLoss(f"non-finite loss at step {int(bad_step)}: loss {loss}, "
                                f"gradient norm {norm}")
        return {"loss": loss_sum / max(self.steps, 1),
                "grad_norm": self.grad_norm.item() / max(self.steps, 1),
                "images_per_step": images / max(self.steps, 1)}


@dataclass
class PositionChain:
    """Rank 0's data position, advanced by each checkpoint's gathered ranges where that
    checkpoint is written (Ray Train's upload thread when checkpoints are asynchronous):
    `advance_ranges` takes ~1.7 s a checkpoint at 1,024 workers (bench/scale.py), which in the
    training loop every worker would wait for at the next collective. `add` queues the
    ranges and returns that checkpoint's resolver; a resolver applies every queued batch up
    to its own, in order, so a checkpoint whose write never ran (it failed) loses nothing for
    the next."""

    def __init__(self, position, stream):
        import threading

        self.position, self.stream = position, stream
        self.queued: list[tuple[int, np.ndarray]] = []
        self.added = 0
        self.lock = threading.Lock()

    def add(self, ranges: np.ndarray):
        """-> a callable returning the position (as a dict) after these ranges."""
        with self.lock:
            self.added += 1
            number = self.added
            self.queued.append((number, ranges))
        return functools.partial(self._resolve, number)

    def _resolve(self, number: int) -> dict:
        with self.lock:
            while self.queued and self.queued[0][0] <= number:
                self.position = self.position.advance_ranges(self.stream,
                                                             self.queued.pop(0)[1])
            return self.position.to_dict()


@dataclass
class Progress:
    """What the loop carries from step to step."""

    step: int
    position: Any                       # where the stream began (DataPosition), or None
    meter: Meter
    consumed: list = field(default_factory=list)      # (k, 4) ranges trained since last save
    last_save: float = field(default_factory=time.monotonic)
    start_step: int = 0                 # where this (re)start began, and when: the pace
    saved: int = 0                      # checkpoints the run has written, all starts
    started: float = field(default_factory=time.monotonic)
    chain: Any = None                   # rank 0: PositionChain from `position`


def train(w: Worker, start: Start, batches) -> None:
    """Train from `start` to `train.total_steps`."""
    total = w.cfg.train.total_steps
    progress = Progress(start.step, start.position, Meter(w.env.device), start_step=start.step,
                        saved=start.saved)
    trace = _trace_file(w.cfg, w.env, start.step)
    if progress.step >= total and w.env.rank == 0:
        log.info("already at step %d of %d: nothing to train (raise train.total_steps to "
                 "continue)", progress.step, total)
    while progress.step < total:
        micro = next_batches(w, batches, progress)
        first = progress.step == start.step
        if first:
            timeline.mark("worker.first_batch")
        record_samples(progress, micro, trace)
        lr = optimizer_step(w, progress, micro)
        if first or progress.step == total:
            timeline.mark("worker.first_step" if first else "worker.last_step")
        logged = log_due(w, progress)
        metrics = log_step(w, progress, lr) if logged else {}
        if checkpoint_due(w, progress, logged):
            if not logged:
                read_meter(w, progress)       # never save weights a bad step has touched
            save_checkpoint(w, progress, metrics)


def next_batches(w: Worker, batches, progress: Progress) -> list[dict]:
    """The micro-batches of the next step; the wait for them is the interval's data wait."""
    t0 = time.perf_counter()
    try:
        micro = [next(batches) for _ in range(w.cfg.accumulation_steps)]
    except StopIteration:
        raise Fatal(_ran_out(w.spec, progress.step)) from None
    except DataError as err:
        # Raised in a Ray Data read task, it arrives as RayTaskError(DataError): still a
        # DataError, with the original in `cause`. Bad data recurs on a retry: Fatal.
        raise Fatal("data error: " + err.first_line()) from None
    progress.meter.data_s += time.perf_counter() - t0
    return micro


def record_samples(progress: Progress, micro: list[dict], trace) -> None:
    """The samples of this step, for the data position of the next checkpoint (and the
    audit file of `data.trace_dir`), kept as runs of indices (`plan.compact`): a worker's
    bookkeeping between checkpoints grows with the reads it touches, not with its samples."""
    if progress.position is None and trace is None:
        return
    ids = [np.stack([b[c].numpy() for c in ("epoch", "shard", "index")]) for b in micro]
    if progress.position is not None:
        progress.consumed += [sample_ranges(*a) for a in ids]
        # Samples the read tasks skipped are consumed too (see pipeline.data.health); the
        # `lost` column names them as (epoch, shard, first, stop) already.
        progress.consumed += [lost_ranges(b[LOST].numpy()) for b in micro if LOST in b]
        if len(progress.consumed) >= MERGE_EVERY:
            progress.consumed = [compact(np.concatenate(progress.consumed))]
    if trace is not None:
        for a in ids:
            np.savetxt(trace, np.vstack([np.full(a.shape[1], progress.step + 1), a]).T,
                       fmt="%d")
        trace.flush()


def optimizer_step(w: Worker, progress: Progress, micro: list[dict]) -> float:
    """One optimizer step over the micro-batches (`step.train_step`). -> its learning rate."""
    cfg, o = w.cfg, w.cfg.optim
    inputs = [model_inputs(b, cfg, w.env, progress.step, i) for i, b in enumerate(micro)]
    lr = learning_rate(progress.step, o.lr, cfg.train.total_steps, o.warmup_steps, o.decay,
                       o.end_lr)
    loss, grad_norm = train_step(w.model, w.optimizer, inputs, lr, o.grad_clip, w.env.amp)
    progress.step += 1
    progress.meter.add(progress.step, loss, grad_norm, sum(len(x) for x, _ in inputs))
    return lr


def log_due(w: Worker, progress: Progress) -> bool:
    return (progress.step % w.cfg.train.log_every == 0 or
            progress.step == w.cfg.train.total_steps)


def log_step(w: Worker, progress: Progress, lr: float) -> dict:
    """The interval's metrics (collectives: every worker calls this), with the probe's where
    it is due; rank 0 prints the progress line and sends them to MLflow. -> the metrics."""
    step, total = progress.step, w.cfg.train.total_steps
    metrics = interval_metrics(read_meter(w, progress), progress.meter, w.cfg, lr, w.env,
                               w.flops, w.peak)
    if w.probe is not None and w.probe.due(step):
        metrics.update(w.probe.run(w.model, w.env))
    if w.env.rank == 0:
        metrics.update(_skipped(w, step == total))
        log.info(progress_line(step, total, metrics, progress.start_step,
                               time.monotonic() - progress.started))
        if w.tracker is not None:
            w.tracker.log_metrics(metrics, step)
    progress.meter.reset()
    return metrics


def read_meter(w: Worker, progress: Progress) -> dict:
    """The interval's means over all workers (a collective); a non-finite step is Fatal."""
    try:
        return progress.meter.read(w.env.world)
    except NonFiniteLoss as err:
        raise Fatal(f"{err}; lower optim.lr or check the data") from None


def checkpoint_due(w: Worker, progress: Progress, logged: bool) -> bool:
    """Every `checkpoint.every` steps and at the last; at log steps also once
    `checkpoint.minutes` have passed (a collective, so only where every worker asks)."""
    c = w.cfg.checkpoint
    due = progress.step % c.every == 0 or progress.step == w.cfg.train.total_steps
    if logged and not due:
        return _minutes_due(progress, c.minutes, w.env.world)
    return due


def model_inputs(batch: dict, cfg: PretrainConfig, env: WorkerEnv, step: int, micro: int):
    """A micro-batch on the device as the model takes it: images (B, 3, H, W) in [-1, 1] after
    the device-side augmentation (RandAugment, Mixup; `data.randaug_*`, `data.mixup`), and
    labels (float targets where Mixup mixed them)."""
    images = batch["image"].to(env.device, non_blocking=True)
    labels = batch["label"].to(env.device, non_blocking=True)
    aug = cfg.batch_augment
    mean, std = cfg.model.input_mean, cfg.model.input_std
    if not aug.active:
        return to_model_input(images, mean, std), labels
    rng = aug.rng(cfg.train.seed, env.rank, step, micro)
    return aug(images, labels, cfg.model.num_classes, rng, mean, std)


def save_checkpoint(w: Worker, progress: Progress, metrics: dict) -> None:
    """Every rank saves its shard (rank 0 also the gathered data position and the ViT).
    Only checkpoints go through ray.train.report: each report waits for the controller to
    collect it (its poll interval, 2 s by default), so reporting every log step cost the smoke
    run 90% of its throughput. Metrics go to MLflow from rank 0 instead."""
    cfg, env = w.cfg, w.env
    position = _advance(w, progress)
    progress.saved += 1
    doc = checkpoints.new_state(
        step=progress.step, samples_seen=progress.step * cfg.train.global_batch_size,
        data_position=position,       # a PositionChain resolver: resolved where it is written
        config=cfg.to_dict(), run_name=cfg.run.name, run_id=w.spec.run_id,
        world_size=env.world, strategy=env.strategy, number=progress.saved)
    # Retention on rank 0, off the training loop: in the upload thread, before this upload
    # (its listing grows with the ranks: ~0.4 s a checkpoint on S3 at 1,024, bench/scale.py).
    prune = None
    if env.rank == 0:
        prune = functools.partial(checkpoints.prune, w.spec.run_uri, cfg.checkpoint.keep,
                                  cfg.eval.vtab_every)
    w.writer.save(w.model, w.optimizer, cfg.model, doc, metrics, before_upload=prune)
    progress.last_save = time.monotonic()
    if w.tracker is not None:
        w.tracker.save()


def _advance(w: Worker, progress: Progress):
    """The data position after every sample trained so far: the samples each worker trained
    on since the last checkpoint, compacted on the worker into runs of indices (`compact`),
    gathered on rank 0 (a collective) and queued there, to be added to the position where the
    checkpoint is written (`PositionChain`) -> its resolver (None on the other ranks). What
    rank 0 receives is 16 bytes a run: at most one per block of the stream a worker trained
    (its own read tasks give it whole shards; Ray Train's split, for a stream in order,
    blocks in turn) and one per hole its shuffle buffer left, ~2 MB a B/16-i21k checkpoint
    at 1,024 workers, where the ids were ~200 MB on any cluster (bench/scale.py)."""
    if progress.position is None:
        return None
    # int32, as the stream's id columns: 16 bytes a run.
    mine = (compact(np.concatenate(progress.consumed)) if progress.consumed else
            np.zeros((0, 4), np.int64)).astype(np.int32)
    progress.consumed = []
    gathered = [mine]
    if w.env.world > 1:
        import torch.distributed as dist

        gathered = [None] * w.env.world if w.env.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
    if w.env.rank != 0:
        return None
    ranges = np.concatenate(gathered)
    log.debug("data position: %d ranges (%d bytes) gathered from %d workers at step %d",
              len(ranges), ranges.nbytes, w.env.world, progress.step)
    if progress.chain is None:
        progress.chain = PositionChain(progress.position, w.spec.stream)
    return progress.chain.add(ranges)


def _minutes_due(progress: Progress, minutes: float, world: int) -> bool:
    """Wall-clock cadence, agreed on by all workers (the slowest clock decides)."""
    if minutes <= 0:
        return False
    elapsed = torch.tensor([(time.monotonic() - progress.last_save) / 60])
    if world > 1:
        import torch.distributed as dist

        # On CPU through gloo: a tensor this small costs less than a step's noise.
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=_cpu_group())
    return float(elapsed) >= minutes


_CPU_GROUP = None


def _cpu_group():
    global _CPU_GROUP
    import torch.distributed as dist

    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def _trace_file(cfg: PretrainConfig, env: WorkerEnv, start_step: int):
    """data.trace_dir: every worker appends "step epoch shard index" for each sample it trains
    on (an audit of the data order; a restart writes a line "-1 <start step> 0 0" first)."""
    if not cfg.data.trace_dir:
        return None
    path = Path(cfg.data.trace_dir) / f"rank{env.rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 - open for the whole run
    f.write(f"-1 {start_step} 0 0\n")
    return f


def _mfu_terms(cfg: PretrainConfig, env: WorkerEnv):
    if env.device.type != "cuda":
        return None, None
    from pipeline.perf import peak_flops, train_flops_per_image

    try:
        return train_flops_per_image(cfg.model), peak_flops(env.device)
    except ValueError as err:
        if env.rank == 0:
            log.warning("%s: perf/mfu is not logged", err)
        return None, None


def _quiet_ray_reports() -> None:
    """Ray Train logs every report with all its metrics at INFO; our progress line says the
    same in one line. (Its logger is named by file path, hence the lookup.) It also logs a
    traceback for every error of the training function, and another for a failed
    asynchronous checkpoint upload: for our `Fatal` errors (a full disk, bad data, a
    non-finite loss), which the command prints as one line naming the problem and the fix,
    those are dropped here; any other error keeps Ray's traceback."""
    try:
        from ray.train.v2._internal import util as ray_util
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:
        return
    reports = logging.getLogger(ray_context.__file__)
    reports.setLevel(logging.WARNING)
    for logger in (reports, logging.getLogger(ray_util.__name__)):
        if not any(isinstance(f, _SaidInOneLine) for f in logger.filters):
            logger.addFilter(_SaidInOneLine())


class _SaidInOneLine(logging.Filter):
    """Drops Ray's log records of a `Fatal` error: one with it as its exception (the upload
    thread's `logger.exception`), or its formatted traceback ("Error in training
    function:")."""

    name_in_traceback = f"{Fatal.__module__}.{Fatal.__qualname__}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Fatal):
            return False
        return self.name_in_traceback not in record.getMessage()


def _ran_out(spec: WorkerSpec, step: int) -> str:
    """The error line when the stream ends before train.total_steps. The plan holds enough
    epochs while at least half of what is read is usable (`health.epochs_for`), so this
    means bad data near that limit, or a stream shorter than its plan (a bug)."""
    total = spec.cfg.train.total_steps
    summary = None
    if spec.health is not None:
        import ray

        try:
            summary = ray.get(spec.health.summary.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the line matters more than the counts
            pass
    if summary and summary["skipped"]:
        return (f"the data ran out at step {step} of {total}: {skip_summary(summary)}; fix or "
                f"remove them, or lower train.total_steps")
    return (f"the data ran out at step {step} of {total} with no sample skipped: the stream "
            f"is shorter than its plan; check data.uri and data.split (a dataset rewritten "
            f"during the run?)")


def _skipped(w: Worker, last: bool) -> dict:
    """data/skipped_samples: the data-health actor's count, asked at most every
    `FLUSH_EVERY_S` (and at the last step): a round trip to an actor at every log step is
    ~1 ms of rank 0's time, which every worker waits for at the next collective (1.3% of a
    1,024-GPU log interval, bench/scale.py). In between, the last count is logged again."""
    health = w.spec.health
    if health is None:
        return {}
    if not last and time.monotonic() - w.skipped_at < FLUSH_EVERY_S:
        return w.skipped
    import ray

    try:
        w.skipped = {"data/skipped_samples": float(ray.get(health.summary.remote(),
                                                             timeout=10)["skipped"])}
    except Exception:  # noqa: BLE001 - metrics must never stop training
        w.skipped = {"data/skipped_samples": float("nan")}
    w.skipped_at = time.monotonic()
    return w.skipped


def interval_metrics(means: dict, meter: Meter, cfg: PretrainConfig, lr: float,
                     env: WorkerEnv, flops: float | None, peak: float | None) -> dict:
    """The metrics of a log interval from its means over the workers (`Meter.read`)."""
    elapsed = max(time.perf_counter() - meter.start, 1e-9)
    images_per_sec = meter.steps * cfg.train.global_batch_size / elapsed
    metrics = {"train/loss": means["loss"],
               "train/lr": lr,
               "train/grad_norm": means["grad_norm"],
               # The batch that really went into each optimizer step, summed over workers.
               "train/images_per_step": means["images_per_step"],
               "perf/images_per_sec": images_per_sec,
               "perf/data_wait_frac": meter.data_s / elapsed}
    if flops and peak:
        metrics["perf/mfu"] = images_per_sec * flops / (peak * env.world)
    return metrics


def progress_line(step: int, total: int, m: dict, start_step: int | None = None,
                  elapsed_s: float | None = None) -> str:
    """One log line of training progress; with the step and time this (re)start began,
    also the elapsed time and the time left at this start's mean pace."""
    parts = [f"step {step}/{total}"]
    if elapsed_s is not None and start_step is not None and step > start_step:
        left = (total - step) * elapsed_s / (step - start_step)
        parts.append(f"{clock(elapsed_s)} elapsed, ~{clock(left)} left")
    parts += [f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}",
             f"|g| {m['train/grad_norm']:.2f}", f"{m['perf/images_per_sec']:.1f} img/s",
             f"data wait {m['perf/data_wait_frac']:.0%}"]
    if "perf/mfu" in m:
        parts.append(f"MFU {m['perf/mfu']:.1%}")
    if m.get("data/skipped_samples"):
        parts.append(f"skipped {m['data/skipped_samples']:.0f}")
    parts += [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items()
              if k.startswith("fewshot/") and "/seed" not in k]      # the means, not each seed
    return " | ".join(parts)
