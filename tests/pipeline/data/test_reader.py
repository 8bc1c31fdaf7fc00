"""Bad data, each case in both modes: skipped and counted with shard and key, or (strict) a
DataError naming them. Runs the shard reader UDF directly, without Ray."""

from __future__ import annotations

import re
import tarfile

import pytest

from pipeline import storage
from pipeline.data.plan import DataPosition, StreamPlan
from pipeline.data.reader import MISSING, BadDataPolicy, DataError, Problem, iter_samples
from pipeline.data.stream import InputConfig, Reads, ShardReader
from pipeline.data.transforms import Augment

from .helpers import jpeg_bytes, write_tar


def good(i: int, label: int = 1) -> dict:
    return {"__key__": f"s{i:04d}", "jpg": jpeg_bytes(i), "cls": str(label).encode()}


def read(tmp_path, name, strict, expected=None, num_classes=10, uri=None):
    """Run the Ray Data UDF over one shard of the folder `tmp_path` (or of `uri`, local or
    s3://); -> (rows read, problems reported)."""
    problems: list[Problem] = []
    uri = uri or str(tmp_path)
    cfg = InputConfig(uri=uri, augment=Augment("resize", 16), strict=strict, block_rows=4)
    if expected is None:   # what the manifest would say: the keys in the tar
        with tarfile.open(tmp_path / name) as tar:
            expected = len({m.name.split(".")[0] for m in tar.getmembers()})
    reads = Reads(StreamPlan((expected,)), (name,), DataPosition(), stop=1, slots=1)
    fs, root = storage.filesystem(uri)
    reader = ShardReader(fs, root, cfg, num_classes, reads)
    reader._report = problems.append
    rows = [i for block in reader({"id": [0]}) for i in block["index"].tolist()]
    return rows, problems


CASES = {
    "corrupt image": ([good(0), {"__key__": "s0001", "jpg": b"\xff\xd8not a jpeg",
                                 "cls": b"1"}, good(2)], "s0001", "corrupt image"),
    "no label": ([good(0), {"__key__": "s0001", "jpg": jpeg_bytes(1)}, good(2)], "s0001",
                 "no label"),
    "label out of range": ([good(0), good(1, label=10), good(2)], "s0001",
                           "label 10 outside [0, 10)"),
    "label not an integer": ([good(0), {"__key__": "s0001", "jpg": jpeg_bytes(1),
                                        "cls": b"cat"}, good(2)], "s0001", "not an integer"),
    "no image": ([good(0), {"__key__": "s0001", "cls": b"1"}, good(2)], "s0001",
                 "no image member"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_is_skipped_and_counted(tmp_path, case):
    samples, key, reason = CASES[case]
    write_tar(tmp_path / "shard-0.tar", samples)
    rows, problems = read(tmp_path, "shard-0.tar", strict=False)
    assert rows == [0, 2], "the good samples around the bad one are kept"
    assert len(problems) == 1
    assert problems[0].shard == "shard-0.tar" and problems[0].key == key
    assert reason in problems[0].reason and problems[0].samples == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_in_strict_mode_names_shard_and_key(tmp_path, case):
    samples, key, reason = CASES[case]
    write_tar(tmp_path / "shard-0.tar", samples)
    with pytest.raises(DataError, match=f"shard shard-0.tar, key {key}: .*{re.escape(reason)}"):
        read(tmp_path, "shard-0.tar", strict=True)


@pytest.mark.parametrize("cut", [0.5, 0.53])  # at a member boundary, inside a member
def test_truncated_tar_keeps_what_came_before_and_counts_the_rest(tmp_path, cut):
    path = write_tar(tmp_path / "shard-0.tar", [good(i) for i in range(6)])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    rows, problems = read(tmp_path, "shard-0.tar", strict=False, expected=6)
    assert 0 < len(rows) < 6 and rows == list(range(len(rows)))
    # Every sample that did not arrive is accounted for, whatever the cut hit.
    assert sum(p.samples for p in problems) == 6 - len(rows)
    assert all(p.shard == "shard-0.tar" for p in problems)
    with pytest.raises(DataError, match="shard shard-0.tar, key "):
        read(tmp_path, "shard-0.tar", strict=True, expected=6)


def test_truncation_inside_a_member_is_named(tmp_path):
    path = write_tar(tmp_path / "shard-0.tar", [good(i) for i in range(6)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])
    _, problems = read(tmp_path, "shard-0.tar", strict=False, expected=6)
    assert any("truncated" in p.reason for p in problems)


def test_empty_and_vanished_shards(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    write_tar(tmp_path / "noentries.tar", [])
    for name in ("empty.tar", "noentries.tar", "vanished.tar"):
        rows, problems = read(tmp_path, name, strict=False, expected=5)
        assert rows == [] and len(problems) == 1, name
        assert problems[0].samples == 5 and problems[0].shard == name
    assert "vanished" in read(tmp_path, "vanished.tar", strict=False, expected=5)[1][0].reason
    for name in ("empty.tar", "vanished.tar"):
        with pytest.raises(DataError, match=f"shard {name}, key -"):
            read(tmp_path, name, strict=True, expected=5)


@pytest.mark.s3
def test_a_vanished_shard_on_s3_is_recognised(tmp_path, s3):
    """Missing is told by type (storage.NotFound), not by the endpoint's wording: on S3 as
    on local disk, the shard's samples are skipped and counted, or (strict) named."""
    uri = f"s3://{s3}/data"
    storage.write_bytes(f"{uri}/there.tar", write_tar(tmp_path / "there.tar",
                                                      [good(0), good(1)]).read_bytes())
    assert read(tmp_path, "there.tar", strict=False, uri=uri) == ([0, 1], [])
    rows, problems = read(tmp_path, "vanished.tar", strict=False, expected=5, uri=uri)
    assert rows == [] and [(p.shard, p.kind, p.samples) for p in problems] == [
        ("vanished.tar", MISSING, 5)]
    assert "shard vanished" in problems[0].reason
    with pytest.raises(DataError, match="shard vanished.tar, key -: shard vanished"):
        read(tmp_path, "vanished.tar", strict=True, expected=5, uri=uri)


@pytest.mark.s3
def test_an_unreachable_endpoint_is_not_a_vanished_shard(tmp_path, monkeypatch):
    """A storage failure other than a missing shard fails the read task (Ray retries it)
    instead of passing for a vanished shard, whose samples would be skipped for good."""
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError) as err:
        read(tmp_path, "shard-0.tar", strict=False, expected=5, uri="s3://bucket/data")
    assert not isinstance(err.value, storage.NotFound), err.value


def test_fewer_samples_than_the_manifest_says(tmp_path):
    write_tar(tmp_path / "s.tar", [good(i) for i in range(3)])
    rows, problems = read(tmp_path, "s.tar", strict=False, expected=5)
    assert rows == [0, 1, 2] and problems[0].samples == 2


def test_members_grouped_by_key_like_webdataset(tmp_path):
    """Keys end at the first '.' of the file name, directories included."""
    path = write_tar(tmp_path / "s.tar", [
        {"__key__": "dir.v1/a", "jpg": jpeg_bytes(0), "cls": b"2", "json": b"{}"},
        {"__key__": "dir.v1/b", "jpg": jpeg_bytes(1), "cls": b"3"}])
    with open(path, "rb") as f:
        got = [(s.key, s.label) for s in iter_samples(f, "s.tar", BadDataPolicy())]
    assert got == [("dir.v1/a", 2), ("dir.v1/b", 3)]
