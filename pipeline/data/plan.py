"""The training stream's plan, and an exact position in it.

The training stream is a plan of (epoch, shard) reads: every epoch visits every shard of the
split once, in an order drawn from (seed, epoch), and the epochs are concatenated. Training is
counted in steps, so the worker iterates the stream once; the `epoch` column says where it is.
Same seed -> same plan (`StreamPlan`). A `DataPosition` records exactly which samples a run
has consumed; a resumed run reads only the rest of the plan, so it trains on every sample of
each epoch once, although what the workers had trained on at the checkpoint was not a prefix
of the stream (they split it and shuffle locally).

The plan is never listed: a read is a number, `epoch * num_shards + position`, turned into a
shard from (seed, epoch, position) where it is needed, and a sample's place in the stream is
`StreamPlan.offset` of its read plus its index. In order (`preserve_order`), the stream is
cut on a grid of `block_rows` samples laid over the plan (`ordered_spans`), so that every
worker gets the same samples on every run and a resumed run the rest of what each had.

Plain NumPy: no Ray here. The read tasks that follow the plan are in `pipeline.data.stream`.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.shards import DatasetError


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

    Why not a sample count: the workers read the stream in parallel and each mixes its share
    in a local shuffle buffer, so what was trained at a checkpoint is mostly a prefix of the
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
        return self.advance_ranges(plan, sample_ranges(epoch, shard, index))

    def advance_ranges(self, plan: StreamPlan, ranges) -> DataPosition:
        """`advance` for samples given as (k, 4) int rows (epoch, shard, first, stop): the
        indices [first, stop) of each read, rows in any order, of any reads (what
        `sample_ranges` makes of ids; several workers' rows concatenated). Rows that overlap
        consume a sample twice: ValueError naming it, as `advance`.

        Why ranges: the training loop gathers what every worker trained since the last
        checkpoint on rank 0. As ids that was 24 bytes a sample (~200 MB a checkpoint for
        the B/16-i21k preset, on any cluster size); as ranges it is 32 bytes per run of
        consecutive indices, about one per read a worker touched (bench/scale.py)."""
        ranges = np.asarray(ranges, np.int64).reshape(-1, 4)
        if not len(ranges):
            return self
        sizes = np.asarray(plan.sizes, np.int64)
        epoch, shard, first, stop = ranges.T
        bad = (epoch < 0) | (shard < 0) | (shard >= len(sizes)) | (first < 0) | (stop <= first)
        bad[~bad] = stop[~bad] > sizes[shard[~bad]]
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            index = first[k]        # or the first index past the read's end
            if first[k] >= 0 and 0 <= shard[k] < len(sizes) and stop[k] > sizes[shard[k]]:
                index = max(first[k], sizes[shard[k]])
            raise ValueError(f"advance: no sample epoch {epoch[k]}, shard {shard[k]}, index "
                             f"{index} in a plan of {len(sizes)} shards")
        # Group by read, runs merged (the workers' blocks of a read touch), in order of their
        # first index: one sort of the rows, then a loop over the reads touched instead of
        # over the samples; a read trained whole is one row and skips the overlap check.
        epoch, shard, first, stop = compact(ranges).T
        read = epoch * len(sizes) + shard
        cuts = np.flatnonzero(read[1:] != read[:-1]) + 1
        done, partial = set(self.done), dict(self.partial)
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(read)].tolist(), strict=True):
            key = divmod(int(read[lo]), len(sizes))
            a, b = first[lo:hi], stop[lo:hi]
            # Sorted by first index, a range overlaps one before it where it starts before
            # the furthest stop so far; its first index is then consumed twice.
            twice = np.flatnonzero(a[1:] < np.maximum.accumulate(b)[:-1]) if hi - lo > 1 else ()
            if len(twice):
                raise ValueError(_twice(*key, int(a[twice[0] + 1]), "in this batch"))
            if key in done or key[0] < self.epoch or (
                    key[0] == self.epoch and plan.rank(*key) < self.position):
                raise ValueError(_twice(*key, int(a[0]), "already (its read is done)"))
            count = int((b - a).sum())
            if key not in partial and count == plan.sizes[key[1]]:
                done.add(key)                   # the usual case: a whole read, never listed
                continue
            new = np.concatenate([np.arange(x, y) for x, y in zip(a.tolist(), b.tolist(),
                                                                  strict=True)])
            if key in partial:
                # One sort of both: a sample in both sits twice in a row.
                new = np.sort(np.concatenate([np.asarray(partial[key], np.int64), new]))
                both = np.flatnonzero(new[1:] == new[:-1])
                if len(both):
                    raise ValueError(_twice(*key, int(new[both[0]]), "already"))
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
            partial.setdefault(str(e), {})[str(s)] = to_ranges(idx)
        return {"epoch": self.epoch, "position": self.position,
                "done": {str(e): to_ranges(sorted(s)) for e, s in sorted(done.items())},
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


def sample_ranges(epoch, shard, index) -> np.ndarray:
    """Sample ids (equal length int arrays, any order) -> (k, 4) int64 rows (epoch, shard,
    first, stop), runs of consecutive indices of one read (`compact`). A sample given twice
    gives rows that overlap, which `DataPosition.advance_ranges` names."""
    epoch, shard, index = (np.asarray(a, np.int64).reshape(-1) for a in (epoch, shard, index))
    if not len(epoch) == len(shard) == len(index):
        raise ValueError(f"advance: epoch, shard, index differ in length "
                         f"({len(epoch)}, {len(shard)}, {len(index)})")
    return compact(np.stack([epoch, shard, index, index + 1], axis=1))


def compact(ranges) -> np.ndarray:
    """(k, 4) rows (epoch, shard, first, stop), any order -> the same samples in fewest rows:
    sorted, and rows of one read that touch ([0, 5) and [5, 9)) merged into one. Rows that
    overlap stay apart, so that `advance_ranges` still sees the sample consumed twice. What
    each worker sends at a checkpoint: ~1 row per read it touched, whatever the batch."""
    r = np.asarray(ranges, np.int64).reshape(-1, 4)
    if len(r) < 2:
        return r.copy()
    r = r[np.lexsort((r[:, 2], r[:, 1], r[:, 0]))]
    new = np.r_[True, (r[1:, 0] != r[:-1, 0]) | (r[1:, 1] != r[:-1, 1]) |
                (r[1:, 2] != r[:-1, 3])]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(r)] - 1
    out = r[starts].copy()
    out[:, 3] = r[ends, 3]
    return out


def to_ranges(sorted_ints) -> list[list[int]]:
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
