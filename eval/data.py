"""VTAB-1k task data from the PyTorch on-disk layout (../shared/docs/vtab.md §5), decoded once
per resolution into uint8 arrays that every trial of the task shares.

    <root>/<task>/{train800,val200,train800val200,test}.txt  ("images/<split>/<i>.jpg <label>")
    <root>/<task>/images/<split>/<i>.jpg

Training images are stored at the pre-crop size (448/384 of the resolution, BiT / ViT) for
tasks that take a random crop, at the resolution for the others; evaluation images at the
resolution. Random crops and flips are then cheap array slices per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.tasks import Task
from pipeline.data.shards import DatasetError, read_vtab_list
from pipeline.data.transforms import Augment, decode_and_augment

SPLITS = ("train800", "val200", "train800val200", "test")


class TaskDataError(DatasetError):
    """A task whose data is missing or inconsistent, with one line naming the file."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray     # uint8 (N, H, W, 3)
    labels: np.ndarray     # int64 (N,)


def read_list(root: str | Path, task: Task, split: str) -> list[tuple[Path, int]]:
    """The (image path, label) pairs of one split, checked against the images and classes."""
    folder = Path(root) / task.name
    list_file = folder / f"{split}.txt"
    if not list_file.exists():
        raise TaskDataError(f"{task.name}: {list_file} is missing; expected the VTAB-1k layout "
                            f"(<root>/<task>/{split}.txt, images/{split}/...)")
    try:
        pairs = [(path, label) for _, path, label in
                 read_vtab_list(list_file, folder, task.num_classes)]
    except DatasetError as err:
        raise TaskDataError(str(err)) from None
    if not pairs:
        raise TaskDataError(f"{list_file} lists no images")
    return pairs


def check_task(root: str | Path, task: Task) -> dict[str, int]:
    """Validate every split of a task before any trial starts; -> split sizes."""
    return {split: len(read_list(root, task, split)) for split in SPLITS}


def load_split(root: str | Path, task: Task, split: str, resolution: int,
               train: bool) -> Split:
    """Decode one split at `resolution`: training images at the pre-crop size (when the
    task crops), evaluation images at the resolution."""
    pairs = read_list(root, task, split)
    if train and task.crop:
        aug = Augment("resize", int(round(resolution * 448 / 384)))
    else:
        aug = Augment("resize", resolution)
    rng = np.random.default_rng(0)  # "resize" draws nothing; kept for the signature
    images = np.stack([decode_and_augment(p.read_bytes(), aug, rng) for p, _ in pairs])
    labels = np.asarray([label for _, label in pairs], dtype=np.int64)
    return Split(images, labels)
