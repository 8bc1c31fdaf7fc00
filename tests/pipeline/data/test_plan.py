"""The stream's plan and position, without Ray: every shard once per epoch in an order drawn
from the seed, and a resumed plan that holds exactly what was not consumed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.plan import DataPosition, StreamPlan, compact, sample_ranges, shard_order
from pipeline.data.shards import DatasetError

from .helpers import every_sample


def test_plan_reshuffles_each_epoch_from_the_seed():
    manifest = {"splits": {"train": {"num_samples": 80, "shards": [
        {"name": f"s{i}.tar", "samples": 10} for i in range(8)]}}}
    a = StreamPlan.from_manifest(manifest, "train", seed=1).reads(DataPosition(), 3)
    again = StreamPlan.from_manifest(manifest, "train", 1).reads(DataPosition(), 3)
    assert [x["shard"] for x in a] == [x["shard"] for x in again]
    orders = [[x["shard"] for x in a if x["epoch"] == e] for e in range(3)]
    assert all(sorted(o) == list(range(8)) for o in orders), "every shard once per epoch"
    assert len({tuple(o) for o in orders}) == 3, "a new order every epoch"
    assert orders == [shard_order(8, 1, e) for e in range(3)]
    other = StreamPlan.from_manifest(manifest, "train", 2).reads(DataPosition(), 3)
    assert [x["shard"] for x in other] != [x["shard"] for x in a]
    assert all(x["samples"] == 10 and x["skip"] == [] for x in a)
    resumed = StreamPlan.from_manifest(manifest, "train", 1).reads(DataPosition(1, 5), 3)
    assert resumed == [x for x in a if (x["epoch"], x["position"]) >= (1, 5)]
    with pytest.raises(DatasetError, match="no split 'val'"):
        StreamPlan.from_manifest(manifest, "val", 1)
    with pytest.raises(DatasetError, match="split 'train' has no shards"):
        StreamPlan.from_manifest({"splits": {"train": {"shards": []}}}, "train", 1)


# ---- DataPosition: exactly what was consumed ------------------------------------------------
SIZES = (7, 3, 12, 5, 1, 9)


def delivered(reads) -> list:
    """The samples a stream of these reads yields (ShardReader's rule: all but `skip`)."""
    return [(r["epoch"], r["shard"], i) for r in reads for i in range(r["samples"])
            if i not in set(r["skip"])]


@pytest.mark.parametrize("seed", range(5))
def test_reads_after_any_consumption_are_exactly_the_rest(seed):
    """Workers consume a random subset, in random order and batches, across shards and two
    epochs; after each batch the position's reads deliver exactly what was not consumed."""
    rng = np.random.default_rng(seed)
    plan = StreamPlan(SIZES, seed=seed)
    everything = every_sample(SIZES, 2)
    samples = sorted(everything)
    taken = [samples[k] for k in rng.permutation(len(samples))[:rng.integers(1, len(samples))]]
    position, consumed = DataPosition(), set()
    for batch in np.array_split(np.asarray(taken), rng.integers(1, 6)):
        position = position.advance(plan, batch[:, 0], batch[:, 1], batch[:, 2])
        consumed |= {tuple(x) for x in batch.tolist()}
        rest = delivered(plan.reads(position, 2))
        assert len(rest) == len(set(rest)), "no sample delivered twice"
        assert not set(rest) & consumed, "nothing consumed is delivered again"
        assert set(rest) | consumed == everything, "nothing is lost"
        assert position.consumed_samples(plan) == len(consumed)
        # The watermark: every read before it consumed, the read at it not.
        before = [(e, s) for e in range(2) for p, s in enumerate(shard_order(len(SIZES), seed, e))
                  if (e, p) < (position.epoch, position.position)]
        assert all({(e, s, i) for i in range(SIZES[s])} <= consumed for e, s in before)
        at = shard_order(len(SIZES), seed, position.epoch)[position.position]
        assert not {(position.epoch, at, i) for i in range(SIZES[at])} <= consumed
        # Only partly consumed reads keep their indices.
        for (_, s), idx in position.partial.items():
            assert 0 < len(idx) < SIZES[s] and list(idx) == sorted(idx)
        assert DataPosition.from_dict(json.loads(json.dumps(position.to_dict()))) == position


def test_consuming_a_whole_epoch_moves_the_watermark_to_the_next():
    plan = StreamPlan(SIZES, seed=3)
    rng = np.random.default_rng(0)
    epoch0 = np.asarray(sorted(every_sample(SIZES, 1)))
    epoch0 = epoch0[rng.permutation(len(epoch0))]
    position = DataPosition()
    for batch in np.array_split(epoch0, 4):
        position = position.advance(plan, *batch.T)
    assert position == DataPosition(1, 0), "no done or partial read is left behind"
    assert position.consumed_samples(plan) == sum(SIZES)

    # A read of epoch 1 consumed ahead of the first one waits in `done` until the watermark
    # reaches it.
    first, second = plan.order(1)[:2]
    ahead = position.advance(plan, [1] * SIZES[second], [second] * SIZES[second],
                             range(SIZES[second]))
    assert (ahead.epoch, ahead.position, ahead.done) == (1, 0, {(1, second)})
    caught_up = ahead.advance(plan, [1] * SIZES[first], [first] * SIZES[first],
                              range(SIZES[first]))
    assert caught_up == DataPosition(1, 2)


def test_a_sample_consumed_twice_raises_naming_it():
    plan = StreamPlan(SIZES, seed=0)
    one = DataPosition().advance(plan, [0, 0], [2, 2], [3, 4])
    with pytest.raises(ValueError, match="epoch 0, shard 2, index 3 consumed twice"):
        one.advance(plan, [0, 0], [2, 5], [3, 0])                         # a partial read
    with pytest.raises(ValueError, match="epoch 1, shard 0, index 6 consumed twice"):
        DataPosition().advance(plan, [1, 1, 1], [0, 0, 1], [6, 6, 0])     # in one batch
    whole = DataPosition().advance(plan, [0] * 3, [1] * 3, [0, 1, 2])     # shard 1 is done
    with pytest.raises(ValueError, match="epoch 0, shard 1, index 2 consumed twice"):
        whole.advance(plan, [0], [1], [2])
    with pytest.raises(ValueError, match="epoch 0, shard 4, index 0 consumed twice"):
        DataPosition(1, 0).advance(plan, [0], [4], [0])                   # behind the watermark
    with pytest.raises(ValueError, match="no sample epoch 0, shard 1, index 3"):
        DataPosition().advance(plan, [0], [1], [3])
    with pytest.raises(ValueError, match="no sample epoch 0, shard 6"):
        DataPosition().advance(plan, [0], [6], [0])


def naive_position(plan: StreamPlan, consumed: set, epochs: int) -> DataPosition:
    """What a position must be, by definition, from the set of samples consumed."""
    reads = [(e, s) for e in range(epochs + 1) for s in plan.order(e)]
    have = {r: {i for e, s, i in consumed if (e, s) == r} for r in reads}
    whole = [len(have[r]) == plan.sizes[r[1]] for r in reads]
    w = whole.index(False)
    e, s = reads[w]
    return DataPosition(e, plan.order(e).index(s), frozenset(
        r for r, full in zip(reads[w:], whole[w:], strict=True) if full),
        {r: tuple(sorted(have[r])) for r in reads[w:] if 0 < len(have[r]) < plan.sizes[r[1]]})


@pytest.mark.parametrize("seed", range(8))
def test_ranges_each_worker_compacts_give_the_position_its_samples_give(seed):
    """What the training loop does at a checkpoint: each worker compacts the samples it
    trained (shuffled, in several steps, some reads whole, some in part) into ranges, rank 0
    advances by all workers' ranges at once: the position the definition gives, every time."""
    rng = np.random.default_rng(seed)
    plan = StreamPlan(SIZES, seed=seed)
    samples = np.asarray(sorted(every_sample(SIZES, 2)))
    workers = int(rng.integers(1, 5))
    order = rng.permutation(len(samples))
    position, consumed = DataPosition(), set()
    for checkpoint in np.array_split(order[:rng.integers(1, len(samples))], 3):
        mine = [[] for _ in range(workers)]
        for step in np.array_split(checkpoint, rng.integers(1, 6)):
            for w, part in enumerate(np.array_split(step, workers)):
                mine[w].append(sample_ranges(*samples[part].T))
        sent = [compact(np.concatenate(m)) for m in mine]
        position = position.advance_ranges(plan, np.concatenate(sent))
        consumed |= {tuple(x) for x in samples[checkpoint].tolist()}
        assert position == naive_position(plan, consumed, 2)
        assert position == DataPosition().advance(plan, *np.asarray(sorted(consumed)).T)
        # O(reads touched), not O(samples): at most one row per read and hole.
        assert sum(len(r) for r in sent) <= len(checkpoint)


def test_compact_ranges_are_one_row_per_run_of_a_read():
    ids = np.asarray([(0, 2, i) for i in (5, 3, 4, 9, 6)] + [(1, 2, 0), (0, 1, 0), (0, 1, 1)])
    rows = sample_ranges(*ids[np.random.default_rng(0).permutation(len(ids))].T)
    assert rows.tolist() == [[0, 1, 0, 2], [0, 2, 3, 7], [0, 2, 9, 10], [1, 2, 0, 1]]
    assert compact(np.r_[rows, [[0, 2, 7, 9]]]).tolist() == [
        [0, 1, 0, 2], [0, 2, 3, 10], [1, 2, 0, 1]], "touching runs merge"
    assert sample_ranges([], [], []).shape == (0, 4)
    whole = sample_ranges([0] * 12, [2] * 12, np.random.default_rng(1).permutation(12))
    assert DataPosition().advance_ranges(StreamPlan(SIZES), whole).done == {(0, 2)}


@pytest.mark.parametrize("seed", range(4))
def test_a_sample_two_workers_or_two_steps_trained_raises_naming_it(seed):
    rng = np.random.default_rng(seed)
    plan = StreamPlan(SIZES, seed=seed)
    samples = np.asarray(sorted(every_sample(SIZES, 1)))
    picked = samples[rng.permutation(len(samples))[:30]]
    e, s, i = twice = picked[int(rng.integers(len(picked)))]
    message = f"epoch {e}, shard {s}, index {i} consumed twice"
    halves = np.array_split(picked, 2)
    # Across workers: each compacts alone, so the overlap shows only on rank 0.
    for w in range(2):
        sent = [sample_ranges(*h.T) for h in halves]
        sent[w] = compact(np.r_[sent[w], sample_ranges(*twice[:, None])])
        if (halves[w] == twice).all(axis=1).any():
            sent[1 - w] = compact(np.r_[sent[1 - w], sample_ranges(*twice[:, None])])
        with pytest.raises(ValueError, match=message):
            DataPosition().advance_ranges(plan, np.concatenate(sent))
    # One worker, two steps; and a sample the position holds already.
    with pytest.raises(ValueError, match=message):
        DataPosition().advance_ranges(plan, compact(np.r_[
            sample_ranges(*picked.T), sample_ranges(*twice[:, None])]))
    before = DataPosition().advance(plan, *picked.T)
    with pytest.raises(ValueError, match=message):
        before.advance_ranges(plan, sample_ranges(*twice[:, None]))


def test_ranges_outside_the_plan_are_refused_naming_the_sample():
    plan = StreamPlan(SIZES)
    for row, named in (([0, 1, 2, 5], "shard 1, index 3"), ([0, 1, -1, 1], "shard 1, index -1"),
                       ([0, 6, 0, 1], "shard 6, index 0"), ([-1, 0, 0, 1], "epoch -1"),
                       ([0, 0, 3, 3], "shard 0, index 3")):
        with pytest.raises(ValueError, match=f"no sample .*{named}"):
            DataPosition().advance_ranges(plan, [row])


def test_position_json_is_plain_and_small():
    plan = StreamPlan((10_000, 10_000, 500), seed=0)
    # A checkpoint's usual picture: a long prefix of the first read with a few holes left by
    # the shuffle buffers, a little of the next read, and the last read done out of order.
    order = plan.order(0)
    idx = np.setdiff1d(np.arange(9_000), [17, 4_000, 8_999])
    e = np.zeros(len(idx) + 100 + plan.sizes[order[2]], np.int64)
    s = np.r_[[order[0]] * len(idx), [order[1]] * 100, [order[2]] * plan.sizes[order[2]]]
    i = np.r_[idx, np.arange(100), np.arange(plan.sizes[order[2]])]
    position = DataPosition().advance(plan, e, s, i)
    text = json.dumps(position.to_dict())
    assert len(text) < 200, text
    assert json.loads(text) == position.to_dict()
    assert DataPosition.from_dict(json.loads(text)) == position
    assert position.consumed_samples(plan) == len(i)
    assert DataPosition.from_dict(DataPosition().to_dict()) == DataPosition()


def test_synthetic_plan_is_one_shard_per_epoch():
    plan = StreamPlan.synthetic(100, seed=5)
    assert plan.order(0) == plan.order(7) == [0]
    half = DataPosition().advance(plan, [0] * 50, [0] * 50, range(0, 100, 2))
    assert plan.reads(half, 2) == [
        {"epoch": 0, "position": 0, "shard": 0, "samples": 100, "skip": list(range(0, 100, 2))},
        {"epoch": 1, "position": 0, "shard": 0, "samples": 100, "skip": []}]
    assert half.advance(plan, [0] * 50, [0] * 50, range(1, 100, 2)) == DataPosition(1, 0)
