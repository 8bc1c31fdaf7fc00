"""Ray Data streams of WebDataset shards on storage that feed Ray Train.

The stream follows a plan of (epoch, shard) reads (`pipeline.data.plan`). Ray Data reads the
shards in a bounded number of long-lived read tasks ("slots"). A read is a number, `epoch *
num_shards + position`, and a read task turns it into a shard itself from (seed, epoch,
position). A small actor (`ReadDealer`) hands the numbers out in plan order to whichever task is
free, a few per call on a long plan (`dealing`; on a large cluster several dealers), from one
queue per worker (`Reads.queue`: each worker's tasks an equal share), so the
reads in flight are always the next few of the plan, on any cluster size; it remembers which
numbers went to which slot, so a retried or re-executed task reads exactly what it read before
(Ray replays generator outputs by index, so they must not change). Each read streams the tar,
decodes, augments and yields blocks of `block_rows` rows. With `preserve_order` the slots
instead take contiguous spans of the stream, fixed in advance, so the stream is the plan in
order; its blocks are the cells of a grid of `block_rows` samples laid over the plan
(`plan.ordered_spans`), so that every worker gets the same samples on every run and a resumed
run the rest of what each had. Why slots: Ray Data spends about a millisecond of driver time per
input block and per task, so one block per read made a 90-epoch x 5,000-shard plan minutes of
start-up (`bench/data.py --plan`).

Each Train worker executes a stream of its own, of its share of the slots (`per_worker`, through
`run.WorkerStreams`): the workers see disjoint parts of each epoch, and no actor stands between
the read tasks and the workers (a stream in order goes through Ray Train's split, one
coordinator for all). On the worker, `iter_torch_batches` prefetches and mixes samples in a local
shuffle buffer (`iter_batches`).

Rows: `image` uint8 (S, S, 3), `label` int64 (for a multi-label set, the manifest's
`max_labels` class indices padded with -1), `epoch`, `shard`, `index` int32 (where the sample
came from: with the manifest it identifies the sample), and `lost`, the samples the read task
skipped (`pipeline.data.health`).

We read tars with our own reader instead of `ray.data.read_webdataset` so that one corrupt
image or a truncated tar is skipped and counted (or raised, naming shard and key) instead of
failing the read task. The in-memory twin of this stream is `pipeline.data.synthetic`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.data.health import CHECK_AFTER, data_health, report_interval
from pipeline.data.plan import DataPosition, StreamPlan, ordered_spans, to_ranges
from pipeline.data.reader import (
    MISSING,
    UNDECODABLE,
    BadDataPolicy,
    DataError,
    Problem,
    iter_samples,
)
from pipeline.data.shards import read_manifest
from pipeline.data.transforms import Augment, decode_and_augment

COLUMNS = ("image", "label", "epoch", "shard", "index")
LOST = "lost"   # shard streams only: int32 (4,) epoch, shard, first, stop of skipped samples
READS_AHEAD = 2     # shards a read task fetches ahead of the one it decodes


@dataclass(frozen=True)
class InputConfig:
    """Where the training images come from and how they are prepared."""

    uri: str = ""                   # dataset root (with manifest.json), local or s3://
    split: str = "train"
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    strict: bool = False            # raise on bad data instead of skipping and counting
    shuffle_buffer: int = 2048      # samples mixed locally on each worker (0: off)
    prefetch_batches: int = 2
    block_rows: int = 64            # rows per block a read task yields
    num_cpus_per_read: float = 1.0
    read_tasks: int = 0             # long-lived read tasks (0: as many as the CPUs run)
    # The stream in plan order, each worker's share the same on every run and after a resume
    # (with Ray Data's preserve_order; `ordered_spans`).
    preserve_order: bool = False

    def __post_init__(self):
        if self.block_rows <= 0:
            raise ValueError(f"InputConfig.block_rows must be positive, got {self.block_rows}")
        if self.shuffle_buffer < 0:
            raise ValueError("InputConfig.shuffle_buffer must be >= 0")


# ---------------------------------------------------------------------------------------------
# Reading (runs inside Ray Data tasks)
# ---------------------------------------------------------------------------------------------
def read_dealers(first: int, stop: int, count: int = 1, queues: int = 1) -> tuple:
    """`count` actors that hand out the read numbers [first, stop) in plan order (see the
    module docstring) in `queues` queues, queue q the numbers first + q, first + q + queues,
    ...; dealer d deals the queues q = d (mod count) (`Reads.queue`). Pinned to this node:
    they live as long as the dataset that holds their handles."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(ReadDealer).options(scheduling_strategy=here)
    return tuple(actor.remote(first, stop, queues) for _ in range(min(count, queues)))


class ReadDealer:
    """Read numbers in plan order, each to one slot, and the same ones again to a slot that
    starts over (a retried task, or the dataset executed again): `deal(slot, n, queue)` is
    the n-th read number of `slot`, taken from `queue` (the numbers first + queue, first +
    queue + stride, ... below stop), -1 when the queue is exhausted; `deal_many(slot, n, k,
    queue)` the n-th to (n + k - 1)-th in one call, fewer at the end. Memory: 8 bytes per
    read dealt.

    Why queues: with a stream per worker (`per_worker`) each worker's slots take the reads
    of its own queues, an equal share of the plan: from one queue, the slots that started
    first took every read of a small plan, and the other worker had none.

    Why in batches, and several dealers: one actor serves ~1,500 calls a second here
    (bench/scale.py), and a 1,024-GPU run at B/16 speed finishes ~3,500 reads of 1,000
    samples a second. A slot that takes k reads per call divides the calls by k, and
    `dealing` spreads the slots over dealers. Replay is unchanged: a slot always asks the
    same dealer, by index (a retried task asking for its reads 0..k-1 gets the same ones
    again, whatever batch they were dealt in)."""

    def __init__(self, first: int, stop: int, stride: int = 1):
        self.first, self.stop, self.stride = first, stop, stride
        self.next: dict[int, int] = {}
        self.dealt: dict[int, array] = {}

    def deal(self, slot: int, n: int, queue: int = 0) -> int:
        got = self.deal_many(slot, n, 1, queue)
        return got[0] if got else -1

    def deal_many(self, slot: int, n: int, k: int, queue: int = 0) -> list[int]:
        mine = self.dealt.setdefault(slot, array("q"))
        at = self.next.get(queue, self.first + queue)
        more = range(at, self.stop, self.stride)[:max(n + k - len(mine), 0)]
        if more:
            mine.extend(more)
            self.next[queue] = more[-1] + self.stride
        return mine[n:n + k].tolist()


# A dealer's slots: each calls it about once per k reads, and a read task takes about a
# second or more per read, so this keeps a dealer's calls ~10x under what one serves.
SLOTS_PER_DEALER = 128


def dealing(reads: int, per_epoch: int, slots: int, most: int = 16) -> tuple[int, int]:
    """-> (k, dealers): reads a slot takes per call (`deal_many`), and how many dealers.

    k is up to `most`, fewer where the plan is short for its slots: the slots together hold
    at most a quarter of an epoch (k reads each are dealt ahead of the one being read, so a
    larger k would mix epochs, and the data position would list more reads done past its
    watermark), and each slot gets ~4 calls' worth at least, so a small plan still spreads
    over every slot. Where k cannot carry the calls (many slots on a small epoch), more
    dealers do: one per `SLOTS_PER_DEALER` x k slots. A 1,024-GPU B/16-i21k run (4,096
    slots, 14k shards an epoch): k 1, 32 dealers; this machine's runs: one dealer."""
    k = max(1, min(most, reads // max(4 * slots, 1), per_epoch // max(4 * slots, 1)))
    return k, max(1, -(-slots // (SLOTS_PER_DEALER * k)))


@dataclass(frozen=True)
class Reads:
    """What the read tasks read: the plan numbers [first, stop) (number = epoch * num_shards
    + position) of `plan`, minus what `start` marks consumed, split over `slots` tasks: dealt
    by `dealers`, or with none (`preserve_order`), contiguous runs of the stream cut at
    multiples of `block_rows` samples (`windows`)."""

    plan: StreamPlan
    names: tuple[str, ...]
    start: DataPosition
    stop: int
    slots: int
    dealers: tuple = ()                 # `read_dealers`; slot j asks dealers[queue % len]
    block_rows: int = 1
    batch: int = 1                      # reads per call to a dealer (`dealing`)
    queues: int = 1                     # a multiple of `workers` (`queue`)
    workers: int = 1                    # the workers that split the slots (`per_worker`)

    @property
    def first(self) -> int:
        return self.start.epoch * len(self.plan.sizes) + self.start.position

    def queue(self, slot: int) -> int:
        """The queue of reads `slot` takes from: worker r's slots (r, r + workers, ...; see
        `Slots.dataset`) take the queues r, r + workers, ..., so each worker an equal share
        of the plan (whole reads, in plan order), whatever the order its tasks start in."""
        rank, nth = slot % self.workers, slot // self.workers
        return rank + self.workers * (nth % (self.queues // self.workers))

    def spans(self) -> list[tuple[int, int]]:
        """In order: the stream's samples [start, stop) each read task delivers (`slot`
        indexes them; `ordered_spans`)."""
        return ordered_spans(self.plan, self.start, self.stop, self.block_rows, self.slots)

    def windows(self, slot: int) -> Iterator[tuple[int, int, int]]:
        """(read number, first, stop): the reads of `slot` and the sample indices [first,
        stop) of each that are the slot's to deliver: whole reads where dealt, else the reads
        of the slot's span of the stream (`spans`), the first and last maybe in part."""
        if self.dealers:
            import ray

            queue = self.queue(slot)
            n, dealer = 0, self.dealers[queue % len(self.dealers)]
            while numbers := ray.get(dealer.deal_many.remote(slot, n, self.batch, queue)):
                for number in numbers:
                    yield number, 0, self.plan.sizes[self.plan.shard_at(*divmod(
                        number, len(self.plan.sizes)))]
                n += len(numbers)
            return
        plan, spans = self.plan, self.spans()
        if slot >= len(spans):
            return
        lo, hi = spans[slot]
        number = plan.read_at(lo)
        while number < self.stop and (at := plan.offset(number)) < hi:
            size = plan.sizes[plan.shard_at(*divmod(number, len(plan.sizes)))]
            yield number, max(lo - at, 0), min(hi - at, size)
            number += 1

    def read(self, number: int) -> tuple[int, int, frozenset[int]] | None:
        """-> (epoch, shard, sample indices to skip), or None for a read with nothing left."""
        epoch, position = divmod(number, len(self.plan.sizes))
        shard = self.plan.shard_at(epoch, position)
        if not self.plan.sizes[shard] or (epoch, shard) in self.start.done:
            return None
        return epoch, shard, frozenset(self.start.partial.get((epoch, shard), ()))


class ShardReader:
    """Ray Data UDF: a read task's slot number -> blocks of decoded, augmented rows of the
    reads `Reads.windows(slot)` gives it. Sample indices a read must skip were trained on
    before a resume, or are another slot's: they are read past (a tar streams in order) but
    not decoded.

    Blocks hold `block_rows` rows. Dealt reads fill them in the order the slot reads; in
    order (`preserve_order`), a block is a cell of the plan's grid of `block_rows` samples
    (fewer rows where samples were consumed or skipped): see `Reads.windows`."""

    def __init__(self, fs, root: str, cfg: InputConfig, num_classes: int, reads: Reads,
                 health=None, max_labels: int = 1, check_after: int = CHECK_AFTER):
        self.fs, self.root, self.cfg = fs, root.rstrip("/"), cfg
        # One grid for the spans and the blocks: the config's.
        reads = dataclasses.replace(reads, block_rows=cfg.block_rows)
        self.num_classes, self.reads, self.health = num_classes, reads, health
        self.max_labels, self.check_after = max_labels, check_after
        # The read being decoded: (epoch, shard, skip, first, stop) (see `Reads.windows`).
        self._read: tuple = (0, 0, frozenset(), 0, 0)
        self._lost: collections.deque = collections.deque()
        # Samples delivered since the last report to the data-health actor, and when that
        # was (`_check`).
        self._unreported, self._reported = 0, -math.inf

    def _report(self, problem: Problem) -> None:
        """Queue the samples `problem` lost (minus those consumed before a resume, and those
        another slot delivers) for the next rows to carry, and count them."""
        epoch, shard, skip, lo, hi = self._read
        first, size = problem.first, self.reads.plan.sizes[shard]
        lost = [i for i in range(max(first, lo), min(first + problem.samples, size, hi))
                if i not in skip] if first >= 0 else []
        for a, b in to_ranges(lost):
            self._lost.append((epoch, shard, a, b))
        if self.health is not None:  # fire and forget: never slows the read
            self.health.record.remote(problem.shard, problem.key, problem.reason,
                                      len(lost) if first >= 0 else problem.samples,
                                      problem.kind)

    def _check(self) -> None:
        """Before a read: report the samples delivered and stop if too little of the data
        is usable, at most every `report_interval` (one actor hears every read task)."""
        if self.health is None or time.monotonic() - self._reported < self._interval:
            return
        import ray

        samples, self._unreported = self._unreported, 0
        if message := ray.get(self.health.report.remote(samples, self.check_after)):
            raise DataError(message)
        self._reported = time.monotonic()

    @property
    def _interval(self) -> float:
        return report_interval(self.reads.slots)

    def __call__(self, batch: dict) -> Iterator[dict]:
        cfg, plan = self.cfg, self.reads.plan
        ordered = not self.reads.dealers
        policy = BadDataPolicy(cfg.strict, self._report)
        rows, cell = _empty_rows(), None
        for slot in batch["id"]:
            for number, (epoch, shard, skip, lo, hi), stream in self._streams(int(slot)):
                self._check()
                self._read = (epoch, shard, skip, lo, hi)
                name, delivered = self.reads.names[shard], 0
                at = plan.offset(number)
                for sample in self._samples(name, stream, policy, plan.sizes[shard]):
                    if sample.index >= hi:
                        break
                    if sample.index < lo or sample.index in skip:
                        continue
                    rng = np.random.default_rng([cfg.seed, epoch, shard, sample.index])
                    try:
                        image = decode_and_augment(sample.image, cfg.augment, rng)
                    except Exception as err:  # noqa: BLE001 - any decoder failure is bad data
                        text = str(err).split(" <_io.")[0][:60]   # PIL names its BytesIO
                        policy(Problem(name, sample.key, f"corrupt image ({type(err).__name__}"
                                                         f": {text})", 1, UNDECODABLE,
                                       sample.index))
                        continue
                    if ordered and (at + sample.index) // cfg.block_rows != cell:
                        if rows["image"]:
                            yield _to_block(rows, self.max_labels)
                            rows = _empty_rows()
                        cell = (at + sample.index) // cfg.block_rows
                    delivered += 1
                    rows["image"].append(image)
                    rows["label"].append(sample.label)
                    rows["epoch"].append(epoch)
                    rows["shard"].append(shard)
                    rows["index"].append(sample.index)
                    rows[LOST].append(self._lost.popleft() if self._lost else (0, 0, 0, 0))
                    if not ordered and len(rows["image"]) >= cfg.block_rows:
                        yield _to_block(rows, self.max_labels)
                        rows = _empty_rows()
                self._unreported += delivered
        if self.health is not None and self._unreported:   # fire and forget: the slot's end
            self.health.read.remote(self._unreported)
            self._unreported = 0
        if rows["image"]:
            yield _to_block(rows, self.max_labels)

    def _streams(self, slot: int):
        """(read number, (epoch, shard, skip, first, stop), stream) for each read of the
        slot, the next `READS_AHEAD` reads' shards already fetching (`storage.ReadAhead`)
        while this one is decoded: no wait for the first bytes at a shard boundary, even
        with small shards on a slow store. Memory: two chunks per shard ahead at most."""
        started: collections.deque = collections.deque()
        try:
            for number, lo, hi in self.reads.windows(slot):
                if (read := self.reads.read(number)) is None or lo >= hi:
                    continue
                started.append((number, (*read, lo, hi),
                                open_shard(self.fs, self.root, self.reads.names[read[1]])))
                if len(started) > READS_AHEAD:
                    yield started[0]
                    started.popleft()[2].close()
            while started:
                yield started[0]
                started.popleft()[2].close()
        finally:
            for *_, stream in started:
                stream.close()

    def _samples(self, name: str, stream, policy: BadDataPolicy, expected: int):
        try:
            stream.wait_open()
        except storage.NotFound:
            policy(Problem(name, "-", "shard vanished (listed in the manifest, not on storage)",
                           expected, MISSING, 0))
            return
        yield from iter_samples(stream, name, policy, self.num_classes, expected,
                                self.max_labels)


def open_shard(fs, root: str, name: str, read_ahead: bool = True):
    """A stream of a manifest's shard (read ahead in a thread, or buffered). Its name is
    relative to the dataset root, or a full path or URI: an index of shards stored elsewhere
    (`jobs/make_shards.py index`). With read-ahead, opening errors come from `wait_open()`."""
    if "://" in name or name.startswith("/"):
        fs, path = storage.filesystem(name)
    else:
        path = f"{root.rstrip('/')}/{name}"
    return storage.ReadAhead(fs, path) if read_ahead else storage.open_read(fs, path)


def label_array(labels: list, max_labels: int = 1) -> np.ndarray:
    """int64 (n,) class indices; for a multi-label set (`max_labels` > 1), (n, max_labels)
    index lists padded with -1 (the objectives turn them into multi-hot targets)."""
    if max_labels == 1:
        return np.asarray(labels, dtype=np.int64)
    out = np.full((len(labels), max_labels), -1, np.int64)
    for row, label in enumerate(labels):
        label = label if isinstance(label, tuple) else (label,)
        out[row, :len(label)] = label
    return out


def _empty_rows() -> dict:
    return {c: [] for c in (*COLUMNS, LOST)}


def _to_block(rows: dict, max_labels: int = 1) -> dict:
    return {"image": np.stack(rows["image"]),
            "label": label_array(rows["label"], max_labels),
            "epoch": np.asarray(rows["epoch"], dtype=np.int32),
            "shard": np.asarray(rows["shard"], dtype=np.int32),
            "index": np.asarray(rows["index"], dtype=np.int32),
            LOST: np.asarray(rows[LOST], dtype=np.int32).reshape(-1, 4)}


def lost_ranges(lost) -> np.ndarray:
    """The skipped samples a batch's `lost` column names, as (k, 4) int64 (epoch, shard,
    first, stop) rows, empty ones dropped (what `DataPosition.advance_ranges` takes)."""
    lost = np.asarray(lost, np.int64).reshape(-1, 4)
    return lost[lost[:, 3] > lost[:, 2]]


def lost_samples(lost) -> np.ndarray:
    """The (3, n) epoch, shard, index of the skipped samples a batch's `lost` column names
    ((B, 4) ranges; empty ones are ignored)."""
    lost = np.asarray(lost, np.int64).reshape(-1, 4)
    lost = lost[lost[:, 3] > lost[:, 2]]
    if not len(lost):
        return np.zeros((3, 0), np.int64)
    counts = lost[:, 3] - lost[:, 2]
    starts = np.repeat(lost[:, 2] - np.r_[0, np.cumsum(counts)[:-1]], counts)
    return np.stack([np.repeat(lost[:, 0], counts), np.repeat(lost[:, 1], counts),
                     starts + np.arange(counts.sum())])


def block_bytes(rows: int, image_size: int, max_labels: int = 1, lost: bool = True) -> int:
    """Ray Data's block size limit (`target_max_block_size`) under which every block a read
    task yields stays one block of exactly its rows: 3/4 of a full block of `rows` rows.

    Ray shapes a task's output by bytes: it holds what the task yields until the held bytes
    exceed the limit, then emits them, sliced into pieces of about the limit when they are
    1.5 times over it. A full block (images, `max_labels` int64 labels, three int32 ids and,
    in shard streams, the int32 (4,) `lost` range) is over 3/4 of itself and under 1.5 x 3/4
    of itself, so it passes whole, with a margin of 1/8 either way for Ray's estimate of its
    bytes. Blocks cut elsewhere break the preserve_order guarantee: a limit of a full block
    plus 64 bytes a row, as before, let Ray merge two 64-row blocks and slice 67 rows off
    them, and a resumed run then split the rest of the stream over the workers differently
    from the run it continued (test_parallel.py). A block under 3/4 of a full one (a cell of
    the grid with samples consumed or skipped) is held and merged with what follows."""
    row = 3 * image_size**2 + 8 * max_labels + 12 + (16 if lost else 0)
    return max(1, rows * row * 3 // 4)


def read_slots(reads: int, read_tasks: int = 0, cpus_per_read: float = 1.0) -> int:
    """How many read tasks: `read_tasks`, else as many as the cluster's CPUs run at once;
    never more than the reads. Not more: a task waiting on the dealer (`ray.get`) lends its
    CPU to Ray, which then starts a waiting task, so spare slots end up decoding at the same
    time on too few cores (bench/data.py: 4 slots on 2 CPUs ran at 0.7x of 2 slots). A
    cluster that grows gets more read tasks when the stream is built again (a restart)."""
    import ray

    if not read_tasks:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        read_tasks = min(max(int(cpus / max(cpus_per_read, 0.05)), 1), 4096)
    return max(1, min(read_tasks, reads))


# A Ray Data context travels with its dataset (as `spec.START_KEY` does): the stream's slots,
# so that Ray Train can give each worker a stream of its own (`per_worker`).
SLOTS_KEY = "vit.slots"


@dataclass(frozen=True)
class Slots:
    """A stream as `slots` long-lived read tasks: `fn` turns a batch of slot numbers (the
    `id` column) into blocks, each task running `num_cpus`. `workers`: how many workers the
    slots' reads were shared out for (the dealers' queues, the synthetic stream's stripes):
    only that many can each take slots of their own (`dataset(rank, workers)`) and get
    equal parts of the stream. Why not any number: a worker's slots are long-lived; dealt
    from one queue, the first to start took all of a small plan, and the next worker none."""

    fn: object
    slots: int
    num_cpus: float = 1.0
    workers: int = 1

    def dataset(self, rank: int = 0, world: int = 1, node: str | None = None):
        """The Ray Dataset of slots rank, rank + world, rank + 2 world, ... (all of them with
        the defaults): one row and one read task each, on `node` where it has room."""
        import ray

        mine = len(range(rank, self.slots, world))
        ds = ray.data.range(mine, override_num_blocks=max(mine, 1))
        fn = self.fn if world == 1 else _Strided(self.fn, rank, world)
        near = {}
        if node is not None:      # there where it has room, else anywhere
            from ray._raylet import RAY_NODE_ID_KEY

            near = {"label_selector": {RAY_NODE_ID_KEY: node},
                    "fallback_strategy": [{"label_selector": {}}]}
        ds = ds.map_batches(fn, batch_size=1, num_cpus=self.num_cpus, batch_format="numpy",
                            **near)
        ds.context.set_config(SLOTS_KEY, self)
        return ds

    def __deepcopy__(self, memo):
        # Ray Data deep-copies a dataset's context (a new dataset, a copy for Ray Train):
        # this is read-only, and holds actor handles (the dealers) and a filesystem.
        return self

    def splits_over(self, world: int) -> bool:
        """Whether `world` workers can each take slots of their own, with equal shares."""
        return self.workers == world and self.slots >= world


@dataclass(frozen=True)
class _Strided:
    fn: object
    rank: int
    world: int

    def __call__(self, batch: dict):
        return self.fn({**batch, "id": np.asarray(batch["id"]) * self.world + self.rank})


def per_worker(ds, world: int, options=None, nodes=None) -> list | None:
    """-> one Ray Dataset per rank, of the slots `Slots.dataset(rank, world)` gives it, each
    executed by its own worker (`Dataset.iterator()`), or None where `ds` cannot be split so:
    in order (`options.preserve_order`), or not built of `Slots` cut for `world` workers.

    Why: Ray Train's split (`streaming_split`) runs the whole stream through one
    `SplitCoordinator` actor that every worker calls for every block; at 1,024 GPUs at B/16
    speed that is ~54,000 blocks a second through one Python process, which passed ~155 here
    (bench/scale.py). Here each worker's executor drives its own slots, whose reads come from
    the shared dealers, in plan order, an equal share to each worker. Each rank's executor
    has `options` (Ray Data's `ExecutionOptions`), runs its read tasks on its worker's node
    (`nodes`, by rank) where they fit, and may fill 1/world of the object store one executor
    would. The rank datasets carry `ds`'s context (the group's start point, the block size)."""
    import copy

    import ray
    from ray.data._internal.execution.resource_manager import ResourceManager

    recipe = ds.context.get_config(SLOTS_KEY)
    options = copy.deepcopy(options or ds.context.execution_options)
    if not isinstance(recipe, Slots) or not recipe.splits_over(world) or options.preserve_order:
        return None
    parts, saved = [], ray.data.DataContext.get_current()
    try:
        for rank in range(world):
            ctx = ds.context.copy()
            ctx.execution_options = copy.deepcopy(options)
            whole = ctx.override_object_store_memory_limit_fraction or (
                ResourceManager.DEFAULT_OBJECT_STORE_MEMORY_LIMIT_FRACTION
                if ctx.op_resource_reservation_enabled else
                ResourceManager.DEFAULT_OBJECT_STORE_MEMORY_LIMIT_FRACTION_NO_RESERVATION)
            ctx.override_object_store_memory_limit_fraction = whole / world
            ray.data.DataContext._set_current(ctx)       # what a new dataset copies
            parts.append(recipe.dataset(rank, world, nodes[rank] if nodes else None))
    finally:
        ray.data.DataContext._set_current(saved)
    return parts


def shard_dataset(cfg: InputConfig, num_epochs: int, start: DataPosition | None = None,
                  health_name: str | None = None, manifest: dict | None = None,
                  workers: int = 1):
    """-> (ray.data.Dataset of the training stream, manifest, data-health actor handle).

    The stream is epochs [0, num_epochs) of `StreamPlan.from_manifest(manifest, cfg.split,
    cfg.seed)` minus what `start` (a resumed run's position) has consumed. Keep the handle
    for as long as the data is read: the actor goes when its last handle does. Train workers
    can also find it by name (`health_name`). Pass `manifest` when the caller has read it
    already. `workers` > 1: the slots' reads cut into equal shares for that many workers, each
    to execute its own (`per_worker`). Driver cost: independent of the plan's length (one
    task per slot)."""
    import ray

    # Ray Data reserves a share of the CPUs per operator; on a pipeline that is one map, that
    # left half the CPUs idle (bench/data.py: 0.89k -> 1.34k images/s on 2 CPUs).
    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = False
    manifest = manifest or read_manifest(cfg.uri)
    # Emit blocks of `block_rows` images instead of one block per shard, so that the first
    # batch arrives after a few images, not after a whole shard.
    ctx.target_max_block_size = block_bytes(cfg.block_rows, cfg.augment.size,
                                            int(manifest.get("max_labels", 1)))
    plan = StreamPlan.from_manifest(manifest, cfg.split, cfg.seed)
    start = start or DataPosition()
    names = tuple(s["name"] for s in manifest["splits"][cfg.split]["shards"])
    reads = Reads(plan, names, start, stop=max(num_epochs * len(names), 0), slots=1,
                  block_rows=cfg.block_rows)
    slots = read_slots(max(reads.stop - reads.first, 0), cfg.read_tasks, cfg.num_cpus_per_read)
    batch, count = dealing(max(reads.stop - reads.first, 0), len(names), slots)
    # Queues: one per worker at least (each its equal share), and one per dealer; every
    # queue needs a slot of its worker to take from it.
    workers = workers if slots >= workers > 1 and not cfg.preserve_order else 1
    queues = workers * min(-(-count // workers), slots // workers)
    dealers = () if cfg.preserve_order else read_dealers(reads.first, reads.stop, count, queues)
    reads = dataclasses.replace(reads, slots=slots, dealers=dealers, batch=batch, queues=queues,
                                workers=workers)
    if not dealers:
        slots = max(len(reads.spans()), 1)
    fs, root = storage.filesystem(cfg.uri)
    health = data_health(health_name or f"data-health-{uuid.uuid4().hex[:12]}")
    reader = ShardReader(fs, root, cfg, manifest["num_classes"], reads, health,
                         max_labels=int(manifest.get("max_labels", 1)),
                         check_after=min(plan.samples_per_epoch, CHECK_AFTER))
    # One row per slot, one block per row: each becomes one long-lived read task.
    ds = Slots(reader, slots, cfg.num_cpus_per_read, workers).dataset()
    return ds, manifest, health


def iter_batches(data_iterator, batch_size: int, cfg: InputConfig | None = None,
                 drop_last: bool = True, seed: int | None = None):
    """Torch batches from a Ray Train dataset shard, with prefetching and the local shuffle
    buffer; the `image` column stays uint8 (see `transforms.to_model_input`).

    The buffer holds at least two batches: with less, Ray 2.60's ShufflingBatcher hands out
    short batches mid-stream (it serves a batch from the shuffled rows left whenever more
    than half the buffer's size is left, even when that is under a batch: 12 of 16 rows with
    a buffer of 16 and uneven blocks), and the global batch would not be what was set."""
    cfg = cfg or InputConfig()
    shuffle = max(cfg.shuffle_buffer, 2 * batch_size) if cfg.shuffle_buffer else None
    return data_iterator.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=cfg.prefetch_batches, drop_last=drop_last,
        local_shuffle_buffer_size=shuffle, local_shuffle_seed=seed if shuffle else None)
