"""Small labelled sets for the few-shot probe that runs during pretraining, read directly
(no Ray Data) and resized to the model's resolution: from shards with a manifest, or from a
local VTAB-1k task folder.

The probe's training pool is read per class (`per_class`): each class's first images in the
split's order, up to the most shots the probe draws, so that a k-shot draw has k images of
every class the split holds k of, however many classes there are. A cap on the total number of
images (`max_images`) keeps memory bounded: the pool is held, uint8 at the model's
resolution (150 KB an image at 224 px), on the driver and in the object store.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.data.reader import BadDataPolicy, iter_samples
from pipeline.data.shards import DatasetError, read_manifest, vtab_folder
from pipeline.data.stream import open_shard
from pipeline.data.transforms import Augment, decode_and_augment


def load_fewshot_set(uri: str, image_size: int, max_images: int, per_class: int,
                     max_pool: int) -> dict:
    """A downstream set for the few-shot probe, resized to the model's resolution:
    {"train_images", "train_labels", "test_images", "test_labels", "num_classes"}. The train
    part holds up to `per_class` images of each class (at most `max_pool` in all), the test
    part the split's first `max_images`. `uri`: shards with a manifest (train split
    `train800val200` or `train`, test split `test` or `val`: what `jobs/make_shards.py vtab`
    or `folder` writes) or a local VTAB-1k task folder (train800val200 and test)."""
    if not storage.is_s3(uri) and (Path(uri) / "train800val200.txt").exists():
        src = vtab_folder(uri)
        k = len(src.classes)
        aug, rng = Augment("resize", image_size), np.random.default_rng(0)
        picks = {"train": _take(((r, r.label) for r in src.splits.get("train800val200", [])),
                                k, max_pool, per_class),
                 "test": _take(((r, r.label) for r in src.splits.get("test", [])), k,
                               max_images)}
        parts = {}
        for part, picked in picks.items():
            parts[f"{part}_images"] = _stack([decode_and_augment(r.load()[0], aug, rng)
                                              for r, _ in picked], image_size)
            parts[f"{part}_labels"] = np.asarray([label for _, label in picked], np.int64)
        return {**parts, "num_classes": k}
    manifest = read_manifest(uri)
    have = manifest["splits"]
    train = next((s for s in ("train800val200", "train") if s in have), None)
    test = next((s for s in ("test", "val") if s in have), None)
    if train is None or test is None:
        raise DatasetError(f"{uri}: a few-shot set needs a train split (train800val200 or "
                           f"train) and a test split (test or val); it has {sorted(have)}")
    tr = load_probe(uri, train, image_size, max_pool, per_class=per_class)
    te = load_probe(uri, test, image_size, max_images)
    return {"train_images": tr["images"], "train_labels": tr["labels"],
            "test_images": te["images"], "test_labels": te["labels"],
            "num_classes": int(manifest["num_classes"])}


def load_probe(uri: str, split: str, image_size: int, max_images: int,
               per_class: int | None = None) -> dict:
    """A small labelled set for the few-shot probe, read directly (no Ray Data), resized to
    the model's resolution: {"images": uint8 (n, S, S, 3), "labels": int64 (n,)}: the split's
    first `max_images`, or with `per_class` the first `per_class` of each class (at most
    `max_images` in all; the split is read until every class has them). Bad samples are
    skipped."""
    num_classes = int(read_manifest(uri)["num_classes"])
    return _decoded(_take(_samples(uri, split), num_classes, max_images, per_class),
                    image_size)


def load_split_pool(uri: str, split: str, image_size: int, per_class: int, max_pool: int,
                    max_test: int) -> tuple[dict, dict]:
    """One split read once into a training pool (each class's first `per_class` images, at
    most `max_pool`) and a test set (the other images, at most `max_test`): the probe's
    fallback when it has no downstream set. -> (pool, test), as `load_probe` returns."""
    num_classes = int(read_manifest(uri)["num_classes"])
    counts = np.zeros(num_classes, np.int64)
    pool, test = [], []
    for sample, label in _samples(uri, split):
        if counts[label] < per_class and len(pool) < max_pool:
            counts[label] += 1
            pool.append((sample, label))
        elif len(test) < max_test:
            test.append((sample, label))
        if len(test) >= max_test and (len(pool) >= max_pool or counts.min() >= per_class):
            break
    return _decoded(pool, image_size), _decoded(test, image_size)


def _samples(uri: str, split: str) -> Iterator[tuple[object, int]]:
    """(sample, label) of a split in its order, undecoded; unreadable shards skipped. A
    multi-label sample counts as its first label: the linear few-shot probe classifies one
    class per image."""
    manifest = read_manifest(uri)
    if split not in manifest["splits"]:
        raise DatasetError(f"{uri}: no split {split!r} for the few-shot probe; it has "
                           f"{sorted(manifest['splits'])} (set probe.split)")
    fs, root = storage.filesystem(uri)
    policy = BadDataPolicy(strict=False)
    for entry in manifest["splits"][split]["shards"]:
        try:
            stream = open_shard(fs, root, entry["name"], read_ahead=False)
        except (FileNotFoundError, OSError):
            continue
        with stream:
            for sample in iter_samples(stream, entry["name"], policy, manifest["num_classes"],
                                       max_labels=int(manifest.get("max_labels", 1))):
                yield sample, int(sample.label[0] if isinstance(sample.label, tuple)
                                  else sample.label)


def _take(items, num_classes: int, max_items: int, per_class: int | None = None) -> list:
    """The first `max_items` of (item, label) pairs; with `per_class`, only the first
    `per_class` of each label, stopping once every class has them. Reads no further than it
    needs, so that a long split is not read to its end."""
    counts, out = np.zeros(num_classes, np.int64), []
    for item, label in items:
        if len(out) >= max_items:
            break
        if per_class is not None:
            if counts[label] >= per_class:
                continue
            counts[label] += 1
        out.append((item, label))
        if per_class is not None and counts.min() >= per_class:
            break
    return out


def _decoded(picked: list, image_size: int) -> dict:
    """(sample, label) pairs -> {"images", "labels"}, resized; undecodable ones skipped."""
    aug, rng = Augment("resize", image_size), np.random.default_rng(0)
    images, labels = [], []
    for sample, label in picked:
        try:
            images.append(decode_and_augment(sample.image, aug, rng))
        except Exception:  # noqa: BLE001
            continue
        labels.append(label)
    return {"images": _stack(images, image_size), "labels": np.asarray(labels, np.int64)}


def _stack(images: list[np.ndarray], image_size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
