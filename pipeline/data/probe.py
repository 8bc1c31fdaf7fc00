"""Small labelled sets for the few-shot probe that runs during pretraining, read directly
(no Ray Data) and resized to the model's resolution: from shards with a manifest, or from a
local VTAB-1k task folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import storage
from pipeline.data.reader import BadDataPolicy, iter_samples
from pipeline.data.shards import DatasetError, read_manifest, vtab_folder
from pipeline.data.stream import open_shard
from pipeline.data.transforms import Augment, decode_and_augment


def load_fewshot_set(uri: str, image_size: int, max_images: int) -> dict:
    """A downstream set for the few-shot probe, at most `max_images` of each split, resized to
    the model's resolution: {"train_images", "train_labels", "test_images", "test_labels",
    "num_classes"}. `uri`: shards with a manifest (train split `train800val200` or `train`,
    test split `test` or `val`: what `jobs/make_shards.py vtab` or `folder` writes) or a
    local VTAB-1k task folder (train800val200 and test)."""
    if not storage.is_s3(uri) and (Path(uri) / "train800val200.txt").exists():
        src = vtab_folder(uri)
        aug, rng = Augment("resize", image_size), np.random.default_rng(0)
        parts = {}
        for part, split in (("train", "train800val200"), ("test", "test")):
            refs = src.splits.get(split, [])[:max_images]
            parts[f"{part}_images"] = np.stack([decode_and_augment(r.load()[0], aug, rng)
                                                for r in refs]) if refs else np.zeros(
                (0, image_size, image_size, 3), np.uint8)
            parts[f"{part}_labels"] = np.asarray([r.label for r in refs], np.int64)
        return {**parts, "num_classes": len(src.classes)}
    manifest = read_manifest(uri)
    have = manifest["splits"]
    train = next((s for s in ("train800val200", "train") if s in have), None)
    test = next((s for s in ("test", "val") if s in have), None)
    if train is None or test is None:
        raise DatasetError(f"{uri}: a few-shot set needs a train split (train800val200 or "
                           f"train) and a test split (test or val); it has {sorted(have)}")
    tr = load_probe(uri, train, image_size, max_images)
    te = load_probe(uri, test, image_size, max_images)
    return {"train_images": tr["images"], "train_labels": tr["labels"],
            "test_images": te["images"], "test_labels": te["labels"],
            "num_classes": int(manifest["num_classes"])}


def load_probe(uri: str, split: str, image_size: int, max_images: int, seed: int = 0) -> dict:
    """A small labelled set for the few-shot probe, read directly (no Ray Data), resized to
    the model's resolution: {"images": uint8 (n, S, S, 3), "labels": int64 (n,)}. Bad samples
    are skipped."""
    manifest = read_manifest(uri)
    if split not in manifest["splits"]:
        raise DatasetError(f"{uri}: no split {split!r} for the few-shot probe; it has "
                           f"{sorted(manifest['splits'])} (set probe.split)")
    fs, root = storage.filesystem(uri)
    aug = Augment("resize", image_size)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    policy = BadDataPolicy(strict=False)
    for entry in manifest["splits"][split]["shards"]:
        try:
            stream = open_shard(fs, root, entry["name"], read_ahead=False)
        except (FileNotFoundError, OSError):
            continue
        with stream:
            for sample in iter_samples(stream, entry["name"], policy, manifest["num_classes"],
                                       max_labels=int(manifest.get("max_labels", 1))):
                try:
                    images.append(decode_and_augment(sample.image, aug, rng))
                except Exception:  # noqa: BLE001
                    continue
                # A multi-label sample counts as its first label: the linear few-shot probe
                # classifies one class per image.
                labels.append(sample.label[0] if isinstance(sample.label, tuple)
                              else sample.label)
                if len(images) >= max_images:
                    break
        if len(images) >= max_images:
            break
    return {"images": np.stack(images) if images else np.zeros((0, image_size, image_size, 3),
                                                                 np.uint8),
            "labels": np.asarray(labels, dtype=np.int64)}
