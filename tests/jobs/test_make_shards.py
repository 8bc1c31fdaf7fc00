"""jobs/make_shards.py as a user meets it: a destination that cannot be written is one line
before any image is read; an empty class folder, files and symlinks at the root of an image
folder are named; skipped files are named by their full path."""

from __future__ import annotations

import os
import time

from jobs.make_shards import main as make_shards
from pipeline.data import shards
from tests.pipeline.data.helpers import image_folder, jpeg_bytes


def test_a_destination_that_is_a_file_fails_before_any_image_is_decoded(tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    # 200,000 synthetic images take minutes to make: a quick answer proves none was made.
    for dst, says in ((taken, "the destination is a file"),
                      (taken / "sub" / "dir", f"cannot create the destination, {taken} is a "
                                              f"file")):
        t0 = time.monotonic()
        rc = make_shards(["synthetic", "--out", str(dst), "--num-samples", "200000"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and time.monotonic() - t0 < 10
        assert err == [f"error: {dst}: {says}; give a folder (created if missing) or "
                       f"s3://bucket/prefix"], err
    src = image_folder(tmp_path / "src", per_class=1)
    assert make_shards(["folder", "--data", str(src), "--out", str(taken)]) == 2
    shards_dir = tmp_path / "shards"
    shards.write_shards(shards.image_folder(src), str(shards_dir), log=lambda m: None)
    assert make_shards(["index", "--data", str(shards_dir), "--out", str(taken)]) == 2
    assert "the destination is a file" in capsys.readouterr().err
    assert taken.read_text() == "not a folder"


def test_empty_class_folders_and_root_entries_are_named_not_classes(tmp_path, capsys):
    src = image_folder(tmp_path / "src", classes=("cat", "dog"), per_class=2)
    (src / "ant").mkdir()                                   # empty: a failed copy?
    (src / "bee").mkdir()
    (src / "bee" / "notes.txt").write_text("no images here")
    (src / "README.txt").write_text("a stray file")
    elsewhere = image_folder(tmp_path / "more", classes=("lynx",), per_class=2)
    (src / "lynx").symlink_to(elsewhere / "lynx")           # a linked class folder
    (src / "gone").symlink_to(tmp_path / "nowhere")         # a broken link
    assert make_shards(["folder", "--data", str(src),
                        "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    manifest = shards.read_manifest(str(tmp_path / "out"))
    assert manifest["classes"] == ["cat", "dog", "lynx"] and manifest["num_classes"] == 3
    assert manifest["splits"]["train"]["num_samples"] == 6
    assert (f"warning: skipping 2 class folder(s) without .jpg/.jpeg/.png images (not "
            f"classes): {src / 'ant'}, {src / 'bee'}") in err
    assert "labels: 3 classes numbered in sorted folder-name order, without the skipped " \
           "folders (0 = 'cat', 2 = 'lynx')" in err
    assert (f"warning: ignoring 2 entries at {src} that are not class folder(s) (README.txt, "
            f"gone -> {tmp_path / 'nowhere'}); 1 broken symlink(s)") in err
    assert f"lynx -> {elsewhere / 'lynx'}" in err


def test_skipped_files_are_named_in_full(tmp_path, capsys):
    src = image_folder(tmp_path / "src", classes=("cat", "dog"), per_class=2)
    (src / "dog" / "broken.jpg").write_bytes(jpeg_bytes(7)[:300])
    assert make_shards(["folder", "--data", str(src),
                        "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert f"skipping {src / 'dog' / 'broken.jpg'}: not a decodable image" in \
        capsys.readouterr().out
    skipped = shards.read_manifest(str(tmp_path / "out"))["splits"]["train"]["skipped"]
    assert [s["path"] for s in skipped] == ["dog/broken.jpg"]     # portable: relative
    assert make_shards(["folder", "--data", str(src),
                        "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: {src / 'dog' / 'broken.jpg'}: not a decodable image")
    assert not os.path.exists(tmp_path / "strict" / "manifest.json")
