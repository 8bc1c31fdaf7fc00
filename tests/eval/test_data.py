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


def _fingerprint(encoded):
    import hashlib

    return sorted((int(label), hashlib.sha1(img).hexdigest())
                  for img, label in zip(encoded.images, encoded.labels, strict=True))


@pytest.mark.slow
@pytest.mark.s3
def test_shards_and_folder_layout_on_s3_give_the_same_data(tmp_path, s3):
    """The same generated task three ways: the folder layout locally, the folder layout on
    S3, and shards written by `jobs/make_shards.py vtab` on S3."""
    from eval.data import read_encoded, write_grating_task
    from jobs.make_shards import main as make_shards
    from pipeline import storage

    task = BY_NAME["eurosat"]
    folder = write_grating_task(tmp_path / "vtab", task, train=12, val=4, test=9,
                                image_size=24)
    storage.upload_dir(tmp_path / "vtab", f"s3://{s3}/folder")
    assert make_shards(["vtab", "--data", str(folder), "--out", f"s3://{s3}/shards/eurosat",
                        "--num-classes", "10"]) == 0
    local, on_s3, shards = str(tmp_path / "vtab"), f"s3://{s3}/folder", f"s3://{s3}/shards"
    sizes = {"train800": 12, "val200": 4, "train800val200": 16, "test": 9}
    for root in (local, on_s3, shards):
        assert check_task(root, task) == sizes, root
    for split in sizes:
        want = read_encoded(local, task, split)
        assert read_encoded(on_s3, task, split).labels.tolist() == want.labels.tolist()
        assert _fingerprint(read_encoded(shards, task, split)) == _fingerprint(want)
    decoded = load_split(shards, task, "train800", 16, train=True)
    assert decoded.images.shape == (12, 19, 19, 3)


@pytest.mark.s3
def test_bad_shards_and_s3_folders(tmp_path, s3):
    from eval.data import read_encoded, write_grating_task
    from jobs.make_shards import main as make_shards
    from pipeline import storage

    task = BY_NAME["kitti"]
    folder = write_grating_task(tmp_path / "vtab", task, train=8, val=2, test=4, image_size=16)
    dst = tmp_path / "shards" / "kitti"
    assert make_shards(["vtab", "--data", str(folder),
                        "--out", str(dst), "--num-classes", "4"]) == 0
    shard = next(dst.glob("test-*.tar"))
    shard.write_bytes(shard.read_bytes()[:700])                 # truncated inside a member
    with pytest.raises(TaskDataError, match=r"kitti: bad data in shard test-000000.tar"):
        read_encoded(tmp_path / "shards", task, "test")
    shard.unlink()
    with pytest.raises(TaskDataError, match=r"shard test-000000.tar of split 'test' is "
                                            r"missing"):
        check_task(tmp_path / "shards", task)
    (folder / "images" / "val200" / "000001.jpg").unlink()
    storage.upload_dir(tmp_path / "vtab", f"s3://{s3}/vtab")
    with pytest.raises(TaskDataError, match=r"val200.txt:2: images/val200/000001.jpg does not "
                                            r"exist; the list file and the images disagree"):
        check_task(f"s3://{s3}/vtab", task)
    with pytest.raises(TaskDataError, match=r"s3://.*/vtab/dtd/train800.txt is missing"):
        check_task(f"s3://{s3}/vtab", BY_NAME["dtd"])
