"""make_shards: folders, VTAB-1k tasks and synthetic sets -> WebDataset shards + manifest,
locally and on a real S3 endpoint (moto over HTTP); resumable; read back with `webdataset`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline import storage
from pipeline.data import shards
from pipeline.data.shards import DatasetError, ShardOptions, write_shards

from .helpers import image_folder, jpeg_bytes

ROOT = Path(__file__).resolve().parents[3]


def read_back(folder: Path, manifest: dict, split: str) -> list[dict]:
    """Every sample of a split, read independently with the webdataset package."""
    urls = [str(folder / s["name"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_image_folder_roundtrip(tmp_path):
    src = image_folder(tmp_path / "src")
    manifest = write_shards(shards.image_folder(src), str(tmp_path / "out"),
                            ShardOptions(shard_size_mb=0.01))
    assert manifest["classes"] == ["cat", "dog", "emu"] and manifest["num_classes"] == 3
    info = manifest["splits"]["train"]
    assert info["num_samples"] == 15 and len(info["shards"]) > 1
    assert sum(s["samples"] for s in info["shards"]) == 15
    samples = read_back(tmp_path / "out", manifest, "train")
    assert len(samples) == 15 and len({s["__key__"] for s in samples}) == 15
    for s in samples:
        meta = json.loads(s["json"])
        original = (src / meta["path"]).read_bytes()
        assert s["jpg"] == original, "bytes pass through untouched without --resize-short"
        assert int(s["cls"]) == manifest["classes"].index(meta["class"])


def test_vtab_task_keeps_its_splits(tmp_path):
    task = tmp_path / "dtd"
    labels = {"train800": [0, 1, 2, 1], "val200": [2, 0], "test": [1, 1, 0]}
    for split, labs in labels.items():
        (task / "images" / split).mkdir(parents=True)
        lines = []
        for i, lab in enumerate(labs):
            (task / "images" / split / f"{i:06d}.jpg").write_bytes(jpeg_bytes(i))
            lines.append(f"images/{split}/{i:06d}.jpg {lab}")
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    manifest = write_shards(shards.vtab_folder(task, num_classes=3), str(tmp_path / "out"),
                            ShardOptions(shuffle_seed=None))
    assert set(manifest["splits"]) == {"train800", "val200", "test"}
    for split, labs in labels.items():
        got = read_back(tmp_path / "out", manifest, split)
        assert [int(s["cls"]) for s in got] == labs
        assert [json.loads(s["json"])["path"] for s in got] == [
            f"images/{split}/{i:06d}.jpg" for i in range(len(labs))]


def test_vtab_list_and_images_disagree(tmp_path):
    task = tmp_path / "t"
    (task / "images" / "train800").mkdir(parents=True)
    (task / "train800.txt").write_text("images/train800/000000.jpg 0\n")
    with pytest.raises(DatasetError, match="000000.jpg does not exist; the list file and the "
                                           "images disagree"):
        shards.vtab_folder(task)
    (task / "images" / "train800" / "000000.jpg").write_bytes(jpeg_bytes(0))
    (task / "train800.txt").write_text("images/train800/000000.jpg 7\n")
    with pytest.raises(DatasetError, match=r"label 7 outside \[0, 5\)"):
        shards.vtab_folder(task, num_classes=5)


def test_synthetic_labels_are_learnable():
    src = shards.grating_images(num_samples=200, num_classes=5, image_size=32, seed=3)
    feats, labels = [], []
    for ref in src.splits["train"]:
        img = np.asarray(Image.open(io.BytesIO(ref.load()[0])), dtype=np.float32)
        feats.append(img.mean(axis=(0, 1)))
        labels.append(ref.label)
    feats, labels = np.stack(feats), np.array(labels)
    # A nearest-centroid classifier on mean colour alone, fit on half, scored on the other.
    half = len(labels) // 2
    cents = np.stack([feats[:half][labels[:half] == k].mean(0) for k in range(5)])
    pred = np.argmin(((feats[half:, None] - cents[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels[half:]).mean() > 0.9
    assert len(src.splits["val"]) == 20


def test_resize_short_and_determinism(tmp_path):
    src = image_folder(tmp_path / "src", per_class=3)
    opts = ShardOptions(resize_short=24, shuffle_seed=5)
    m1 = write_shards(shards.image_folder(src), str(tmp_path / "a"), opts)
    m2 = write_shards(shards.image_folder(src), str(tmp_path / "b"), opts)
    assert [s["sha256"] for s in m1["splits"]["train"]["shards"]] == [
        s["sha256"] for s in m2["splits"]["train"]["shards"]], "same input -> same bytes"
    for s in read_back(tmp_path / "a", m1, "train"):
        assert min(Image.open(io.BytesIO(s["jpg"])).size) == 24
    m3 = write_shards(shards.image_folder(src), str(tmp_path / "c"),
                      ShardOptions(resize_short=24, shuffle_seed=6))
    order = lambda m, d: [json.loads(s["json"])["path"] for s in read_back(d, m, "train")]  # noqa: E731
    assert order(m1, tmp_path / "a") != order(m3, tmp_path / "c")


@pytest.mark.s3
def test_s3_upload_resumes_after_an_interruption(s3, tmp_path, monkeypatch):
    src = shards.grating_images(num_samples=120, num_classes=4, image_size=32, val_fraction=0)
    dst = f"s3://{s3}/ds/v1"
    opts = ShardOptions(shard_size_mb=0.05)
    real_upload, calls, failed = storage.upload_file, [], []

    def flaky_upload(local, uri, metadata=None, callback=None):
        calls.append(uri)
        if len(calls) == 3 and not failed:
            failed.append(uri)
            raise storage.StorageError(f"{uri}: connection reset (simulated)")
        real_upload(local, uri, metadata, callback)

    monkeypatch.setattr(storage, "upload_file", flaky_upload)
    with pytest.raises(storage.StorageError, match="simulated"):
        write_shards(src, dst, opts)
    client = boto3.client("s3")
    keys = lambda: sorted(o["Key"] for o in client.list_objects_v2(  # noqa: E731
        Bucket=s3, Prefix="ds/v1/").get("Contents", []))
    assert len(keys()) == 2 and f"ds/v1/{shards.MANIFEST}" not in keys(), \
        "no manifest and no half object after the interruption"
    with pytest.raises(DatasetError, match="no manifest.json"):
        shards.read_manifest(dst)

    calls.clear()
    messages = []
    manifest = write_shards(src, dst, opts, log=messages.append)
    n = len(manifest["splits"]["train"]["shards"])
    assert n >= 4 and len(calls) == n - 2, "the two finished shards were not uploaded again"
    assert "kept 2 identical shard(s)" in messages[0]
    assert keys() == sorted([f"ds/v1/train-{i:06d}.tar" for i in range(n)]
                            + [f"ds/v1/{shards.MANIFEST}"])
    # Every object is the shard the manifest describes.
    import hashlib
    for entry in manifest["splits"]["train"]["shards"]:
        body = client.get_object(Bucket=s3, Key=f"ds/v1/{entry['name']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert shards.read_manifest(dst) == manifest


@pytest.mark.s3
def test_cli_to_s3_and_errors(s3, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "jobs" / "make_shards.py")]
    out = subprocess.run(cmd + ["synthetic", "--out", f"s3://{s3}/demo", "--num-samples", "64",
                                "--num-classes", "4", "--image-size", "24"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "58 samples" in out.stdout
    assert "img/s" in out.stderr, "progress is shown"
    assert "images/s" in out.stdout, "throughput is reported"
    assert "testing-secret" not in out.stdout + out.stderr
    assert shards.read_manifest(f"s3://{s3}/demo")["num_classes"] == 4

    bad = subprocess.run(cmd + ["folder", "--data", str(tmp_path / "missing"), "--out",
                                str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "no such folder" in \
        bad.stderr
    nobucket = subprocess.run(cmd + ["synthetic", "--out", "s3://no-such-bucket-x/demo",
                                     "--num-samples", "4"],
                              env=env, capture_output=True, text=True, timeout=60)
    assert nobucket.returncode == 2 and "bucket 'no-such-bucket-x' does not exist" in \
        nobucket.stderr


def _folder_with_bad_files(root):
    src = image_folder(root, per_class=4)
    good = (src / "cat" / "img.0.jpg").read_bytes()
    (src / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (src / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "emu" / "notes.png").write_text("this is text, not a PNG")
    return src


def test_undecodable_files_are_skipped_logged_and_counted(tmp_path, capsys):
    from jobs.make_shards import main as make_shards

    src = _folder_with_bad_files(tmp_path / "src")
    assert make_shards(["folder", "--data", str(src),
                        "--out", str(tmp_path / "out"), "--shard-size-mb",
                        "0.01"]) == 0
    out = capsys.readouterr()
    manifest = shards.read_manifest(str(tmp_path / "out"))
    train = manifest["splits"]["train"]
    assert train["num_samples"] == 12 and train["num_skipped"] == 3
    assert sum(s["samples"] for s in train["shards"]) == 12
    assert sorted(x["path"] for x in train["skipped"]) == [
        "cat/corrupt.jpg", "dog/truncated.jpg", "emu/notes.png"]
    assert all("not a decodable image" in x["reason"] for x in train["skipped"])
    for path in ("cat/corrupt.jpg", "dog/truncated.jpg", "emu/notes.png"):
        assert f"skipping {src / path}" in out.out
    assert "12 samples in" in out.out and "3 skipped" in out.out
    samples = read_back(tmp_path / "out", manifest, "train")
    assert len(samples) == 12
    for s in samples:                                   # every sample is a whole image
        Image.open(io.BytesIO(s["jpg"])).load()
    assert not {json.loads(s["json"])["path"] for s in samples} & {
        "cat/corrupt.jpg", "dog/truncated.jpg", "emu/notes.png"}


def test_strict_stops_at_the_first_bad_file_naming_it(tmp_path, capsys):
    from jobs.make_shards import main as make_shards

    src = _folder_with_bad_files(tmp_path / "src")
    assert make_shards(["folder", "--data", str(src), "--out", str(tmp_path / "out"), "--strict",
                        "--no-shuffle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {src}/cat/corrupt.jpg: not a decodable image")
    assert "--strict" in err
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


def test_parallel_writing_gives_the_same_shards(tmp_path):
    src = shards.grating_images(num_samples=300, num_classes=5, image_size=24, val_fraction=0)
    opts = ShardOptions(shard_size_mb=0.1)
    serial = write_shards(src, str(tmp_path / "one"), opts, workers=1)
    parallel = write_shards(src, str(tmp_path / "two"), opts, workers=2)
    assert [s["sha256"] for s in serial["splits"]["train"]["shards"]] == [
        s["sha256"] for s in parallel["splits"]["train"]["shards"]]
    assert parallel["splits"]["train"]["num_samples"] == 300
