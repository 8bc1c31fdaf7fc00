"""VTAB-1k layout reading on tiny generated tasks (real JPEG files, the list-file format)."""

from __future__ import annotations

import pytest

from eval.data import TaskDataError, check_task, load_split
from eval.tasks import BY_NAME
from tests.pipeline.data.helpers import jpeg_bytes

SIZES = {"train800": 6, "val200": 3, "train800val200": 9, "test": 4}


def make_task(root, name, num_classes, sizes=SIZES):
    folder = root / name
    for split, n in sizes.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            (folder / "images" / split / f"{i:06d}.jpg").write_bytes(
                jpeg_bytes(i, (50 + i, 40)))
            lines.append(f"images/{split}/{i:06d}.jpg {i % num_classes}")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_load_splits_at_a_resolution(tmp_path):
    make_task(tmp_path, "dtd", 47)
    dtd = BY_NAME["dtd"]
    assert check_task(tmp_path, dtd) == SIZES
    train = load_split(tmp_path, dtd, "train800", 32, train=True)
    assert train.images.shape == (6, 37, 37, 3)          # 32 * 448 / 384: room to crop
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    test = load_split(tmp_path, dtd, "test", 32, train=False)
    assert test.images.shape == (4, 32, 32, 3)
    make_task(tmp_path, "kitti", 4)                          # no random crop for KITTI
    assert load_split(tmp_path, BY_NAME["kitti"], "train800", 32, True).images.shape[1] == 32


def test_bad_task_data(tmp_path):
    folder = make_task(tmp_path, "svhn", 10)
    (folder / "images" / "test" / "000002.jpg").unlink()
    with pytest.raises(TaskDataError, match="test.txt:3: images/test/000002.jpg does not "
                                            "exist; the list file and the images disagree"):
        check_task(tmp_path, BY_NAME["svhn"])
    (folder / "val200.txt").write_text("images/val200/000000.jpg 10\n")
    with pytest.raises(TaskDataError, match=r"val200.txt:1: label 10 outside \[0, 10\)"):
        check_task(tmp_path, BY_NAME["svhn"])
    with pytest.raises(TaskDataError, match=r"eurosat: .*eurosat/train800.txt is missing"):
        check_task(tmp_path, BY_NAME["eurosat"])
