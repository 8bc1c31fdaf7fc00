"""Bad data over a whole run: skipped samples are consumed (their reads complete in the data
position), the plan has epochs enough for what is skipped, too much bad data stops the run
with the skips counted by cause, and a manifest that undercounts a shard is one error line
naming the shard and both counts. Unit tests run the read task's UDF without Ray; the runs
train the smoke model on hand-made shards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from pipeline.data.health import DataHealth, epochs_for
from pipeline.data.plan import DataPosition, StreamPlan
from pipeline.data.reader import (
    MISSING,
    UNDECODABLE,
    BadDataPolicy,
    DataError,
    ManifestMismatch,
    iter_samples,
)
from pipeline.data.stream import InputConfig, Reads, ShardReader, lost_samples
from pipeline.data.transforms import Augment

from .helpers import jpeg_bytes, write_tar

BAD_JPEG = b"\xff\xd8not a jpeg"


def sample(i: int, label: int = 1, data: bytes | None = None) -> dict:
    return {"__key__": f"s{i:04d}", "jpg": data or jpeg_bytes(i, (12, 12)),
            "cls": str(label).encode()}


def read_all(root: Path, names: tuple, sizes: tuple, start=None) -> list[dict]:
    """Run the read UDF over epoch 0 of the plan in one task (its spans: a resumed stream's
    partly consumed cells are spans of their own); -> its blocks."""
    cfg = InputConfig(uri=str(root), augment=Augment("resize", 8), block_rows=3)
    plan = StreamPlan(sizes)
    reads = Reads(plan, names, start or DataPosition(), stop=len(sizes), slots=1, block_rows=3)
    return list(ShardReader(pafs.LocalFileSystem(), str(root), cfg, 10, reads)(
        {"id": list(range(len(reads.spans())))}))


def consumed(blocks: list[dict]) -> np.ndarray:
    """(3, n) epoch, shard, index: what a worker consuming the blocks records (trained rows
    and the skipped samples they carry)."""
    return np.concatenate([np.stack([b["epoch"], b["shard"], b["index"]]) for b in blocks]
                          + [lost_samples(b["lost"]) for b in blocks], axis=1)


def test_skipped_samples_ride_on_the_rows_and_complete_their_reads(tmp_path):
    """A corrupt image, a bad label, a missing shard and a truncated tail: every sample of
    the epoch is consumed once (trained or skipped), so the position moves to epoch 1."""
    write_tar(tmp_path / "a.tar", [sample(0), sample(1, data=BAD_JPEG), sample(2),
                                   sample(3, label=12), sample(4)])
    data = write_tar(tmp_path / "c.tar", [sample(i) for i in range(6)]).read_bytes()
    (tmp_path / "c.tar").write_bytes(data[:len(data) // 2])          # truncated
    names, sizes = ("a.tar", "b.tar", "c.tar", "d.tar"), (5, 4, 6, 3)
    write_tar(tmp_path / "d.tar", [sample(i) for i in range(3)])      # b.tar is missing
    blocks = read_all(tmp_path, names, sizes)
    trained = sum(len(b["index"]) for b in blocks)
    assert 5 <= trained < 11, trained                  # a: 3, c: what the cut left, d: 3
    ids = consumed(blocks)
    got = sorted(zip(*ids.tolist(), strict=True))
    assert got == sorted((0, s, i) for s, n in enumerate(sizes) for i in range(n)), \
        "each sample of the epoch exactly once"
    position = DataPosition().advance(StreamPlan(sizes), *ids)
    assert (position.epoch, position.position, position.partial) == (1, 0, {})

    # Resumed with part of a.tar and of the missing b.tar consumed: the rest only.
    start = DataPosition().advance(StreamPlan(sizes), [0, 0, 0], [0, 1, 1], [0, 0, 2])
    again = sorted(zip(*consumed(read_all(tmp_path, names, sizes, start)).tolist(),
                       strict=True))
    assert again == [x for x in got if x not in {(0, 0, 0), (0, 1, 0), (0, 1, 2)}]


def test_a_shard_with_more_samples_than_its_manifest_entry_names_both_counts(tmp_path):
    # Image-only samples (one member each): the count must not miss the sample begun when
    # the overflow is found.
    write_tar(tmp_path / "shard-000006.tar", [{"__key__": f"k{i}", "jpg": b"x"}
                                             for i in range(7)])
    with pytest.raises(ManifestMismatch, match=r"^manifest.json says shard-000006.tar has 5 "
                                               r"samples but it has 7: .*vit-shards index"):
        read_all(tmp_path, ("shard-000006.tar",), (5,))
    with open(tmp_path / "shard-000006.tar", "rb") as f:   # also without strict checks
        with pytest.raises(ManifestMismatch, match="has 6 samples but it has 7"):
            list(iter_samples(f, "shard-000006.tar", BadDataPolicy(), 10, expected=6))


def test_health_counts_by_cause_and_stops_under_half_usable():
    health = DataHealth()
    health.record("shard-000003.tar", "000123", "corrupt image (UnidentifiedImageError: "
                  "cannot identify image file)", 1, UNDECODABLE)
    health.record("shard-000006.tar", "-", "shard vanished", 32, MISSING)
    health.read(30)
    assert health.verdict(check_after=100) is None, "too few read to judge"
    assert health.verdict(check_after=60).startswith("33 of 63 samples read were skipped")
    for i in range(379):
        health.record("shard-000003.tar", f"{i:06d}", "corrupt image (...)", 1, UNDECODABLE)
    message = health.report(358, check_after=100)    # a read task's count and question
    assert message == health.verdict(check_after=100)
    assert message.startswith(
        "412 of 800 samples read were skipped: 380 undecodable images (first: "
        "shard-000003.tar/000123: corrupt image (UnidentifiedImageError: cannot identify "
        "image file)), 32 samples in missing or empty shards (shard-000006.tar); "), message
    assert "fix or remove them" in message and "\n" not in message
    health.read(24)        # 412 of 824: exactly half usable is enough
    assert health.verdict(check_after=100) is None


def test_read_tasks_report_to_the_health_actor_at_a_bounded_rate():
    """However many read tasks, together they call the one DataHealth actor at most
    REPORTS_PER_S times a second (bench/scale.py: one actor serves ~1,500)."""
    from pipeline.data.health import REPORTS_PER_S, report_interval

    for slots in (1, 2, 64, 4096):
        assert slots / report_interval(slots) <= REPORTS_PER_S
    assert report_interval(2) < 0.1 < 10 < report_interval(4096)


def test_the_plan_has_epochs_for_half_of_the_data_skipped():
    manifest = {"splits": {"train": {"num_samples": 80}}}
    assert epochs_for(manifest, "train", 640) == 17          # 640 / (80 * 0.5) + 1 spare
    assert epochs_for(manifest, "train", 1) == 2


def test_lost_ranges_expand_to_samples():
    lost = np.array([[0, 0, 0, 0], [2, 1, 3, 5], [0, 0, 0, 0], [3, 4, 0, 1]])
    assert lost_samples(lost).tolist() == [[2, 2, 3], [1, 1, 4], [3, 4, 0]]
    assert lost_samples(np.zeros((2, 4))).shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# Whole runs (smoke model, 1 worker): hand-made shards of 12 x 12 JPEGs, 8 shards of 10
# ---------------------------------------------------------------------------------------------
def bad_shards(root: Path, undecodable: float, missing: tuple = (), undercount: int = -1,
               shards: int = 8, per: int = 10) -> Path:
    """`shards` shards of `per` samples, a fraction of them undecodable (spread evenly), the
    shards in `missing` absent; shard `undercount` holds 2 samples more than the manifest
    says."""
    root.mkdir(parents=True)
    entries, n = [], 0
    for s in range(shards):
        rows = []
        for _ in range(per + 2 * (s == undercount)):
            bad = int((n + 1) * undecodable) > int(n * undecodable)
            rows.append(sample(n, label=n % 4, data=BAD_JPEG if bad else None))
            n += 1
        name = f"shard-{s:06d}.tar"
        if s not in missing:
            write_tar(root / name, rows)
        entries.append({"name": name, "samples": per})
    (root / "manifest.json").write_text(json.dumps({
        "format": "webdataset", "num_classes": 4, "classes": list("abcd"),
        "splits": {"train": {"num_samples": shards * per, "shards": entries}}}))
    return root


def run_cfg(tmp_path, name: str, data: Path, *sets):
    from pipeline.train.config import apply_overrides, smoke

    return apply_overrides(smoke(), [
        f"run.name={name}", f"run.storage={tmp_path / 'runs'}", "data.source=shards",
        f"data.uri={data}", "data.augment=resize", "data.shuffle_buffer=16",
        "data.block_rows=8", "train.global_batch_size=16", "probe.every=0",
        "train.system_metrics_s=0", *sets])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_a_run_over_bad_data_trains_many_epochs_to_the_end(ray_local, mlflow_server,
                                                            tmp_path):
    """10% undecodable images and a missing shard: 63 of the 80 samples of an epoch are
    usable, and 50 steps of 16 need 12.7 epochs of them (the old plan of 11 epochs ended
    the run early). The skips are counted in MLflow; the reads with skipped samples are
    complete in the checkpoint's data position."""
    from mlflow.tracking import MlflowClient

    from pipeline.train import checkpoints
    from pipeline.train.run import pretrain

    data = bad_shards(tmp_path / "d", undecodable=0.1, missing=(5,))
    cfg = run_cfg(tmp_path, "bad-data", data, "train.total_steps=50", "train.log_every=10",
                  "checkpoint.every=50")
    out = pretrain(cfg, tracking_uri=mlflow_server.uri)

    assert out.step == 50
    client = MlflowClient(mlflow_server.uri)
    skipped = sorted((m.step, m.value) for m in client.get_metric_history(
        out.run_id, "data/skipped_samples"))
    assert [s for s, _ in skipped] == [10, 20, 30, 40, 50]
    values = [v for _, v in skipped]
    assert values == sorted(values) and values[-1] >= 17 * 11, values   # 17 an epoch
    run = client.get_run(out.run_id)
    assert run.data.params["images_per_step"] == "16" and \
        "train/images_per_step" not in run.data.metrics, "every step the global batch"
    position = DataPosition.from_dict(checkpoints.read_state(out.checkpoint)["data_position"])
    # 800 trained + ~17/63 of that skipped = ~1,016 samples consumed: the watermark is in
    # epoch 11 or 12, only the reads in flight (and in the shuffle buffer) partly consumed;
    # were the skipped samples not consumed, some 80 reads with one would be partial.
    # (Reads still in flight can hold the watermark an epoch back: 10.)
    assert position.epoch >= 10 and len(position.partial) <= 24, position.to_dict()
    assert client.get_run(out.run_id).info.status == "FINISHED"
    print(f"bad-data run: {position.epoch} epochs, skipped {values[-1]:.0f}")

    # Continued to 60 steps: the stream goes on from the position (no read of the epochs
    # before it, whose skipped samples it holds as consumed).
    more = pretrain(run_cfg(tmp_path, "bad-data", data, "train.total_steps=60",
                            f"data.trace_dir={tmp_path / 'trace'}"),
                    tracking_uri=mlflow_server.uri)
    assert more.step == 60
    trained = np.loadtxt(tmp_path / "trace" / "rank0.txt", dtype=np.int64)
    trained = trained[trained[:, 0] > 0]                    # step, epoch, shard, index
    assert len(trained) == 10 * 16 and trained[:, 1].min() >= position.epoch, \
        (position.epoch, trained[:, 1].min())


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_mostly_undecodable_data_stops_the_run_naming_the_skips(ray_local, mlflow_server,
                                                               tmp_path):
    from pipeline.train.run import PretrainError, pretrain

    # 40% of the images undecodable and two shards missing: neither cause alone is over
    # half of what is read (40%, 25%), both together are (55% of an epoch), so the stop
    # comes only once both were counted, whichever order the reads come in.
    data = bad_shards(tmp_path / "d", undecodable=0.4, missing=(2, 5))
    cfg = run_cfg(tmp_path, "mostly-bad", data, "train.total_steps=30")
    t0 = time.monotonic()
    missing = r"shard-00000[25].tar"
    with pytest.raises(PretrainError, match=r"^data error: \d+ of \d+ samples read were "
                                            r"skipped: (?=.*\d+ undecodable images \(first: "
                                            r"shard-0000\d\d.tar/s\d{4}: corrupt image)"
                                            # 10 per pass over a missing shard
                                            rf"(?=.*[1-9]\d*0 samples in missing or empty "
                                            rf"shards \({missing}, {missing}\))"
                                            r".*fix or remove them"):
        pretrain(cfg, tracking_uri=mlflow_server.uri)
    assert time.monotonic() - t0 < 120, "stopped at once, not retried"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_a_manifest_that_undercounts_a_shard_stops_the_run_naming_both_counts(
        ray_local, mlflow_server, tmp_path):
    from pipeline.train.run import PretrainError, pretrain

    data = bad_shards(tmp_path / "d", undecodable=0, undercount=6)
    cfg = run_cfg(tmp_path, "undercount", data, "train.total_steps=30")
    t0 = time.monotonic()
    with pytest.raises(PretrainError, match=r"^data error: manifest.json says "
                                            r"shard-000006.tar has 10 samples but it has 12"):
        pretrain(cfg, tracking_uri=mlflow_server.uri)
    assert time.monotonic() - t0 < 120, "stopped at once, not retried"


def test_data_errors_are_typed_through_ray_wrappers():
    """What a train worker receives for an error raised in a Ray Data task: Ray's
    RayTaskError(DataError) (checked with Ray 2.60 in a TorchTrainer), an instance of the
    original type whose str() is a traceback; `first_line` reads the original's line."""
    from ray.exceptions import RayTaskError

    try:
        raise DataError("bad data in shard a.tar, key k1: corrupt image; fix\nmore")
    except DataError as original:
        wrapped = RayTaskError("SplitCoordinator.get", "Traceback ...\n  File x\n",
                               original).as_instanceof_cause()
    assert isinstance(wrapped, RayTaskError) and isinstance(wrapped, DataError)
    assert not str(wrapped).startswith("bad data"), "str() is Ray's, not the original's"
    assert wrapped.first_line() == "bad data in shard a.tar, key k1: corrupt image; fix"


def test_the_driver_names_missing_and_changed_shards_from_one_listing(tmp_path):
    from pipeline.data.health import check_shards
    from pipeline.data.shards import DatasetError

    for name in ("a.tar", "c.tar"):
        write_tar(tmp_path / name, [sample(0)])
    size = (tmp_path / "a.tar").stat().st_size
    manifest = {"splits": {"train": {"shards": [
        {"name": "a.tar", "samples": 1, "bytes": size},
        {"name": "b.tar", "samples": 1, "bytes": size},
        {"name": "c.tar", "samples": 1, "bytes": size + 512},
        {"name": "/elsewhere/d.tar", "samples": 1}]}}}
    assert check_shards(manifest, str(tmp_path), "train") == [
        f"1 of the 3 shards of split 'train' are not at {tmp_path} (b.tar); their samples "
        f"are skipped and counted",
        f"1 shard(s) changed after manifest.json was written: c.tar ({size} bytes, "
        f"manifest.json says {size + 512}); one with more samples than it says stops the run "
        f"when it is read (rewrite or re-index the dataset: vit-shards)"]
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="none of the 3 shards of split 'train'"):
        check_shards(manifest, str(tmp_path / "other"), "train")


@pytest.mark.s3
def test_the_driver_listing_works_on_s3(s3):
    from pipeline import storage
    from pipeline.data.health import check_shards

    for name in ("a.tar", "sub/c.tar"):
        storage.write_bytes(f"s3://{s3}/ds/{name}", b"x" * 10)
    manifest = {"splits": {"train": {"shards": [
        {"name": "a.tar", "samples": 1, "bytes": 10}, {"name": "b.tar", "samples": 1},
        {"name": "sub/c.tar", "samples": 1, "bytes": 11}]}}}
    lines = check_shards(manifest, f"s3://{s3}/ds", "train")
    assert len(lines) == 2 and "(b.tar)" in lines[0] and "sub/c.tar (10 bytes" in lines[1]
