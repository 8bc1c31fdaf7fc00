"""The synthetic (noise) stream: the interface of a shard stream, and resumable."""

from __future__ import annotations

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
