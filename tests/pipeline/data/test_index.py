"""WebDataset collections as others publish them: numbered tars named by a brace pattern, no
manifest, `jpg` + `cls` / `json` members, multi-label `cls` lists or `labels` in `json`.
`jobs/make_shards.py index` counts them once (on the S3 test endpoint, or into a local
manifest naming shards by URI), the training stream reads them, and multi-label samples reach
the objectives as multi-hot targets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from jobs.make_shards import main as make_shards
from pipeline import storage
from pipeline.data.labels import multi_hot
from pipeline.data.reader import BadDataPolicy, iter_samples
from pipeline.data.shards import DatasetError, read_manifest
from pipeline.data.stream import InputConfig, shard_dataset
from pipeline.data.transforms import Augment
from pipeline.train.objectives import sigmoid_xent, softmax_xent
from tests.conftest import sqlite_store

from .helpers import jpeg_bytes, write_tar


def public_style_shards(folder: Path, shards: int = 4, per_shard: int = 5) -> dict:
    """ImageNet-WebDataset-like tars: `jpg`, `cls` and a `json` with the label; in the last
    shard the label is only in the json. -> {(shard, index): label}."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            label = (3 * s + i) % 7
            sample = {"__key__": f"n{s:02d}_{i:04d}", "jpg": jpeg_bytes(10 * s + i),
                      "json": json.dumps({"label": label, "filename": f"{s}_{i}.JPEG"}).encode()}
            if s < shards - 1:
                sample["cls"] = str(label).encode()
            samples.append(sample)
            truth[(s, i)] = label
        write_tar(folder / f"in-train-{s:06d}.tar", samples)
    return truth


def counts_by_webdataset(uris: list[str]) -> list[int]:
    """Samples per shard, counted by the webdataset package (independently of our reader)."""
    return [sum(1 for _ in wds.WebDataset(u, shardshuffle=False, empty_check=False))
            for u in uris]


@pytest.mark.s3
def test_index_a_brace_pattern_on_s3_without_touching_the_shards(s3, tmp_path):
    truth = public_style_shards(tmp_path / "src")
    for f in sorted((tmp_path / "src").iterdir()):
        storage.upload_file(f, f"s3://{s3}/public/{f.name}")
    before = storage.list_objects(f"s3://{s3}/public")
    pattern = f"s3://{s3}/public/in-train-{{000000..000003}}.tar"

    with pytest.raises(DatasetError, match="names shards, not a dataset folder.*index"):
        read_manifest(pattern)
    assert make_shards(["index", "--data", pattern, "--split", "train"]) == 0

    manifest = read_manifest(f"s3://{s3}/public")
    assert sorted(storage.list_objects(f"s3://{s3}/public")) == sorted(before + [
        "manifest.json"]), "only the manifest was written"
    info = manifest["splits"]["train"]
    local = sorted(str(p) for p in (tmp_path / "src").iterdir())
    assert [s["samples"] for s in info["shards"]] == counts_by_webdataset(local)
    assert [s["name"] for s in info["shards"]] == [Path(p).name for p in local]
    assert info["num_samples"] == len(truth) and manifest["num_classes"] == 7
    assert "max_labels" not in manifest and info["num_skipped"] == 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_stream_from_an_index_kept_apart_from_read_only_shards(ray_local, s3, tmp_path):
    """The shards in a bucket we may not write to; the manifest in a local folder names
    them by URI. A second split is added to the same manifest."""
    truth = public_style_shards(tmp_path / "src")
    for f in sorted((tmp_path / "src").iterdir()):
        storage.upload_file(f, f"s3://{s3}/ro/{f.name}")
    index = tmp_path / "index"
    assert make_shards(["index", "--data", f"s3://{s3}/ro/in-train-{{000000..000002}}.tar",
                        "--out", str(index),
                        "--split", "train"]) == 0
    assert make_shards(["index", "--data", f"s3://{s3}/ro/in-train-000003.tar", "--out", str(index),
                        "--split", "val"]) == 0
    manifest = read_manifest(str(index))
    assert set(manifest["splits"]) == {"train", "val"}
    assert manifest["splits"]["train"]["shards"][0]["name"] == \
        f"s3://{s3}/ro/in-train-000000.tar"

    cfg = InputConfig(uri=str(index), augment=Augment("resize", 16), block_rows=4)
    ds, _, _ = shard_dataset(cfg, num_epochs=2)
    rows = ds.take_all()
    seen = Counter((int(r["epoch"]), int(r["shard"]), int(r["index"])) for r in rows)
    assert set(seen.values()) == {1} and len(seen) == 2 * 15
    assert all(int(r["label"]) == truth[(int(r["shard"]), int(r["index"]))] for r in rows)


def multi_label_shards(folder: Path) -> dict:
    """Labels as a JSON list in cls, comma- or space-separated in cls, and `labels` in json;
    one sample whose label is not an integer. -> {(shard, index): labels}."""
    folder.mkdir(parents=True, exist_ok=True)
    a = [{"__key__": "a0", "jpg": jpeg_bytes(0), "cls": b"[1, 4]"},
         {"__key__": "a1", "jpg": jpeg_bytes(1), "cls": b"2,3,5"},
         {"__key__": "a2", "jpg": jpeg_bytes(2), "cls": b"0"},
         {"__key__": "a3", "jpg": jpeg_bytes(3), "cls": b"x, 1"}]
    b = [{"__key__": "b0", "jpg": jpeg_bytes(4), "json": b'{"labels": [5, 0]}'},
         {"__key__": "b1", "jpg": jpeg_bytes(5), "cls": b"3 1"}]
    write_tar(folder / "jft-0.tar", a)
    write_tar(folder / "jft-1.tar", b)
    return {(0, 0): {1, 4}, (0, 1): {2, 3, 5}, (0, 2): {0}, (1, 0): {5, 0}, (1, 1): {3, 1}}


def test_labels_in_every_published_form(tmp_path):
    def labels(members):
        tar = write_tar(tmp_path / "t.tar", [{"__key__": "k", "jpg": b"x", **members}])
        problems = []
        with open(tar, "rb") as f:
            got = [s.label for s in iter_samples(f, "t", BadDataPolicy(False, problems.append),
                                                 10, max_labels=4)]
        return got[0] if got else problems[0].reason

    assert labels({"cls": b"3\n"}) == (3,)
    assert labels({"cls": b"[7, 2]"}) == (7, 2)
    assert labels({"cls": b"1 2 3"}) == (1, 2, 3)
    assert labels({"json": b'{"label": 4, "class_name": "tench"}'}) == (4,)
    assert labels({"json": b'{"labels": [0, 9]}'}) == (0, 9)
    assert "not an integer" in labels({"cls": b"[1.5]"})
    assert "outside [0, 10)" in labels({"cls": b"2,10"})
    assert "5 labels, the set allows 4" in labels({"cls": b"1,2,3,4,5"})
    assert "no label" in labels({"json": b'{"caption": "a dog"}'})
    assert "no label" in labels({"cls": b"[]"})


@pytest.mark.ray
def test_multi_label_set_streams_padded_labels_that_become_multi_hot(ray_local, tmp_path):
    truth = multi_label_shards(tmp_path / "jft")
    assert make_shards(["index", "--data", str(tmp_path / "jft")]) == 0
    manifest = read_manifest(str(tmp_path / "jft"))
    assert manifest["max_labels"] == 3 and manifest["num_classes"] == 6
    assert manifest["splits"]["train"]["num_samples"] == 6      # a3 counts; it is skipped
    assert manifest["splits"]["train"]["num_skipped"] == 1

    cfg = InputConfig(uri=str(tmp_path / "jft"), augment=Augment("resize", 16), block_rows=2)
    ds, _, health = shard_dataset(cfg, num_epochs=1)
    rows = ds.take_all()
    assert len(rows) == len(truth)
    for r in rows:
        lab, want = np.asarray(r["label"]), truth[(int(r["shard"]), int(r["index"]))]
        assert lab.shape == (3,) and set(lab[:len(want)].tolist()) == want
        assert (lab[len(want):] == -1).all(), "padded with -1"

    labels = torch.as_tensor(np.stack([np.asarray(r["label"]) for r in rows]))
    hot = multi_hot(labels, 6)
    expected = torch.zeros(len(rows), 6)
    for k, r in enumerate(rows):
        expected[k, sorted(truth[(int(r["shard"]), int(r["index"]))])] = 1
    assert torch.equal(hot, expected)
    logits = torch.randn(len(rows), 6)
    sig = torch.nn.functional.binary_cross_entropy_with_logits(logits, expected,
                                                              reduction="sum") / len(rows)
    assert sigmoid_xent(logits, labels).item() == pytest.approx(sig.item(), rel=1e-6)
    soft = -(expected / expected.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    assert softmax_xent(logits, labels).item() == pytest.approx(soft.item(), rel=1e-6)
    # One-label rows: the same as plain cross-entropy on the index.
    single = torch.tensor([[2, -1, -1], [0, -1, -1]])
    assert softmax_xent(logits[:2], single).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:2], torch.tensor([2, 0])).item(), rel=1e-6)


def test_index_errors_are_one_line(tmp_path):
    assert make_shards(["index", "--data", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert make_shards(["index", "--data", str(tmp_path / "empty")]) == 2
    assert make_shards(["folder", "--data", str(tmp_path)]) == 2   # no destination


@pytest.mark.ray
@pytest.mark.slow
def test_pretrain_multi_label_on_an_indexed_set(ray_local, tmp_path):
    """JFT-like: several labels per image, sigmoid cross-entropy, through jobs' real path
    (Ray Data -> Ray Train worker -> objective), on shards known only by their index."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.config import apply_overrides, smoke
    from pipeline.train.run import pretrain

    folder = tmp_path / "jft"
    folder.mkdir()
    for s in range(3):
        write_tar(folder / f"jft-{s:02d}.tar", [
            {"__key__": f"s{s}_{i:03d}", "jpg": jpeg_bytes(100 * s + i, (40, 40)),
             "cls": json.dumps(sorted({i % 6, (i * 5 + s) % 6})).encode()}
            for i in range(24)])
    assert make_shards(["index", "--data", f"{folder}/jft-{{00..02}}.tar",
                        "--out", str(tmp_path / "idx")]) == 0
    assert read_manifest(str(tmp_path / "idx"))["max_labels"] == 2

    cfg = apply_overrides(smoke(), [
        "run.name=jft", f"run.storage={tmp_path / 'runs'}", "data.source=shards",
        f"data.uri={tmp_path / 'idx'}", "data.augment=inception", "model.num_classes=6",
        "train.objective=sigmoid", "train.total_steps=6", "train.global_batch_size=16",
        "train.log_every=1", "probe.every=0", "checkpoint.every=6",
        "data.shuffle_buffer=16", "optim.warmup_steps=2"])
    uri = sqlite_store(tmp_path / "m.db")
    out = pretrain(cfg, tracking_uri=uri)
    losses = [m.value for m in MlflowClient(uri).get_metric_history(out.run_id, "train/loss")]
    # Sigmoid xent summed over 6 classes starts near 6 * log(2) = 4.16 (zero-init head).
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(6 * np.log(2), rel=0.05)
