"""VTAB-1k task data, local or on S3, in either of two layouts:

- the PyTorch VTAB-1k folder layout (as NOAH / SSF / FacT ship it):
      <root>/<task>/{train800,val200,train800val200,test}.txt  ("images/<split>/<i>.jpg <label>")
      <root>/<task>/images/<split>/<i>.jpg
- shards written by `jobs/make_shards.py vtab <root>/<task> <dst>/<task>`:
      <root>/<task>/manifest.json + <split>-NNNNNN.tar   (the four splits kept)

Training splits are decoded once per resolution into uint8 arrays that every trial of the task
shares through the Ray object store: at the pre-crop size (448/384 of the resolution, BiT /
ViT) for tasks that take a random crop, at the resolution for the others, so that crops and
flips are cheap slices per batch. The `test` split stays encoded (JPEG bytes) until a final
trial evaluates it in chunks: decoded at 384 px the 19 test sets would take ~170 GB.

Evaluation data must be complete: a missing list file, an image the list names but storage
lacks, a label outside the task's classes, a corrupt image or a truncated shard is a
`TaskDataError` naming the file, raised before any trial starts.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.tasks import Task
from pipeline import storage
from pipeline.data.shards import (
    MANIFEST,
    DatasetError,
    parse_vtab_list,
    read_manifest,
    read_vtab_list,
)
from pipeline.data.transforms import Augment, decode_and_augment

SPLITS = ("train800", "val200", "train800val200", "test")
IO_THREADS = 16


@dataclass(frozen=True)
class TaskDataConfig:
    """Where the tasks are (the `data` section of `vit-vtab`'s config)."""

    uri: str = ""          # a folder or s3:// prefix in either layout above


class TaskDataError(DatasetError):
    """A task whose data is missing or inconsistent, with one line naming the file."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray     # uint8 (N, H, W, 3)
    labels: np.ndarray     # int64 (N,)


@dataclass(frozen=True)
class Encoded:
    images: list[bytes]    # JPEG / PNG bytes, in list order
    labels: np.ndarray     # int64 (N,)


def task_uri(root: str | os.PathLike, task: Task) -> str:
    root = str(root)
    return storage.join(root, task.name) if storage.is_s3(root) else str(Path(root) / task.name)


def is_sharded(root: str | os.PathLike, task: Task) -> bool:
    uri = storage.join(task_uri(root, task), MANIFEST)
    if storage.is_s3(uri):
        return storage.object_metadata(uri) is not None
    return Path(uri).exists()


# ---------------------------------------------------------------------------------------------
# Checking (cheap, before any trial): list files against images, or manifests against shards
# ---------------------------------------------------------------------------------------------
def check_task(root: str | os.PathLike, task: Task) -> dict[str, int]:
    """Validate every split of a task; -> split sizes."""
    if not storage.is_s3(root) and not Path(root).is_dir():
        raise TaskDataError(f"--data {root}: no such folder; give the VTAB-1k root that holds "
                            f"one folder per task (<root>/{task.name}/train800.txt, ...) or "
                            f"the shards jobs/make_shards.py vtab writes")
    if is_sharded(root, task):
        sizes = {}
        for split in SPLITS:
            _shard_entries(root, task, split)
            sizes[split] = _manifest_split(root, task, split)["num_samples"]
        return sizes
    return {split: len(read_list(root, task, split)) for split in SPLITS}


def read_list(root: str | os.PathLike, task: Task, split: str) -> list[tuple[str, int]]:
    """The (image URI or path, label) pairs of one split of the folder layout, checked
    against the images and the task's classes."""
    folder = task_uri(root, task)
    list_uri = storage.join(folder, f"{split}.txt") if storage.is_s3(folder) \
        else str(Path(folder) / f"{split}.txt")
    hint = (f"expected the VTAB-1k layout (<root>/<task>/{split}.txt, images/{split}/...) "
            f"or shards from jobs/make_shards.py vtab")
    try:
        if storage.is_s3(folder):
            try:
                text = storage.read_bytes(list_uri).decode()
            except storage.NotFound:
                raise TaskDataError(f"{task.name}: {list_uri} is missing; {hint}") from None
            pairs = parse_vtab_list(text, list_uri, task.num_classes)
            present = set(storage.list_objects(storage.join(folder, f"images/{split}")))
            for n, rel, _ in pairs:
                if rel.split(f"images/{split}/", 1)[-1] not in present:
                    raise TaskDataError(f"{list_uri}:{n}: {rel} does not exist; the list file "
                                        f"and the images disagree")
            pairs = [(storage.join(folder, rel), label) for _, rel, label in pairs]
        else:
            if not Path(list_uri).exists():
                raise TaskDataError(f"{task.name}: {list_uri} is missing; {hint}")
            pairs = [(str(path), label) for _, path, label in
                     read_vtab_list(Path(list_uri), Path(folder), task.num_classes)]
    except TaskDataError:
        raise
    except DatasetError as err:
        raise TaskDataError(str(err)) from None
    if not pairs:
        raise TaskDataError(f"{list_uri} lists no images")
    return pairs


def _manifest_split(root, task: Task, split: str) -> dict:
    uri = task_uri(root, task)
    manifest = read_manifest(uri)
    if split not in manifest["splits"]:
        raise TaskDataError(f"{uri}: the shards have no {split!r} split (they have "
                            f"{sorted(manifest['splits'])}); write them with "
                            f"jobs/make_shards.py vtab from the task's VTAB-1k folder")
    if manifest["num_classes"] > task.num_classes:
        raise TaskDataError(f"{uri}: the shards have {manifest['num_classes']} classes but "
                            f"{task.name} has {task.num_classes}; wrong task folder?")
    return manifest["splits"][split]


def _shard_entries(root, task: Task, split: str) -> tuple[str, list[str]]:
    """(task URI, shard names) of one split, each checked to exist."""
    uri = task_uri(root, task)
    entries = [e["name"] for e in _manifest_split(root, task, split)["shards"]]
    if storage.is_s3(uri):
        present = set(storage.list_objects(uri))
    else:
        present = {p.name for p in Path(uri).iterdir()}
    for name in entries:
        if name not in present:
            raise TaskDataError(f"{uri}: shard {name} of split {split!r} is missing; "
                                f"rewrite the task's shards with jobs/make_shards.py")
    return uri, entries


# ---------------------------------------------------------------------------------------------
# Reading and decoding
# ---------------------------------------------------------------------------------------------
def read_encoded(root: str | os.PathLike, task: Task, split: str) -> Encoded:
    """Every image of one split, encoded, with its label, in list (or shard) order."""
    if is_sharded(root, task):
        return _read_shards(root, task, split)
    pairs = read_list(root, task, split)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        images = list(pool.map(lambda p: storage.read_bytes(p[0]), pairs))
    return Encoded(images, np.asarray([label for _, label in pairs], dtype=np.int64))


def _read_shards(root, task: Task, split: str) -> Encoded:
    from pipeline.data.reader import BadDataPolicy, DataError, iter_samples

    uri, names = _shard_entries(root, task, split)
    expected = _manifest_split(root, task, split)["num_samples"]
    fs, base = storage.filesystem(uri)
    policy = BadDataPolicy(strict=True)   # evaluation data must be complete
    images, labels = [], []
    for name in names:
        try:
            with storage.open_read(fs, f"{base.rstrip('/')}/{name}") as stream:
                for sample in iter_samples(stream, name, policy, task.num_classes):
                    images.append(sample.image)
                    labels.append(sample.label)
        except DataError as err:
            raise TaskDataError(f"{uri}: {err}") from None
    if len(images) != expected:
        raise TaskDataError(f"{uri}: split {split!r} has {len(images)} samples but the manifest "
                            f"says {expected}; rewrite the task's shards")
    return Encoded(images, np.asarray(labels, dtype=np.int64))


def train_size(task: Task, resolution: int) -> int:
    """Stored size of training images: the pre-crop size when the task crops."""
    return int(round(resolution * 448 / 384)) if task.crop else resolution


def decode(encoded: Encoded, size: int, name: str = "") -> Split:
    """Decode and resize (bilinear) every image to size x size, uint8."""
    aug, rng = Augment("resize", size), np.random.default_rng(0)  # "resize" draws nothing

    def one(i: int) -> np.ndarray:
        try:
            return decode_and_augment(encoded.images[i], aug, rng)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            raise TaskDataError(f"{name}: image {i} cannot be decoded "
                                f"({type(err).__name__}); the file is corrupt") from None

    if not encoded.images:
        return Split(np.zeros((0, size, size, 3), np.uint8), encoded.labels)
    # PIL releases the GIL while decoding and resizing: threads use every core given.
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        images = np.stack(list(pool.map(one, range(len(encoded.images)))))
    return Split(images, encoded.labels)


def load_split(root: str | os.PathLike, task: Task, split: str, resolution: int,
               train: bool) -> Split:
    """Read and decode one split: training images at `train_size`, evaluation images at the
    resolution."""
    size = train_size(task, resolution) if train else resolution
    return decode(read_encoded(root, task, split), size, f"{task.name}/{split}")


# ---------------------------------------------------------------------------------------------
# Generated tasks in the exact layout: for tests, the demo and the benchmark
# ---------------------------------------------------------------------------------------------
def oriented_grating(label: int, num_classes: int, size: int, rng: np.random.Generator,
                     noise: float = 0.1) -> bytes:
    """A JPEG whose class is the orientation of a grating (num_classes angles over 180
    degrees); hue, frequency, phase and noise vary freely, so the task takes features that
    see orientation, and fine classes are hard: on purpose harder than the pretraining demo
    set (`pipeline.data.shards.grating_images`, where hue and frequency give the class
    away)."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * label / num_classes + rng.normal(0, 0.02)
    freq = rng.uniform(2.0, 5.0)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))
                  + rng.uniform(0, 2 * np.pi))
    colour = rng.uniform(0.2, 1.0, 3)
    img = 0.5 + 0.35 * wave[..., None] * colour + rng.normal(0, noise, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_grating_task(root: str | os.PathLike, task: Task, train: int = 40, val: int = 10,
                       test: int = 40, image_size: int = 40, seed: int = 0,
                       noise: float = 0.1) -> Path:
    """A generated task in the VTAB-1k folder layout: real JPEG files and list files, with
    `train` / `val` / `test` images standing in for 800 / 200 / the test split, and
    train800val200 stored again as train800 + val200 (as NOAH's generator does). Classes are
    balanced within each split (`oriented_grating`: the orientation of a grating)."""
    folder = Path(root) / task.name
    rng = np.random.default_rng(seed)
    K = task.num_classes

    def draw(n: int) -> list[tuple[bytes, int]]:
        labels = rng.permutation(np.arange(n) % K)
        return [(oriented_grating(int(lab), K, image_size, rng, noise), int(lab))
                for lab in labels]

    train_items, val_items = draw(train), draw(val)
    parts = {"train800": train_items, "val200": val_items,
             "train800val200": train_items + val_items, "test": draw(test)}
    for split, items in parts.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (data, label) in enumerate(items):
            (folder / "images" / split / f"{i:06d}.jpg").write_bytes(data)
            lines.append(f"images/{split}/{i:06d}.jpg {label}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder
