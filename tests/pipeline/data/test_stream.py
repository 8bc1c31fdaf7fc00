"""The streaming reader end to end: shards on S3 (moto over HTTP) or local paths -> Ray Data
-> 2 Ray Train workers; coverage per epoch, disjointness, labels, determinism, bad data,
storage errors."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline import storage
from pipeline.data import shards
from pipeline.data.plan import DataPosition, StreamPlan
from pipeline.data.shards import DatasetError, ShardOptions, write_shards
from pipeline.data.stream import (
    COLUMNS,
    InputConfig,
    ReadDealer,
    dealing,
    iter_batches,
    shard_dataset,
)
from pipeline.data.synthetic import noise_dataset
from pipeline.data.transforms import Augment

from .helpers import every_sample, jpeg_bytes, write_tar


def collect(config):
    """Train loop for the tests: consume this worker's shard and write what it saw."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    seen = []
    for batch in iter_batches(ray.train.get_dataset_shard("train"), 8, config["cfg"],
                              drop_last=False, seed=rank):
        assert batch["image"].shape[1:] == (16, 16, 3)
        seen += [list(r) for r in zip(*(batch[c].tolist() for c in COLUMNS[1:]), strict=True)]
    Path(config["out"], f"{rank}.json").write_text(json.dumps(seen))
    ray.train.report({"rows": len(seen)})


def run_two_workers(ds, cfg, out: Path, storage_path: Path):
    """Two Ray Train workers read `ds` each as a stream of its own, as runs on GPUs or across
    nodes do (`run.WorkerStreams`, on), through the trainer pretraining uses
    (`failures.trainer_class`, its datasets callback `run.streams_callback`) -> what each
    saw, and the names of the actors the run created."""
    import ray.train

    from pipeline.train.failures import trainer_class
    from pipeline.train.run import _worker_streams

    out.mkdir(parents=True, exist_ok=True)
    before = set(actors())
    trainer_class()(collect, train_loop_config={"cfg": cfg, "out": str(out)},
                 datasets={"train": ds}, dataset_config=_worker_streams()(),
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(storage_path), name="t")).fit()
    made = sorted(name for a, name in actors().items() if a not in before)
    return [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)], made


def actors() -> dict:
    """Actor id -> class name, of every actor the cluster has had (from its GCS)."""
    import ray._private.state

    return {a: info["ActorClassName"] for a, info in ray._private.state.actors().items()}


def ground_truth(folder: Path, manifest: dict, split="train") -> dict:
    """(shard, index) -> label, read independently with the webdataset package."""
    truth = {}
    for s_idx, entry in enumerate(manifest["splits"][split]["shards"]):
        for i, sample in enumerate(wds.WebDataset(str(folder / entry["name"]),
                                                  shardshuffle=False, empty_check=False)):
            truth[(s_idx, i)] = int(sample["cls"])
    return truth


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_every_key_once_per_epoch_across_two_workers_from_s3(ray_local, s3, tmp_path):
    local = tmp_path / "shards"
    src = shards.grating_images(num_samples=96, num_classes=6, image_size=24, val_fraction=0)
    manifest = write_shards(src, str(local), ShardOptions(shard_size_mb=0.04))
    assert len(manifest["splits"]["train"]["shards"]) >= 4
    uri = f"s3://{s3}/data/synth"
    write_shards(src, uri, ShardOptions(shard_size_mb=0.04))  # the same shards, on S3
    cfg = InputConfig(uri=uri, augment=Augment("inception", 16), seed=7, shuffle_buffer=32,
                      block_rows=8)
    ds, m, _ = shard_dataset(cfg, num_epochs=2, workers=2)
    assert m == manifest
    seen, made = run_two_workers(ds, cfg, tmp_path / "out", tmp_path / "runs")
    # Each worker executed its own stream: no coordinator stood between the reads and them,
    # and no actor of Ray Train's held the datasets to hand them out.
    assert "RayTrainWorker" in made, made
    assert not [a for a in made if a in ("SplitCoordinator", "DatasetManager")], made

    truth = ground_truth(local, manifest)
    ids = [[(e, s, i) for _, e, s, i in rank] for rank in seen]
    assert not set(ids[0]) & set(ids[1]), "the workers see disjoint parts"
    assert seen[0] and seen[1], "both workers get data"
    for epoch in (0, 1):
        got = Counter((s, i) for rank in ids for e, s, i in rank if e == epoch)
        assert set(got) == set(truth) and set(got.values()) == {1}, \
            f"epoch {epoch}: every sample exactly once"
    for rank in seen:
        for label, _, s, i in rank:
            assert label == truth[(s, i)], "labels intact"


@pytest.mark.slow
@pytest.mark.ray
def test_same_seed_same_stream(ray_local, tmp_path):
    src = shards.grating_images(num_samples=40, num_classes=4, image_size=24, val_fraction=0)
    write_shards(src, str(tmp_path), ShardOptions(shard_size_mb=0.02))

    def stream(seed):
        cfg = InputConfig(uri=str(tmp_path), augment=Augment("inception", 16), seed=seed)
        ds, _, _ = shard_dataset(cfg, num_epochs=2)
        rows = ds.take_all()
        return {(r["epoch"], r["shard"], r["index"]): r["image"].tobytes() for r in rows}

    a, b, c = stream(3), stream(3), stream(4)
    assert len(a) == 80 and a == b, "same seed: the same samples with the same augmentations"
    assert a.keys() == c.keys() and a != c, "another seed: other crops"


def bad_dataset(root: Path) -> tuple[dict, int]:
    """Three shards of 4: one with a corrupt image and an out-of-range label, one truncated
    after its second sample, one that vanished. -> (manifest, good samples)."""
    def s(i, label=1, data=None):
        return {"__key__": f"k{i:03d}", "jpg": data or jpeg_bytes(i), "cls": str(label).encode()}

    root.mkdir(parents=True, exist_ok=True)
    write_tar(root / "a.tar", [s(0), s(1, data=b"\xff\xd8garbage"), s(2, label=9), s(3)])
    full = write_tar(root / "b.tar", [s(4), s(5), s(6), s(7)]).read_bytes()
    cut = len(write_tar(root.parent / "two.tar", [s(4), s(5)]).read_bytes()) - 1024  # no end
    (root / "b.tar").write_bytes(full[:cut + 700])
    manifest = {"format": "webdataset", "num_classes": 3, "classes": ["x", "y", "z"],
                "splits": {"train": {"num_samples": 12, "shards": [
                    {"name": n, "samples": 4} for n in ("a.tar", "b.tar", "c.tar")]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest, 4


@pytest.mark.slow
@pytest.mark.ray
def test_bad_data_is_skipped_and_counted_through_ray(ray_local, tmp_path):
    import ray

    _, n_good = bad_dataset(tmp_path / "d")
    cfg = InputConfig(uri=str(tmp_path / "d"), augment=Augment("resize", 16), block_rows=2)
    ds, _, health = shard_dataset(cfg, num_epochs=1, workers=2)
    seen, _ = run_two_workers(ds, cfg, tmp_path / "out", tmp_path / "runs")
    rows = sorted((s, i) for rank in seen for _, _, s, i in rank)
    assert len(rows) == n_good
    summary = ray.get(health.summary.remote())
    assert summary["skipped"] == 12 - n_good
    assert {k: v["samples"] for k, v in summary["by_kind"].items()} == {
        "undecodable images": 1, "samples with a missing or bad label": 1,
        "samples in missing or empty shards": 4, "samples in truncated or unreadable tars": 2}
    assert summary["delivered"] == n_good
    assert any(r.startswith("a.tar:k001: corrupt image") for r in summary["recent"])


@pytest.mark.slow
@pytest.mark.ray
def test_strict_mode_fails_the_run_naming_shard_and_key(ray_local, tmp_path):
    bad_dataset(tmp_path / "d")
    cfg = InputConfig(uri=str(tmp_path / "d"), augment=Augment("resize", 16), strict=True)
    ds, _, _ = shard_dataset(cfg, num_epochs=1, workers=2)
    # Which defect comes first depends on the shard order: any of them, named. Ray shortens
    # the worker's message from the front by a length that depends on the reason, so only
    # the reason's end is sure to survive (the naming of shard and key is tested in
    # test_reader.py and, through jobs/pretrain.py, in the loop's error line).
    with pytest.raises(Exception, match=r"(corrupt image|outside \[0, 3\)|shard vanished|"
                                        r"truncated or unreadable tar)[^\n]*; fix or remove"):
        run_two_workers(ds, cfg, tmp_path / "out", tmp_path / "runs")


@pytest.mark.slow
@pytest.mark.ray
def test_a_resumed_stream_delivers_exactly_the_rest(ray_local, tmp_path):
    """Stream two epochs, 'train' on a random part of it (a prefix with holes, a read done
    out of order, a read untouched), resume at the position: the new stream holds every
    other sample once, with the same augmentation as before."""
    sizes = (4, 6, 5)
    root = tmp_path / "d"
    root.mkdir()
    for n, (name, size) in enumerate(zip("abc", sizes, strict=True)):
        write_tar(root / f"{name}.tar", [
            {"__key__": f"{name}{i:03d}", "jpg": jpeg_bytes(10 * n + i), "cls": str(n).encode()}
            for i in range(size)])
    manifest = {"format": "webdataset", "num_classes": 3, "classes": ["x", "y", "z"],
                "splits": {"train": {"num_samples": sum(sizes), "shards": [
                    {"name": f"{n}.tar", "samples": k} for n, k in zip("abc", sizes,
                                                                       strict=True)]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    cfg = InputConfig(uri=str(root), augment=Augment("inception", 16), seed=4, block_rows=2)

    def stream(start=None):
        ds, _, _ = shard_dataset(cfg, num_epochs=2, start=start)
        rows = [(r["epoch"], r["shard"], r["index"], r["image"].tobytes())
                for r in ds.take_all()]
        keys = [r[:3] for r in rows]
        assert len(keys) == len(set(keys)), "each sample once"
        return {r[:3]: r[3] for r in rows}

    full = stream()
    everything = every_sample(sizes, 2)
    assert set(full) == everything

    plan = StreamPlan(sizes, seed=4)
    rng = np.random.default_rng(1)
    first, second, _ = plan.order(0)
    taken = [(0, first, i) for i in range(sizes[first]) if i != 1]           # a hole
    taken += [(0, second, i) for i in range(sizes[second])]                  # done, ahead
    taken += [k for k in sorted(everything) if k[0] == 1 and rng.random() < 0.4]
    taken = np.asarray(taken)[rng.permutation(len(taken))]
    position = DataPosition()
    for batch in np.array_split(taken, 3):
        position = position.advance(plan, *batch.T)
    assert position.partial and position.done, "the test covers partial and done reads"

    resumed = stream(DataPosition.from_dict(json.loads(json.dumps(position.to_dict()))))
    consumed = {tuple(k) for k in taken.tolist()}
    assert set(resumed) == everything - consumed
    assert all(resumed[k] == full[k] for k in resumed), "same samples, same augmentation"

    # Everything consumed: an empty stream, not an error.
    rest = np.asarray(sorted(resumed))
    assert not stream(position.advance(plan, *rest.T))


def test_the_dealer_hands_out_reads_in_order_and_replays_a_slot_that_starts_over():
    dealer = ReadDealer(first=5, stop=10)
    assert [dealer.deal(0, 0), dealer.deal(1, 0), dealer.deal(0, 1)] == [5, 6, 7]
    # Slot 0's task is retried (or the dataset runs again): the same reads, in its order,
    # then new ones; a read is never dealt to two slots.
    assert [dealer.deal(0, 0), dealer.deal(0, 1), dealer.deal(0, 2)] == [5, 7, 8]
    assert [dealer.deal(1, 1), dealer.deal(2, 0), dealer.deal(1, 2)] == [9, -1, -1]
    assert dealer.deal(1, 0) == 6, "what was dealt stays replayable after the end"


def test_the_dealer_deals_in_batches_and_replays_them_by_index():
    dealer = ReadDealer(first=0, stop=20)
    assert dealer.deal_many(0, 0, 4) == [0, 1, 2, 3]
    assert dealer.deal_many(1, 0, 4) == [4, 5, 6, 7]
    assert dealer.deal_many(0, 4, 4) == [8, 9, 10, 11]
    # Slot 0's task is retried and asks in other batch sizes: the same reads, by index, then
    # new ones once it is past what it had.
    assert dealer.deal_many(0, 0, 3) + dealer.deal_many(0, 3, 6) == [0, 1, 2, 3, 8, 9, 10, 11,
                                                                     12]
    assert [dealer.deal(0, n) for n in range(9)] == [0, 1, 2, 3, 8, 9, 10, 11, 12]
    assert dealer.deal_many(2, 0, 16) == list(range(13, 20)), "fewer at the end"
    assert dealer.deal_many(2, 7, 16) == [] and dealer.deal(3, 0) == -1
    assert dealer.deal_many(1, 2, 4) == [6, 7], "what was dealt stays replayable after the end"
    dealt = [n for slot in dealer.dealt.values() for n in slot]
    assert sorted(dealt) == list(range(20)), "every read once, to one slot"


def test_dealers_take_every_stride_th_read_and_dealing_bounds_what_is_dealt_ahead():
    # Three dealers share the plan: each its residue class, in order; together every read.
    dealers = [ReadDealer(first=10 + d, stop=20, stride=3) for d in range(3)]
    got = [dealers[d].deal_many(d, 0, 16) for d in range(3)]
    assert got == [[10, 13, 16, 19], [11, 14, 17], [12, 15, 18]]
    assert dealers[1].deal_many(4, 0, 2) == [] and dealers[1].deal_many(1, 1, 1) == [14]
    # (k, dealers): a long plan on a few slots, k 16; a 1,024-GPU run, 4,096 slots on 14k
    # shards an epoch: no more than a quarter epoch dealt ahead, so k 1, and 32 dealers;
    # a short plan: what each slot gets.
    assert dealing(reads=450_000, per_epoch=5_000, slots=2) == (16, 1)
    assert dealing(reads=90 * 14_000, per_epoch=14_000, slots=4096) == (1, 32)
    assert dealing(reads=90 * 14_000, per_epoch=14_000, slots=256) == (13, 1)
    assert dealing(reads=16, per_epoch=8, slots=2) == (1, 1)


def test_each_worker_takes_an_equal_share_of_the_plan_whatever_starts_first():
    """A stream per worker (`per_worker`): 3 workers, 2 slots each (slot j on worker j % 3),
    the queues of 2 dealers. Worker 0's slots start first and read as fast as they can: they
    still get only their third of the plan, in plan order, and the others theirs when they
    start; a retried slot gets its reads again."""
    from pipeline.data.stream import Reads

    plan = StreamPlan.from_manifest({"splits": {"train": {"shards": [
        {"name": f"{i}.tar", "samples": 10} for i in range(10)]}}}, "train", seed=0)
    reads = Reads(plan, tuple(f"{i}.tar" for i in range(10)), DataPosition(), stop=30,
                  slots=6, batch=2, queues=6, workers=3)
    dealers = [ReadDealer(first=0, stop=30, stride=6) for _ in range(2)]

    def take(slot, n=0, k=100):
        queue = reads.queue(slot)
        return dealers[queue % 2].deal_many(slot, n, k, queue)

    assert [reads.queue(j) for j in range(6)] == [0, 1, 2, 3, 4, 5]
    first = take(0) + take(3)                      # worker 0, alone for now: all it can get
    assert first == [0, 6, 12, 18, 24, 3, 9, 15, 21, 27]
    assert sorted(take(1) + take(4)) == [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert sorted(take(2) + take(5)) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert take(3, 1, 2) == [9, 15], "a retried slot replays its reads by index"
    # One worker, or two per worker: the queue is the slot's residue (one worker: as before).
    assert [dataclasses.replace(reads, workers=1).queue(j) for j in range(6)] == [
        0, 1, 2, 3, 4, 5]
    assert [dataclasses.replace(reads, queues=3).queue(j) for j in range(6)] == [
        0, 1, 2, 0, 1, 2]


def one_sample_shards(root: Path, count: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [str(write_tar(root / f"s{i}.tar", [{"__key__": f"k{i}", "jpg": jpeg_bytes(i),
                                                "cls": b"0"}])) for i in range(count)]


@pytest.mark.ray
def test_a_plan_of_90_epochs_of_5000_shards_is_never_listed(ray_local, tmp_path):
    """ImageNet-21k-sized plan (the shards named by absolute path, ten real files reused):
    the stream starts with the first reads of epoch 0 in plan order, computed by the read
    tasks. (Listing the plan as Ray Data blocks took minutes here: bench/data.py --plan.)"""
    paths = one_sample_shards(tmp_path / "s", 10)
    num_shards, epochs = 5000, 90
    manifest = {"format": "webdataset", "num_classes": 1, "classes": ["x"], "splits": {
        "train": {"num_samples": num_shards, "shards": [
            {"name": paths[i % 10], "samples": 1} for i in range(num_shards)]}}}
    cfg = InputConfig(uri=str(tmp_path / "elsewhere"), augment=Augment("resize", 16), seed=3,
                      read_tasks=4, block_rows=1)
    ds, _, _ = shard_dataset(cfg, num_epochs=epochs, manifest=manifest)
    rows = ds.take(12)
    order = StreamPlan((1,) * num_shards, seed=3).order(0)
    got = {(int(r["epoch"]), int(r["shard"])) for r in rows}
    # Four slots take reads in plan order and a block holds up to ~85 of these tiny rows, so
    # the first rows come from the first few hundred reads of epoch 0's order (of 450,000).
    assert len(got) == 12 and {e for e, _ in got} == {0}
    assert {s for _, s in got} <= set(order[:500])
    # Every row is the file its shard names (the index says which sample; labels intact).
    assert all(r["label"] == 0 and r["index"] == 0 for r in rows)


@pytest.mark.ray
def test_a_stream_run_twice_is_the_same_stream(ray_local, tmp_path):
    """Ray Data executes a dataset again (a second iteration, a retried task): the dealer
    replays each slot's reads, so every sample comes once, with the same augmentation."""
    src = shards.grating_images(num_samples=40, num_classes=4, image_size=24, val_fraction=0)
    write_shards(src, str(tmp_path), ShardOptions(shard_size_mb=0.01))
    cfg = InputConfig(uri=str(tmp_path), augment=Augment("inception", 16), read_tasks=3)
    ds, _, _ = shard_dataset(cfg, num_epochs=2)
    first = {(r["epoch"], r["shard"], r["index"]): r["image"].tobytes() for r in ds.take_all()}
    again = ds.take_all()
    assert len(first) == len(again) == 80
    assert {(r["epoch"], r["shard"], r["index"]): r["image"].tobytes() for r in again} == first


@pytest.mark.ray
def test_preserve_order_streams_the_plan_in_order(ray_local, tmp_path):
    src = shards.grating_images(num_samples=40, num_classes=4, image_size=24, val_fraction=0)
    manifest = write_shards(src, str(tmp_path), ShardOptions(shard_size_mb=0.01))
    num_shards = len(manifest["splits"]["train"]["shards"])
    assert num_shards >= 4
    cfg = InputConfig(uri=str(tmp_path), augment=Augment("resize", 16), read_tasks=3,
                      preserve_order=True)
    ds, _, _ = shard_dataset(cfg, num_epochs=2)
    ds.context.execution_options.preserve_order = True
    rows = [(int(r["epoch"]), int(r["shard"]), int(r["index"])) for r in ds.iter_rows()]
    plan = StreamPlan.from_manifest(manifest, "train", 0)
    expected = [(r["epoch"], r["shard"], i) for r in plan.reads(DataPosition(), 2)
                for i in range(r["samples"])]
    assert rows == expected


def split_streams(ds, workers: int, micro_batch: int, steps: int | None = None,
                  stall: float = 0.0) -> list[list[tuple]]:
    """What each of `workers` ranks trains on, as Ray Train splits `ds` (its `DataConfig`,
    with preserve_order and the locality hints it passes): (epoch, shard, index) per sample,
    in order, for `steps` micro-batches each (all: None). Rank 0 stalls `stall` seconds
    after its second batch (a probe, a checkpoint), while the others read on."""
    import threading

    import ray
    import ray.train
    from ray.data import ExecutionOptions

    node = ray.get_runtime_context().get_node_id()
    splits = ray.train.DataConfig(execution_options=ExecutionOptions(
        preserve_order=True)).configure({"train": ds}, workers, None, [node] * workers)
    seen: list[list[tuple]] = [[] for _ in range(workers)]

    def consume(rank: int) -> None:
        batches = iter_batches(splits[rank]["train"], micro_batch, InputConfig(shuffle_buffer=0))
        for step, batch in enumerate(batches):
            seen[rank] += list(zip(*(batch[c].tolist() for c in ("epoch", "shard", "index")),
                                   strict=True))
            if rank == 0 and step == 1:
                time.sleep(stall)
            if steps is not None and step + 1 == steps:
                break

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


@pytest.mark.ray
@pytest.mark.slow
def test_preserve_order_gives_each_worker_the_same_stream_and_a_resume_the_rest(ray_local,
                                                                               tmp_path):
    """Few long read tasks over shards whose sizes are not multiples of the block: two runs
    give every rank the same samples in the same order, whatever the ranks' timing; and a run
    resumed from the position after 3 micro-batches a rank (1.5 blocks) gives every rank the
    rest of what the uninterrupted run gave it, as `test_parallel.py` needs for FSDP's
    resumed losses to be the uninterrupted run's."""
    src = shards.grating_images(num_samples=240, num_classes=4, image_size=24, val_fraction=0)
    manifest = write_shards(src, str(tmp_path), ShardOptions(shard_size_mb=0.05))
    sizes = [s["samples"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) >= 8 and sizes[0] % 8
    cfg = InputConfig(uri=str(tmp_path), augment=Augment("resize", 16), read_tasks=2,
                      preserve_order=True, block_rows=8)
    ds, _, _ = shard_dataset(cfg, num_epochs=2)
    ds.context.execution_options.preserve_order = True
    # Ray keeps the read tasks' blocks as they are: blocks of 8 samples, cut on the plan's grid.
    rows = [b.num_rows() for b in ds.iter_internal_ref_bundles()]
    assert set(rows[:-1]) == {8} and sum(rows) == 480

    first = split_streams(shard_dataset(cfg, num_epochs=2)[0], 3, 4)
    again = split_streams(shard_dataset(cfg, num_epochs=2)[0], 3, 4, stall=1.0)
    assert first == again
    assert len({s for rank in first for s in rank}) == sum(len(r) for r in first) == 480

    plan = StreamPlan.from_manifest(manifest, "train", 0)
    trained = np.array([s for rank in first for s in rank[:12]]).T     # 3 micro-batches each
    position = DataPosition().advance(plan, *trained)
    resumed = split_streams(shard_dataset(cfg, num_epochs=2, start=position)[0], 3, 4)
    assert [rank[12:] for rank in first] == resumed


# ---- storage errors: one clear line each ----------------------------------------------------
@pytest.mark.s3
def test_missing_bucket_and_prefix(s3):
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-y/x/manifest.json: "
                                                   "bucket does not exist"):
        shard_dataset(InputConfig(uri="s3://no-such-bucket-y/x"), 1)
    with pytest.raises(DatasetError, match=f"s3://{s3}/nothing/here: no manifest.json"):
        shard_dataset(InputConfig(uri=f"s3://{s3}/nothing/here"), 1)


@pytest.mark.s3
def test_missing_credentials(s3, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError, match="no S3 credentials found; set "
                                                   "AWS_ACCESS_KEY_ID"):
        shard_dataset(InputConfig(uri=f"s3://{s3}/x"), 1)


@pytest.mark.s3
def test_unreachable_endpoint(s3, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with pytest.raises(storage.StorageError, match="cannot reach the S3 endpoint "
                                                   "http://127.0.0.1:"):
        shard_dataset(InputConfig(uri=f"s3://{s3}/x"), 1)


@pytest.mark.ray
def test_every_batch_is_full_with_a_small_shuffle_buffer_and_uneven_blocks(ray_local):
    """A shuffle buffer of one batch and blocks of 7 rows: Ray's batcher alone gives short
    batches mid-stream (a global batch below the one set)."""
    from collections import Counter as Count

    ds = noise_dataset(num_samples=630, num_classes=4, image_size=8, block_rows=7)
    sizes = Count(len(b["index"]) for b in iter_batches(ds, 16, InputConfig(shuffle_buffer=16)))
    assert sizes == {16: 630 // 16}, sizes
