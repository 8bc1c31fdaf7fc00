"""Ray Data sources that feed Ray Train: WebDataset shards on storage, and a synthetic twin.

The training stream is a plan of (epoch, shard) reads: every epoch visits every shard of the
split once, in an order drawn from (seed, epoch), and the epochs are concatenated. Training is
counted in steps, so the worker iterates the stream once; the `epoch` column says where it is.
Same seed -> same plan (`StreamPlan`). A `DataPosition` records exactly which samples a run
has consumed; a resumed run reads only the rest of the plan, so it trains on every sample of
each epoch once, although what the workers had trained on at the checkpoint was not a prefix
of the stream (they split it and shuffle locally).

Ray Data reads the shards in a bounded number of long-lived read tasks ("slots"). The plan
is never listed: a read is a number, `epoch * num_shards + position`, and a read task turns
it into a shard itself from (seed, epoch, position). A small actor (`ReadDealer`) hands the
numbers out in plan order to whichever task is free, so the reads in flight are always the
next few of the plan, on any cluster size; it remembers which numbers went to which slot, so
a retried or re-executed task reads exactly what it read before (Ray replays generator
outputs by index, so they must not change). Each read streams the tar, decodes, augments and
yields blocks of `block_rows` rows. With `preserve_order` the slots instead take contiguous
spans of the stream, fixed in advance, so the stream is the plan in order; its blocks are
the cells of a grid of `block_rows` samples laid over the plan (`ordered_spans`), so that
every worker gets the same samples on every run and a resumed run the rest of what each had.
Why slots: Ray Data spends about a millisecond of driver time per input block and per task,
so one block per read made a 90-epoch x 5,000-shard plan minutes of start-up
(`bench/data.py --plan`).

Ray Train's `DataConfig` splits the stream across workers, so the workers see disjoint parts
of each epoch. On the worker, `iter_torch_batches` prefetches and mixes samples in a local
shuffle buffer (`batches`).

Rows: `image` uint8 (S, S, 3), `label` int64 (for a multi-label set, the manifest's
`max_labels` class indices padded with -1), `epoch`, `shard`, `index` int32 (where the sample
came from: with the manifest it identifies the sample).

We read tars with our own reader instead of `ray.data.read_webdataset` so that one corrupt
image or a truncated tar is skipped and counted (or raised, naming shard and key) instead of
failing the read task.

Bad data and the plan: a skipped sample is consumed all the same. Each row carries in `lost`
one range of samples its read task skipped (epoch, shard, first, stop; empty when first ==
stop), so the worker that trains the row also records them in the data position: a read with
a bad sample completes, and a resumed run never reads it again. Skipped samples make the
stream shorter than its manifest count, so the plan holds as many epochs as a run needs when
only half of what it reads is usable (`epochs_for`); more skipped than that stops the run
with a `DataError` that counts the skips by cause (`DataHealth`, `skip_summary`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import random
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.data.reader import (
    MISSING,
    UNDECODABLE,
    BadDataPolicy,
    DataError,
    Problem,
    iter_samples,
)
from pipeline.data.shards import DatasetError, read_manifest
from pipeline.data.transforms import Augment, decode_and_augment

log = logging.getLogger(__name__)

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
# Bad-data accounting across read tasks
# ---------------------------------------------------------------------------------------------
USABLE_MIN = 0.5   # stop when under this share of the samples read so far was usable...
CHECK_AFTER = 10_000   # ...once this many were read (or a whole epoch, if smaller)


class DataHealth:
    """Counts what the read tasks deliver and skip, by cause (a small named actor, created
    by `data_health`); the training loop logs `skipped`, and the read tasks ask `verdict`
    before each read whether too little of the data is usable to go on."""

    def __init__(self):
        self.skipped = self.delivered = 0
        self.by_kind: dict[str, dict] = {}   # kind -> {"samples", "first", "shards"}
        self.recent: list[str] = []

    def record(self, shard: str, key: str, reason: str, samples: int, kind: str) -> None:
        self.skipped += samples
        entry = self.by_kind.setdefault(kind, {"samples": 0, "first": f"{shard}/{key}: "
                                               f"{reason}", "shards": []})
        entry["samples"] += samples
        if kind == MISSING and shard not in entry["shards"] and len(entry["shards"]) < 5:
            entry["shards"].append(shard)
        self.recent = (self.recent + [f"{shard}:{key}: {reason}"])[-20:]

    def read(self, samples: int) -> None:
        self.delivered += samples

    def summary(self) -> dict:
        return {"skipped": self.skipped, "delivered": self.delivered,
                "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
                "recent": list(self.recent)}

    def verdict(self, check_after: int) -> str | None:
        """The error line when under USABLE_MIN of at least `check_after` samples read was
        usable, else None."""
        read = self.skipped + self.delivered
        if read < max(check_after, 1) or self.skipped <= (1 - USABLE_MIN) * read:
            return None
        return (f"{skip_summary(self.summary())}; that is too much of the data to train on: "
                f"fix or remove them (vit-shards writes a dataset without undecodable files), "
                f"or point data.uri at a sound copy")


def skip_summary(summary: dict) -> str:
    """'412 of 800 samples read were skipped: 380 undecodable images (first: ...), 32
    samples in missing or empty shards (shard-000006.tar)' from `DataHealth.summary()`."""
    read = summary["skipped"] + summary["delivered"]
    parts = []
    for kind, e in sorted(summary["by_kind"].items(), key=lambda kv: -kv[1]["samples"]):
        where = ", ".join(e["shards"]) if e["shards"] else f"first: {e['first']}"
        parts.append(f"{e['samples']} {kind} ({where})")
    return (f"{summary['skipped']} of {read} samples read were skipped"
            + (": " + ", ".join(parts) if parts else ""))


def data_health(name: str):
    """The `DataHealth` actor of this name (created if absent). Owned by the driver that
    creates it first: it lives as long as the run and takes no CPU. Pinned to the driver's
    node: placed anywhere, it could die with a worker node, and every restarted worker
    group's read tasks would fail on the dead actor until the retries ran out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(DataHealth).options(
        name=name, get_if_exists=True, scheduling_strategy=here).remote()


# ---------------------------------------------------------------------------------------------
# The plan, and an exact position in it
# ---------------------------------------------------------------------------------------------
def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of one epoch: a permutation drawn from (seed, epoch)."""
    order = list(range(num_shards))
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


@functools.lru_cache(maxsize=64)
def _order(num_shards: int, seed: int, epoch: int) -> tuple[int, ...]:
    # Cached: `advance` asks for the same few epochs on every call, and shuffling thousands
    # of shards in Python is not free.
    return tuple(shard_order(num_shards, seed, epoch))


@functools.lru_cache(maxsize=64)
def _starts(sizes: tuple[int, ...], seed: int, epoch: int) -> np.ndarray:
    """position -> samples of the epoch before that position's read, and the epoch's size
    last ((num_shards + 1,))."""
    starts = np.zeros(len(sizes) + 1, np.int64)
    starts[1:] = np.cumsum(np.asarray(sizes, np.int64)[list(_order(len(sizes), seed, epoch))])
    starts.flags.writeable = False  # shared by every caller of the cache
    return starts


@functools.lru_cache(maxsize=64)
def _ranks(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """shard -> its position in the epoch's order."""
    ranks = np.empty(num_shards, np.int64)
    ranks[list(_order(num_shards, seed, epoch))] = np.arange(num_shards)
    ranks.flags.writeable = False  # shared by every caller of the cache
    return ranks


@dataclass(frozen=True)
class StreamPlan:
    """The training stream as (epoch, shard) reads: every epoch reads every shard once, in
    `shard_order(len(sizes), seed, epoch)`, and the epochs follow each other.

    `sizes`: samples per shard, in manifest order (a row's `shard` indexes it). The synthetic
    source is one shard of `num_samples` samples."""

    sizes: tuple[int, ...]
    seed: int = 0

    def __post_init__(self):
        if not self.sizes or min(self.sizes) < 0 or sum(self.sizes) == 0:
            # An epoch must hold a sample: the watermark walks past empty reads.
            raise ValueError(f"StreamPlan needs shards with samples, got sizes {self.sizes}")

    @classmethod
    def from_manifest(cls, manifest: dict, split: str, seed: int) -> StreamPlan:
        if split not in manifest["splits"]:
            raise DatasetError(f"no split {split!r} in the dataset; it has "
                               f"{sorted(manifest['splits'])}")
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise DatasetError(f"split {split!r} has no shards")
        if not any(s["samples"] for s in shards):
            raise DatasetError(f"split {split!r} has no samples")
        return cls(tuple(int(s["samples"]) for s in shards), seed)

    @classmethod
    def synthetic(cls, num_samples: int, seed: int = 0) -> StreamPlan:
        return cls((int(num_samples),), seed)

    @property
    def samples_per_epoch(self) -> int:
        return sum(self.sizes)

    def order(self, epoch: int) -> list[int]:
        """Shard indices of the epoch, in reading order."""
        return list(_order(len(self.sizes), self.seed, epoch))

    def shard_at(self, epoch: int, position: int) -> int:
        """The shard read at `position` of the epoch's order."""
        return _order(len(self.sizes), self.seed, epoch)[position]

    def rank(self, epoch: int, shard: int) -> int:
        """The position of `shard` in the epoch's order."""
        return int(_ranks(len(self.sizes), self.seed, epoch)[shard])

    def offset(self, number: int) -> int:
        """Where read `number` (epoch * num_shards + position) starts in the stream: the
        samples of all reads before it in plan order."""
        epoch, position = divmod(number, len(self.sizes))
        return epoch * self.samples_per_epoch + int(
            _starts(self.sizes, self.seed, epoch)[position])

    def read_at(self, offset: int) -> int:
        """The number of the read that holds stream sample `offset`."""
        epoch, within = divmod(offset, self.samples_per_epoch)
        starts = _starts(self.sizes, self.seed, epoch)
        return epoch * len(self.sizes) + int(np.searchsorted(starts, within, "right")) - 1

    def reads(self, position: DataPosition, num_epochs: int) -> list[dict]:
        """What is left to read of epochs [0, num_epochs) after `position`, in plan order:
        [{"epoch", "position", "shard", "samples", "skip"}, ...]. Reads the position marks
        fully consumed are left out; `skip` lists (sorted) the sample indices a partly
        consumed read has delivered already, so that no sample is trained twice."""
        items = []
        for epoch in range(position.epoch, num_epochs):
            first = position.position if epoch == position.epoch else 0
            for pos, shard in enumerate(self.order(epoch)):
                if pos < first or (epoch, shard) in position.done or not self.sizes[shard]:
                    continue
                items.append({"epoch": epoch, "position": pos, "shard": shard,
                              "samples": self.sizes[shard],
                              "skip": list(position.partial.get((epoch, shard), ()))})
        return items


@dataclass(frozen=True)
class DataPosition:
    """Exactly which samples of the stream a run has consumed, so that a resumed run trains
    on every sample of each epoch once.

    Why not a sample count: Ray Train splits the stream across workers and each mixes it in
    a local shuffle buffer, so what was trained at a checkpoint is mostly a prefix of the
    plan with holes, not a prefix. Hence three parts:

    - `(epoch, position)`: the watermark; every read before it in plan order is consumed.
    - `done`: (epoch, shard) reads at or after the watermark that are fully consumed.
    - `partial`: (epoch, shard) -> sorted sample indices consumed of a partly consumed read.

    Immutable: `advance` returns a new position (treat `partial` as read-only). The JSON form
    (`to_dict`) keeps index sets as [start, stop) ranges: consumed sets are mostly runs, so it
    stays small even where a read never completes (a sample lost to bad data is never
    consumed: its read stays partial, the watermark waits there, and a resumed run re-reads
    that shard skipping what was consumed)."""

    epoch: int = 0
    position: int = 0
    done: frozenset[tuple[int, int]] = frozenset()
    partial: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)

    def advance(self, plan: StreamPlan, epoch, shard, index) -> DataPosition:
        """The position after also consuming the samples (epoch[k], shard[k], index[k]): equal
        length int arrays, in any order, of any reads. A sample consumed twice (in these
        arrays, or already by this position) raises ValueError naming it: it means the stream
        or its bookkeeping is wrong."""
        epoch, shard, index = (np.asarray(a, np.int64).reshape(-1) for a in (epoch, shard, index))
        if not len(epoch) == len(shard) == len(index):
            raise ValueError(f"advance: epoch, shard, index differ in length "
                             f"({len(epoch)}, {len(shard)}, {len(index)})")
        if not len(epoch):
            return self
        sizes = np.asarray(plan.sizes, np.int64)
        bad = (epoch < 0) | (shard < 0) | (shard >= len(sizes))
        bad[~bad] = (index[~bad] < 0) | (index[~bad] >= sizes[shard[~bad]])
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"advance: no sample epoch {epoch[k]}, shard {shard[k]}, index "
                             f"{index[k]} in a plan of {len(sizes)} shards")
        # Group by read, and sort each read's indices: one pass over the arrays, then a loop
        # over the (few) reads touched instead of over the samples.
        read = epoch * len(sizes) + shard
        by = np.lexsort((index, read))
        read, index = read[by], index[by]
        twice = (read[1:] == read[:-1]) & (index[1:] == index[:-1])
        if twice.any():
            k = int(np.flatnonzero(twice)[0])
            e, s = divmod(int(read[k]), len(sizes))
            raise ValueError(_twice(e, s, int(index[k]), "in this batch"))
        cuts = np.flatnonzero(read[1:] != read[:-1]) + 1
        done, partial = set(self.done), dict(self.partial)
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(read)], strict=True):
            key = divmod(int(read[lo]), len(sizes))
            new = index[lo:hi]
            if key in done or key[0] < self.epoch or (
                    key[0] == self.epoch and plan.rank(*key) < self.position):
                raise ValueError(_twice(*key, int(new[0]), "already (its read is done)"))
            if key in partial:
                old = np.asarray(partial[key], np.int64)
                both = np.intersect1d(old, new, assume_unique=True)
                if len(both):
                    raise ValueError(_twice(*key, int(both[0]), "already"))
                new = np.union1d(old, new)
            if len(new) == plan.sizes[key[1]]:
                done.add(key)
                partial.pop(key, None)
            else:
                partial[key] = tuple(new.tolist())
        # Move the watermark past every leading done read, across epoch boundaries; it stops
        # at the first read not done, which exists because every epoch holds a sample.
        e, p, order = self.epoch, self.position, plan.order(self.epoch)
        while True:
            if p >= len(order):
                e, p, order = e + 1, 0, plan.order(e + 1)
                continue
            key = (e, order[p])
            if key in done:
                done.discard(key)
            elif plan.sizes[key[1]]:
                break
            p += 1
        return DataPosition(e, p, frozenset(done), partial)

    def consumed_samples(self, plan: StreamPlan) -> int:
        """How many samples of the stream this position has consumed."""
        before = sum(plan.sizes[s] for s in plan.order(self.epoch)[:self.position])
        return (self.epoch * plan.samples_per_epoch + before
                + sum(plan.sizes[s] for _, s in self.done)
                + sum(len(v) for v in self.partial.values()))

    def to_dict(self) -> dict:
        """Plain JSON: {"epoch", "position", "done": {"<epoch>": [[first shard, stop), ...]},
        "partial": {"<epoch>": {"<shard>": [[first index, stop), ...]}}}."""
        done: dict[int, list[int]] = {}
        for e, s in self.done:
            done.setdefault(e, []).append(s)
        partial: dict[str, dict] = {}
        for (e, s), idx in sorted(self.partial.items()):
            partial.setdefault(str(e), {})[str(s)] = _to_ranges(idx)
        return {"epoch": self.epoch, "position": self.position,
                "done": {str(e): _to_ranges(sorted(s)) for e, s in sorted(done.items())},
                "partial": partial}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        done = frozenset((int(e), s) for e, ranges in d.get("done", {}).items()
                         for s in _from_ranges(ranges))
        partial = {(int(e), int(s)): tuple(_from_ranges(ranges))
                   for e, shards in d.get("partial", {}).items()
                   for s, ranges in shards.items()}
        return cls(int(d.get("epoch", 0)), int(d.get("position", 0)), done, partial)


def _twice(epoch: int, shard: int, index: int, where: str) -> str:
    return (f"sample epoch {epoch}, shard {shard}, index {index} consumed twice ({where}): "
            f"the stream delivered it again, or a batch was recorded twice")


def _to_ranges(sorted_ints) -> list[list[int]]:
    """[0, 1, 2, 5, 6] -> [[0, 3], [5, 7]] (half-open runs)."""
    a = np.asarray(sorted_ints, np.int64)
    if not len(a):
        return []
    cuts = np.flatnonzero(np.diff(a) != 1) + 1
    starts, ends = a[np.r_[0, cuts]], a[np.r_[cuts - 1, len(a) - 1]] + 1
    return np.stack([starts, ends], axis=1).tolist()


def _from_ranges(ranges) -> list[int]:
    if not ranges:
        return []
    return np.concatenate([np.arange(int(a), int(b)) for a, b in ranges]).tolist()


def check_shards(manifest: dict, uri: str, split: str) -> list[str]:
    """Compare the split's shards with one listing of the dataset folder (on S3, one request
    per 1,000 objects; reading the shards to count them is what `vit-shards index` is for):
    -> one warning line per problem found. Shards named by full URI are not checked. Raises
    DatasetError when none of the shards is there (a wrong data.uri)."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError):
        return []       # read_manifest could read the folder; the reads will name what fails
    sizes = {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
    entries = [e for e in manifest["splits"][split]["shards"]
               if "://" not in e["name"] and not e["name"].startswith("/")]
    missing = [e["name"] for e in entries if e["name"] not in sizes]
    if entries and len(missing) == len(entries):
        raise DatasetError(f"{uri}: none of the {len(entries)} shards of split {split!r} that "
                           f"manifest.json lists is there (e.g. {missing[0]}); check data.uri")
    changed = [f"{e['name']} ({sizes[e['name']]} bytes, manifest.json says {e['bytes']})"
               for e in entries if e["name"] in sizes and e.get("bytes") is not None
               and sizes[e["name"]] != e["bytes"]]
    lines = []
    if missing:
        lines.append(f"{len(missing)} of the {len(entries)} shards of split {split!r} are not "
                     f"at {uri} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                     f"; their samples are skipped and counted")
    if changed:
        lines.append(f"{len(changed)} shard(s) changed after manifest.json was written: "
                     f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}; one "
                     f"with more samples than it says stops the run when it is read (rewrite "
                     f"or re-index the dataset: vit-shards)")
    return lines


def epochs_for(manifest: dict, split: str, samples: int) -> int:
    """Epochs of the plan for a run that trains on `samples` samples: enough when only
    USABLE_MIN of the data is usable (below that, `DataHealth.verdict` stops the run), and
    one spare for what the split across workers drops. Only an upper bound: the read tasks
    read the plan as the run consumes it, so unused epochs cost nothing."""
    per_epoch = manifest["splits"][split]["num_samples"]
    return math.ceil(samples / (max(per_epoch, 1) * USABLE_MIN)) + 1


# ---------------------------------------------------------------------------------------------
# Reading (runs inside Ray Data tasks)
# ---------------------------------------------------------------------------------------------
def read_dealer(first: int, stop: int):
    """The actor that hands out the read numbers [first, stop) in plan order (see the module
    docstring), pinned to this node: it lives as long as the dataset that holds its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ReadDealer).options(scheduling_strategy=here).remote(
        first, stop)


class ReadDealer:
    """Read numbers in plan order, each to one slot, and the same ones again to a slot that
    starts over (a retried task, or the dataset executed again): `deal(slot, n)` is the n-th
    read number of `slot`, -1 when the plan is exhausted. Memory: 8 bytes per read dealt."""

    def __init__(self, first: int, stop: int):
        self.next, self.stop = first, stop
        self.dealt: dict[int, array] = {}

    def deal(self, slot: int, n: int) -> int:
        mine = self.dealt.setdefault(slot, array("q"))
        if n < len(mine):
            return mine[n]
        if self.next >= self.stop:
            return -1
        mine.append(self.next)
        self.next += 1
        return mine[-1]


def ordered_spans(plan: StreamPlan, start: DataPosition, stop: int, block_rows: int,
                  tasks: int) -> list[tuple[int, int]]:
    """The stream in order (`preserve_order`) as contiguous spans of samples [start, stop),
    one per read task: the read numbers [start's watermark, `stop`) of `plan`, by where each
    sample sits in the plan (`StreamPlan.offset`), cut on the grid of `block_rows` samples
    counted from the plan's start. Each cell of the grid becomes one block (`ShardReader`).

    Why the grid: Ray Train's split hands each worker whole blocks, in turn while they are
    the same size, so which worker trains a sample depends on where the blocks are cut. Cut
    where the plan says, and not where a read task or a resumed stream happens to start, the
    blocks of a resumed run are those of the run it continues, less what was consumed, and
    each worker gets the rest of its own stream. A cell that was partly consumed is a span of
    its own: Ray merges a small block with the next one the same task yields (`block_bytes`),
    but not the last one of a task. The rest of the stream is cut into `tasks` spans."""
    b, n = block_rows, len(plan.sizes)
    begin = plan.offset(start.epoch * n + start.position)
    end = plan.offset(stop)
    if begin >= end:
        return []
    first, last = begin // b, -(-end // b)       # the cells [first, last) of the stream
    partly = {first} if begin % b else set()   # a watermark inside a cell
    for (epoch, shard), consumed in start.partial.items():
        at = plan.offset(epoch * n + plan.rank(epoch, shard))
        partly.update(((at + np.asarray(consumed, np.int64)) // b).tolist())
    for epoch, shard in start.done:
        at = plan.offset(epoch * n + plan.rank(epoch, shard))
        partly.update((at // b, (at + plan.sizes[shard] - 1) // b))
    cells, cell = [], first
    for c in sorted(c for c in partly if first <= c < last):
        cells += [(cell, c)] if cell < c else []
        cells.append((c, c + 1))
        cell = c + 1
    if cell < last:
        per = -(-(last - cell) // max(tasks, 1))
        cells += [(c, min(c + per, last)) for c in range(cell, last, per)]
    return [(max(lo * b, begin), min(hi * b, end)) for lo, hi in cells]


@dataclass(frozen=True)
class Reads:
    """What the read tasks read: the plan numbers [first, stop) (number = epoch * num_shards
    + position) of `plan`, minus what `start` marks consumed, split over `slots` tasks: dealt
    by `dealer`, or with none (`preserve_order`), contiguous runs of the stream cut at
    multiples of `block_rows` samples (`windows`)."""

    plan: StreamPlan
    names: tuple[str, ...]
    start: DataPosition
    stop: int
    slots: int
    dealer: object = None
    block_rows: int = 1

    @property
    def first(self) -> int:
        return self.start.epoch * len(self.plan.sizes) + self.start.position

    def spans(self) -> list[tuple[int, int]]:
        """In order: the stream's samples [start, stop) each read task delivers (`slot`
        indexes them; `ordered_spans`)."""
        return ordered_spans(self.plan, self.start, self.stop, self.block_rows, self.slots)

    def windows(self, slot: int) -> Iterator[tuple[int, int, int]]:
        """(read number, first, stop): the reads of `slot` and the sample indices [first,
        stop) of each that are the slot's to deliver: whole reads where dealt, else the reads
        of the slot's span of the stream (`spans`), the first and last maybe in part."""
        if self.dealer is not None:
            import ray

            n = 0
            while (number := ray.get(self.dealer.deal.remote(slot, n))) >= 0:
                yield number, 0, self.plan.sizes[self.plan.shard_at(*divmod(
                    number, len(self.plan.sizes)))]
                n += 1
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

    def _report(self, problem: Problem) -> None:
        """Queue the samples `problem` lost (minus those consumed before a resume, and those
        another slot delivers) for the next rows to carry, and count them."""
        epoch, shard, skip, lo, hi = self._read
        first, size = problem.first, self.reads.plan.sizes[shard]
        lost = [i for i in range(max(first, lo), min(first + problem.samples, size, hi))
                if i not in skip] if first >= 0 else []
        for a, b in _to_ranges(lost):
            self._lost.append((epoch, shard, a, b))
        if self.health is not None:  # fire and forget: never slows the read
            self.health.record.remote(problem.shard, problem.key, problem.reason,
                                      len(lost) if first >= 0 else problem.samples,
                                      problem.kind)

    def _check(self) -> None:
        if self.health is None:
            return
        import ray

        if message := ray.get(self.health.verdict.remote(self.check_after)):
            raise DataError(message)

    def __call__(self, batch: dict) -> Iterator[dict]:
        cfg, plan = self.cfg, self.reads.plan
        ordered = self.reads.dealer is None
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
                if self.health is not None and delivered:
                    self.health.read.remote(delivered)
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
        except (FileNotFoundError, OSError) as err:
            if "not found" in str(err).lower() or "no such" in str(err).lower() or isinstance(
                    err, FileNotFoundError):
                policy(Problem(name, "-", "shard vanished (listed in the manifest, not on "
                                          "storage)", expected, MISSING, 0))
                return
            raise
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


def shard_dataset(cfg: InputConfig, num_epochs: int, start: DataPosition | None = None,
                  health_name: str | None = None, manifest: dict | None = None):
    """-> (ray.data.Dataset of the training stream, manifest, data-health actor handle).

    The stream is epochs [0, num_epochs) of `StreamPlan.from_manifest(manifest, cfg.split,
    cfg.seed)` minus what `start` (a resumed run's position) has consumed. Keep the handle
    for as long as the data is read: the actor goes when its last handle does. Train workers
    can also find it by name (`health_name`). Pass `manifest` when the caller has read it
    already. Driver cost: independent of the plan's length (one task per slot)."""
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
    dealer = None if cfg.preserve_order else read_dealer(reads.first, reads.stop)
    reads = dataclasses.replace(reads, slots=slots, dealer=dealer)
    if dealer is None:
        slots = max(len(reads.spans()), 1)
    fs, root = storage.filesystem(cfg.uri)
    health = data_health(health_name or f"data-health-{uuid.uuid4().hex[:12]}")
    reader = ShardReader(fs, root, cfg, manifest["num_classes"], reads, health,
                         max_labels=int(manifest.get("max_labels", 1)),
                         check_after=min(plan.samples_per_epoch, CHECK_AFTER))
    # One row per slot, one block per row: each becomes one long-lived read task.
    ds = ray.data.range(slots, override_num_blocks=slots)
    ds = ds.map_batches(reader, batch_size=1, num_cpus=cfg.num_cpus_per_read,
                        batch_format="numpy")
    return ds, manifest, health


def synthetic_rows(ids: np.ndarray, num_samples: int, num_classes: int, image_size: int,
                   learnable: bool = True) -> dict:
    """Rows of the synthetic source for global sample ids (epoch * num_samples + index).
    `learnable`: the red channel of each image encodes its label, so the loss can fall. A
    sample's pixels depend on its id only, not on how the stream is cut into blocks."""
    n = len(ids)
    labels = (ids % num_samples) % num_classes
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for row, i in enumerate(ids.tolist()):
        images[row] = np.random.default_rng(i).integers(0, 256, images.shape[1:], np.uint8)
    if learnable:
        shade = (labels * (192 // max(num_classes - 1, 1))).astype(np.int32)   # 0..192
        images[..., 0] = (images[..., 0] // 4 + shade[:, None, None]).astype(np.uint8)
    return {"image": images, "label": labels.astype(np.int64),
            "epoch": (ids // num_samples).astype(np.int32), "shard": np.zeros(n, np.int32),
            "index": (ids % num_samples).astype(np.int32)}


def synthetic_dataset(num_samples: int, num_classes: int = 10, image_size: int = 224,
                      num_epochs: int = 1, block_rows: int = 64, learnable: bool = True,
                      start: DataPosition | None = None, seed: int = 0):
    """Same columns as `shard_dataset`, generated in memory: for tests, and to ask "is the
    accelerator starved?" (train on it and compare images/s with the real input).

    Its plan is `StreamPlan.synthetic(num_samples, seed)`, one shard per epoch; the stream is
    the sample ids (epoch * num_samples + index) of epochs [0, num_epochs) that `start` has
    not consumed, in order."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = block_bytes(block_rows, image_size, lost=False)
    # The ids left, as [lo, hi) runs of global ids: a partly consumed epoch leaves few runs
    # (its holes and the tail), so the id list itself is never materialised.
    plan, start = StreamPlan.synthetic(num_samples, seed), start or DataPosition()
    runs = []
    for r in plan.reads(start, num_epochs):
        base = r["epoch"] * num_samples
        edges = np.r_[-1, np.asarray(r["skip"], np.int64), num_samples]
        keep = edges[1:] - edges[:-1] > 1
        runs += zip((base + edges[:-1][keep] + 1).tolist(), (base + edges[1:][keep]).tolist(),
                    strict=True)
    lo = np.asarray([a for a, _ in runs], np.int64)
    hi = np.asarray([b for _, b in runs], np.int64)
    # A sample's id is its place in the plan: the read tasks take spans of the grid of
    # `block_rows` ids, and each cell of it is one block (`ordered_spans`).
    spans = ordered_spans(plan, start, num_epochs, block_rows,
                          read_slots(max(int(hi[-1] - lo[0]) // block_rows, 1)) if runs else 1)

    def make(batch: dict) -> Iterator[dict]:
        first, stop = spans[int(batch["id"][0])]
        for cell in range(first // block_rows, -(-stop // block_rows)):
            ids = np.arange(max(cell * block_rows, first), min((cell + 1) * block_rows, stop),
                            dtype=np.int64)
            at = np.searchsorted(lo, ids, side="right") - 1
            ids = ids[(at >= 0) & (ids < hi[np.maximum(at, 0)])]     # not consumed
            if len(ids):
                yield synthetic_rows(ids, num_samples, num_classes, image_size, learnable)

    # Few long read tasks: Ray Data's driver cost grows with the number of input blocks
    # (2,048 cost ~3 s), and the grid, not the tasks, says where blocks are cut.
    ds = ray.data.range(len(spans), override_num_blocks=max(len(spans), 1))
    return ds.map_batches(make, batch_size=1, batch_format="numpy")


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


def load_fewshot_set(uri: str, image_size: int, max_images: int) -> dict:
    """A downstream set for the few-shot probe, at most `max_images` of each split, resized to
    the model's resolution: {"train_images", "train_labels", "test_images", "test_labels",
    "num_classes"}. `uri`: shards with a manifest (train split `train800val200` or `train`,
    test split `test` or `val`: what `jobs/make_shards.py vtab` or `folder` writes) or a
    local VTAB-1k task folder (train800val200 and test)."""
    from pathlib import Path

    from pipeline.data import shards

    if not storage.is_s3(uri) and (Path(uri) / "train800val200.txt").exists():
        src = shards.vtab_folder(uri)
        aug, rng = Augment("resize", image_size), np.random.default_rng(0)
        parts = {}
        for part, split in (("train", "train800val200"), ("test", "test")):
            refs = src.splits.get(split, [])[:max_images]
            parts[f"{part}_images"] = np.stack([decode_and_augment(r.load()[0], aug, rng)
                                                for r in refs]) if refs else np.zeros(
                (0, image_size, image_size, 3), np.uint8)
            parts[f"{part}_labels"] = np.asarray([r.label for r in refs], np.int64)
        return {**parts, "num_classes": len(src.classes)}
    manifest = read_manifest(uri)
    have = manifest["splits"]
    train = next((s for s in ("train800val200", "train") if s in have), None)
    test = next((s for s in ("test", "val") if s in have), None)
    if train is None or test is None:
        raise DatasetError(f"{uri}: a few-shot set needs a train split (train800val200 or "
                           f"train) and a test split (test or val); it has {sorted(have)}")
    tr = load_probe(uri, train, image_size, max_images)
    te = load_probe(uri, test, image_size, max_images)
    return {"train_images": tr["images"], "train_labels": tr["labels"],
            "test_images": te["images"], "test_labels": te["labels"],
            "num_classes": int(manifest["num_classes"])}


def load_probe(uri: str, split: str, image_size: int, max_images: int, seed: int = 0) -> dict:
    """A small labelled set for the few-shot probe, read directly (no Ray Data), resized to
    the model's resolution: {"images": uint8 (n, S, S, 3), "labels": int64 (n,)}. Bad samples
    are skipped."""
    manifest = read_manifest(uri)
    if split not in manifest["splits"]:
        raise DatasetError(f"{uri}: no split {split!r} for the few-shot probe; it has "
                           f"{sorted(manifest['splits'])} (set data.fewshot_split)")
    fs, root = storage.filesystem(uri)
    aug = Augment("resize", image_size)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    policy = BadDataPolicy(strict=False)
    for entry in manifest["splits"][split]["shards"]:
        try:
            stream = open_shard(fs, root, entry["name"], read_ahead=False)
        except (FileNotFoundError, OSError):
            continue
        with stream:
            for sample in iter_samples(stream, entry["name"], policy, manifest["num_classes"],
                                       max_labels=int(manifest.get("max_labels", 1))):
                try:
                    images.append(decode_and_augment(sample.image, aug, rng))
                except Exception:  # noqa: BLE001
                    continue
                # A multi-label sample counts as its first label: the linear few-shot probe
                # classifies one class per image.
                labels.append(sample.label[0] if isinstance(sample.label, tuple)
                              else sample.label)
                if len(images) >= max_images:
                    break
        if len(images) >= max_images:
            break
    return {"images": np.stack(images) if images else np.zeros((0, image_size, image_size, 3),
                                                                 np.uint8),
            "labels": np.asarray(labels, dtype=np.int64)}
