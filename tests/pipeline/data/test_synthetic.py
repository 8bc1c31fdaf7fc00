"""The synthetic (noise) stream: the interface of a shard stream, and resumable."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from pipeline.data.plan import DataPosition, StreamPlan
from pipeline.data.stream import COLUMNS
from pipeline.data.synthetic import noise_dataset


@pytest.mark.ray
def test_synthetic_source_has_the_same_interface(ray_local):
    ds = noise_dataset(num_samples=32, num_classes=4, image_size=16, num_epochs=2)
    rows = ds.take_all()
    assert len(rows) == 64 and set(rows[0]) == set(COLUMNS)
    assert rows[0]["image"].shape == (16, 16, 3) and rows[0]["image"].dtype == np.uint8
    assert Counter(r["epoch"] for r in rows) == {0: 32, 1: 32}
    assert {r["label"] for r in rows} == {0, 1, 2, 3}


@pytest.mark.ray
def test_synthetic_source_resumes_at_a_position(ray_local):
    plan = StreamPlan.synthetic(30, seed=2)
    rng = np.random.default_rng(0)
    # Most of epoch 0 (with holes) and a little of epoch 1, as two workers leave it.
    taken = [(0, 0, i) for i in range(30) if rng.random() < 0.8]
    taken += [(1, 0, i) for i in range(30) if rng.random() < 0.1]
    taken = np.asarray(taken)
    position = DataPosition().advance(plan, *taken.T)
    ds = noise_dataset(30, num_classes=4, image_size=8, num_epochs=3, block_rows=4,
                       start=position, seed=2)
    rows = ds.take_all()
    keys = [(r["epoch"], r["index"]) for r in rows]
    expected = {(e, i) for e in range(3) for i in range(30)} - {(e, i) for e, _, i in taken}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert all(r["label"] == r["index"] % 4 and r["shard"] == 0 for r in rows)
    assert len(noise_dataset(30, 4, 8, 1, start=DataPosition(1, 0)).take_all()) == 0


@pytest.mark.ray
def test_a_stream_per_worker_gives_each_an_equal_share_of_a_resumed_stream(ray_local):
    """`workers=3`: the stream as three streams of their own (`per_worker`, what each Train
    worker executes), each executed here: together every id left exactly once, each worker
    within a block per read task of a third. Another worker count, or a stream in order,
    cannot be split so (None: Ray Train's split)."""
    from ray.data import ExecutionOptions

    from pipeline.data.stream import per_worker

    plan = StreamPlan.synthetic(50, seed=1)
    taken = np.asarray([(0, 0, i) for i in range(50) if i % 7 and i < 40])
    position = DataPosition().advance(plan, *taken.T)
    ds = noise_dataset(50, num_classes=4, image_size=8, num_epochs=3, block_rows=4,
                       start=position, seed=1, read_tasks=4, num_cpus_per_read=0.5, workers=3)
    parts = per_worker(ds, 3)
    assert parts is not None and len(parts) == 3
    got = [[(r["epoch"], r["index"]) for r in part.take_all()] for part in parts]
    keys = [k for part in got for k in part]
    expected = {(e, i) for e in range(3) for i in range(50)} - {(e, i) for e, _, i in taken}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    sizes = sorted(len(part) for part in got)
    assert sizes[-1] - sizes[0] <= 4 * 2, sizes          # 2 read tasks each, 4-row blocks
    # Each part carries the whole stream's context, its object-store share divided.
    assert all(p.context.target_max_block_size == ds.context.target_max_block_size
               for p in parts)
    assert per_worker(ds, 2) is None
    assert per_worker(ds, 3, ExecutionOptions(preserve_order=True)) is None


@pytest.mark.ray
def test_read_tasks_all_fit_beside_the_workers_and_split_evenly(ray_local):
    """`run.read_slots` on the session's 4-CPU Ray: the CPUs the workers leave, whole where
    they suffice, else shared (fractional), so that every worker's long-lived read tasks run
    at once (a worker whose tasks waited for a CPU would hold the others at the next
    collective); the same number per worker, except where one split serves all (in order,
    or several CPU workers on one machine)."""
    import dataclasses

    from pipeline.train.config import PRESETS
    from pipeline.train.run import read_slots

    def slots(workers, cpus=1.0, per_read=1.0, ordered=False, own="on"):
        cfg = PRESETS["smoke"]()
        cfg = dataclasses.replace(
            cfg, scale=dataclasses.replace(cfg.scale, num_workers=workers, cpus_per_worker=cpus),
            data=dataclasses.replace(cfg.data, num_cpus_per_read=per_read,
                                     preserve_order=ordered, worker_streams=own),
            train=dataclasses.replace(cfg.train, global_batch_size=96))
        tasks, each = read_slots(cfg)
        assert tasks * each <= 4 - workers * cpus + 1e-9, "more than the free CPUs"
        return tasks, round(each, 3)

    assert slots(1) == (3, 1.0)
    assert slots(2) == (2, 1.0)
    assert slots(3) == (3, 0.333)                 # 1 free CPU, a third to each worker's task
    assert slots(3, ordered=True) == (1, 1.0)
    assert slots(3, own="auto") == (1, 1.0)       # CPU workers on one machine: one split
    assert slots(2, cpus=0.5, per_read=0.5) == (6, 0.5)
    assert slots(4, cpus=0.5) == (4, 0.5)



def test_a_local_ray_turns_off_the_preemption_watcher_by_the_setting_ray_train_reads():
    """A command's own local Ray runs without Ray Train's preemption watcher (an actor a run,
    nothing to watch on one machine: `cli.ray_init_args`), by the environment variable the
    controller reads; fails if Ray renames it or stops handing it to the controller."""
    pytest.importorskip("ray")
    from ray.train.v2._internal import constants

    from pipeline import cli

    key = constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR
    assert key in constants.ENV_VARS_TO_PROPAGATE
    try:
        assert cli.ray_init_args(None)["runtime_env"]["env_vars"][key] == "0"
        assert key not in cli.ray_init_args("10.0.0.1:6379")["runtime_env"]["env_vars"]
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def test_streams_per_worker_where_they_pay():
    """`data.worker_streams=auto`: a stream per worker on GPUs, across nodes, or for one
    worker; several CPU workers on one machine share one (Ray Train's split)."""
    from pipeline.data.config import DataConfig
    from pipeline.train.run import streams_per_worker

    assert streams_per_worker("auto", 1, False, ["a"])
    assert streams_per_worker("auto", 8, True, ["a"] * 8)
    assert streams_per_worker("auto", 4, False, ["a", "a", "b", "b"])
    assert not streams_per_worker("auto", 2, False, ["a", "a"])
    assert streams_per_worker("on", 2, False, ["a", "a"])
    assert not streams_per_worker("off", 8, True, ["a", "b"] * 4)
    with pytest.raises(ValueError, match="worker_streams must be auto, on or off"):
        DataConfig(source="synthetic", worker_streams="always")
