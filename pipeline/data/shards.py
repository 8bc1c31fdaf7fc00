"""Writing WebDataset shards and their manifest, to a local folder or any S3 endpoint.

A dataset on storage is

    DST/manifest.json                 written last: its presence means the dataset is complete
    DST/<split>-000000.tar ...        WebDataset shards: <key>.jpg|png, <key>.cls, <key>.json

Tar members are written by `webdataset.TarWriter` with a fixed mtime, so the same input and
options give byte-identical shards. That makes an interrupted write resumable: a shard already
at DST with the same SHA-256 is kept, anything else is (re)written, and every write is atomic
(an S3 PUT / multipart upload appears only when complete; a local shard is renamed into place).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import storage

MANIFEST = "manifest.json"
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}


class DatasetError(ValueError):
    """Bad source data, with one line naming the file and the fix."""


@dataclass(frozen=True)
class SampleRef:
    """A sample not yet loaded: `load()` returns (image bytes, extension)."""

    key: str
    label: int
    load: Callable[[], tuple[bytes, str]]
    extra: dict = field(default_factory=dict)


@dataclass
class Source:
    """What a source yields: per split, an ordered list of sample references."""

    kind: str
    classes: list[str]
    splits: dict[str, list[SampleRef]]
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileLoader:
    """Loads one image file (a picklable callable: the writer's worker processes call it)."""

    path: Path

    def __call__(self) -> tuple[bytes, str]:
        return self.path.read_bytes(), IMAGE_EXTS.get(self.path.suffix.lower(), "jpg")


def image_folder(root: str | Path, split: str = "train",
                 log: Callable[[str], None] = print) -> Source:
    """An image folder with one subfolder per class (`root/<class>/<image>`). Labels number
    the class folders that hold images, in sorted name order. A folder without images is most
    likely a mistake (a failed copy, a typo): it is named in a warning and is not a class, so
    that no label stands for a class with no samples. A symlink to a folder is a class like
    any folder; other entries at the root (files, broken links) are named and ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; pass an image folder with one subfolder "
                           f"per class")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]     # follows symlinks
    if not folders:
        raise DatasetError(f"{root}: no class subfolders; expected root/<class>/<image>.jpg")
    if others := [p for p in entries if not p.is_dir()]:
        broken = [p for p in others if p.is_symlink() and not p.exists()]
        log(f"warning: ignoring {len(others)} entr{'y' if len(others) == 1 else 'ies'} at "
            f"{root} that {'is' if len(others) == 1 else 'are'} not class folder(s) "
            f"({', '.join(_named(p) for p in others[:5])}{', ...' if len(others) > 5 else ''})"
            + (f"; {len(broken)} broken symlink(s)" if broken else ""))
    images = {p.name: sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
              for p in folders}
    if empty := [p for p in folders if not images[p.name]]:
        log(f"warning: skipping {len(empty)} class folder(s) without .jpg/.jpeg/.png images "
            f"(not classes): {', '.join(str(p) for p in empty[:10])}"
            f"{', ...' if len(empty) > 10 else ''}")
    classes = [p.name for p in folders if images[p.name]]
    if not classes:
        raise DatasetError(f"{root}: no .jpg/.jpeg/.png images in the class subfolders")
    if links := [p for p in folders if p.is_symlink() and p.name in classes]:
        log(f"note: class folder(s) reached through symlinks: "
            f"{', '.join(_named(p) for p in links[:5])}{', ...' if len(links) > 5 else ''}")
    if empty:
        log(f"labels: {len(classes)} classes numbered in sorted folder-name order, without the "
            f"skipped folders (0 = {classes[0]!r}, {len(classes) - 1} = {classes[-1]!r}); "
            f"manifest.json lists them")
    refs = []
    for label, name in enumerate(classes):
        for path in images[name]:
            refs.append(SampleRef(key="", label=label, load=FileLoader(path),
                                  extra={"path": f"{name}/{path.name}", "class": name}))
    return Source("image_folder", classes, {split: refs}, {"root": str(root)})


def _named(path: Path) -> str:
    """A root entry by name, with a symlink's target."""
    return f"{path.name} -> {os.readlink(path)}" if path.is_symlink() else path.name


VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


def parse_vtab_list(text: str, list_name: str, num_classes: int | None = None
                    ) -> list[tuple[int, str, int]]:
    """The lines of a VTAB-1k list file ("images/<split>/<i>.jpg <label>"), checked for
    format and label range: [(line number, relative path, label), ...]."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{list_name}:{n}: expected '<image path> <integer label>', "
                               f"got {line!r}")
        label = int(parts[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise DatasetError(f"{list_name}:{n}: label {label} outside [0, {num_classes})")
        out.append((n, parts[0], label))
    return out


def read_vtab_list(list_file: Path, root: Path, num_classes: int | None = None
                   ) -> list[tuple[str, Path, int]]:
    """One local VTAB-1k list file, checked against the images and the class count:
    [(relative path, path, label), ...]."""
    pairs = []
    for n, rel, label in parse_vtab_list(Path(list_file).read_text(), str(list_file),
                                         num_classes):
        path = Path(root) / rel
        if not path.exists():
            raise DatasetError(f"{list_file}:{n}: {rel} does not exist; the list file "
                               f"and the images disagree")
        pairs.append((rel, path, label))
    return pairs


def vtab_folder(root: str | Path, num_classes: int | None = None) -> Source:
    """One VTAB-1k task folder (`<task>/{train800,val200,train800val200,test}.txt` +
    `images/<split>/<i>.jpg`, as NOAH and SSF ship it), keeping its splits."""
    root = Path(root)
    lists = {s: root / f"{s}.txt" for s in VTAB_SPLITS if (root / f"{s}.txt").exists()}
    if not lists:
        raise DatasetError(f"{root}: not a VTAB-1k task folder (no train800.txt, val200.txt, "
                           f"train800val200.txt or test.txt)")
    splits, top = {}, -1
    for split, list_file in lists.items():
        refs = []
        for rel, path, label in read_vtab_list(list_file, root, num_classes):
            top = max(top, label)
            refs.append(SampleRef(key="", label=label, load=FileLoader(path),
                                  extra={"path": rel}))
        splits[split] = refs
    k = num_classes if num_classes is not None else top + 1
    return Source("vtab", [str(i) for i in range(k)], splits, {"root": str(root),
                                                                "task": root.name})


def grating_images(num_samples: int = 1024, num_classes: int = 10, image_size: int = 64,
                   seed: int = 0, val_fraction: float = 0.1) -> Source:
    """Grating JPEGs whose labels are easy to learn: each class has its own hue and the
    orientation and frequency of a sinusoidal grating; phase, brightness and noise vary per
    image. Real JPEGs, so decoding costs what it costs on real data (`vit-shards synthetic`,
    the demo). Not `eval.data.write_grating_task` (class = orientation alone, a harder
    VTAB-layout task) nor the in-memory noise stream of `pipeline.data.synthetic`."""
    rng = random.Random(seed)
    labels = [i % num_classes for i in range(num_samples)]
    rng.shuffle(labels)
    refs = [SampleRef("", lab, GratingImage(seed, i, lab, num_classes, image_size),
                      {"index": i}) for i, lab in enumerate(labels)]
    n_val = int(round(num_samples * val_fraction))
    splits = {"train": refs[n_val:]}
    if n_val:
        splits["val"] = refs[:n_val]
    info = dict(num_samples=num_samples, num_classes=num_classes, image_size=image_size,
                seed=seed)
    return Source("synthetic", [f"class_{i}" for i in range(num_classes)], splits, info)


@dataclass(frozen=True)
class GratingImage:
    """One grating JPEG of `grating_images` (picklable, like `FileLoader`)."""

    seed: int
    index: int
    label: int
    num_classes: int
    image_size: int

    def __call__(self) -> tuple[bytes, str]:
        size, label, num_classes = self.image_size, self.label, self.num_classes
        rng = np.random.default_rng([self.seed, self.index])
        yy, xx = np.mgrid[0:size, 0:size] / size
        angle = np.pi * ((label * 7) % num_classes) / num_classes
        freq = 2 + 3 * (label % 3)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))
                      + rng.uniform(0, 2 * np.pi))
        colour = 0.15 + 0.6 * np.array(_hue_rgb(label / num_classes))
        img = colour + 0.15 * wave[..., None] + rng.uniform(-0.05, 0.05)
        img = img + rng.normal(0, 0.03, img.shape)
        arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"


def _hue_rgb(h: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h, 0.9, 1.0)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardOptions:
    shard_size_mb: float = 256.0   # target uncompressed tar size
    resize_short: int | None = None  # resize the short side to this many pixels (JPEG q95)
    shuffle_seed: int | None = 0     # shuffle each split before sharding (None: keep order)
    jpeg_quality: int = 95


def _resize_short(data: bytes, ext: str, short: int, quality: int) -> tuple[bytes, str]:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = short / min(w, h)
        if scale < 1:  # never upsample: it only makes the shard bigger
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(ref: SampleRef, num_classes: int, resize_short: int | None, jpeg_quality: int
            ) -> tuple[bytes, str] | str:
    """Load one sample and prove it is usable: the label in range and the image decoded in
    full (a truncated or corrupt file fails here, not in a training job weeks later).
    -> (bytes, extension), or the reason it is not usable."""
    if not 0 <= ref.label < num_classes:
        return f"label {ref.label} outside [0, {num_classes})"
    try:
        data, ext = ref.load()
    except OSError as err:
        return f"unreadable ({type(err).__name__}: {str(err)[:80]})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as err:  # noqa: BLE001 - whatever PIL raises, the file is not an image
        return f"not a decodable image ({type(err).__name__}: {str(err)[:80]})"
    if resize_short:
        data, ext = _resize_short(data, ext, resize_short, jpeg_quality)
    return data, ext


def _prepare_chunk(args) -> list:
    refs, num_classes, resize_short, quality = args
    return [prepare(r, num_classes, resize_short, quality) for r in refs]


def _prepared(refs: list[SampleRef], num_classes: int, options: ShardOptions, workers: int):
    """`prepare` over `refs`, in order; in `workers` processes when there is enough work.
    Decoding every image (and resizing) is the expensive part of writing shards."""
    args = (num_classes, options.resize_short, options.jpeg_quality)
    if workers <= 1 or len(refs) < 256:
        for ref in refs:
            yield prepare(ref, *args)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunk = 32
    chunks = [(refs[i:i + chunk], *args) for i in range(0, len(refs), chunk)]
    # spawn: the caller may have threads (an S3 client, Ray), which fork does not survive.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_ctrl_c)
    try:
        for results in pool.map(_prepare_chunk, chunks):
            yield from results
    finally:
        # Stopped early (Ctrl-C, an error): drop the chunks not started instead of decoding
        # the rest of the dataset first.
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_ctrl_c() -> None:
    """In decoding processes: Ctrl-C reaches the whole process group; the parent stops them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_destination(dst: str) -> None:
    """Fail before any image is decoded: a local DST that is a file, lies under a file or
    cannot be written, or an S3 bucket that does not exist."""
    if storage.is_s3(dst):
        storage.check_bucket(dst)
        return
    if why := storage.unwritable(dst):
        raise DatasetError(why)


def source_path(ref: SampleRef) -> str:
    """The sample's file in full (what a user finds with `ls`), else its name in the source."""
    if isinstance(ref.load, FileLoader):
        return str(ref.load.path.absolute())
    return ref.extra.get("path") or ref.key


def write_shards(source: Source, dst: str, options: ShardOptions = ShardOptions(),
                 log: Callable[[str], None] = print, workers: int | None = None,
                 strict: bool = False) -> dict:
    """Write every split of `source` as shards under `dst`, then the manifest; returns it.

    Every image is decoded while writing; a file that is not a decodable image, or whose label
    is out of range, is skipped, logged with its path and listed in the manifest
    (`num_skipped`, `skipped`), and with `strict` it is an error naming the file. The
    manifest's counts are the samples written. `workers` processes decode in parallel
    (default: every core). Re-running with the same source and options resumes: identical
    shards already at `dst` are kept, missing or different ones are written.
    """
    import sys

    from tqdm import tqdm

    dst = str(dst).rstrip("/")
    check_destination(dst)
    workers = workers or os.cpu_count() or 1
    target_bytes = int(options.shard_size_mb * 1e6)
    num_classes = len(source.classes)
    manifest = {"format": "webdataset", "version": 1, "created_by": "jobs/make_shards.py",
                "source": {"kind": source.kind, **source.info},
                "options": {"shard_size_mb": options.shard_size_mb,
                            "resize_short": options.resize_short,
                            "shuffle_seed": options.shuffle_seed},
                "classes": source.classes, "num_classes": num_classes, "splits": {}}
    kept = written = 0
    start = time.monotonic()
    total = 0
    for split, refs in source.splits.items():
        refs = list(refs)
        if options.shuffle_seed is not None:
            random.Random(f"{options.shuffle_seed}-{split}").shuffle(refs)
        skipped: list[dict] = []
        bar = tqdm(total=len(refs), desc=f"{split} -> {dst}", unit="img", file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0, dynamic_ncols=True)
        with tempfile.TemporaryDirectory() as tmp, contextlib.closing(bar):
            out = _SplitWriter(split, dst, Path(tmp), target_bytes)
            for i, (ref, result) in enumerate(zip(refs, _prepared(refs, num_classes, options,
                                                                    workers), strict=True)):
                bar.update(1)
                if isinstance(result, str):
                    where = source_path(ref) or f"{split}[{i}]"
                    if strict:
                        bar.close()
                        raise DatasetError(f"{where}: {result}; remove or fix the file (or "
                                           f"write without --strict to skip it)")
                    with tqdm.external_write_mode(file=sys.stderr):  # not through the bar
                        log(f"skipping {where}: {result}")
                    skipped.append({"path": ref.extra.get("path") or where,
                                    "reason": result})
                    continue
                data, ext = result
                meta = json.dumps({**ref.extra, "label": ref.label}, sort_keys=True).encode()
                out.add({"__key__": f"{split}_{i:08d}", ext: data, "cls": ref.label,
                         "json": meta}, len(data) + len(meta))
                bar.set_postfix(shards=len(out.shards), refresh=False)
            out.finish()
        shards = out.shards
        written, kept = written + out.written, kept + out.kept
        n = sum(e["samples"] for e in shards)
        total += n
        manifest["splits"][split] = {"num_samples": n, "num_skipped": len(skipped),
                                     "skipped": skipped[:1000], "shards": shards}
    # The manifest goes last: a reader never sees a half-written dataset.
    storage.write_bytes(storage.join(dst, MANIFEST),
                        json.dumps(manifest, indent=1, sort_keys=True).encode())
    elapsed = time.monotonic() - start
    skipped_all = sum(v["num_skipped"] for v in manifest["splits"].values())
    log(f"wrote {written} shard(s), kept {kept} identical shard(s) already at {dst}: {total} "
        f"images in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f} images/s, {workers} "
        f"process(es)); skipped {skipped_all}; manifest: {storage.join(dst, MANIFEST)}")
    return manifest


class _SplitWriter:
    """Packs the samples of one split into shards of about `target_bytes`, each published
    (uploaded, or kept when identical) as soon as it is full."""

    def __init__(self, split: str, dst: str, tmp: Path, target_bytes: int):
        self.split, self.dst, self.tmp, self.target = split, dst, tmp, target_bytes
        self.shards: list[dict] = []
        self.written = self.kept = 0
        self.writer = None

    def add(self, sample: dict, nbytes: int) -> None:
        if self.writer is None:
            self.name = f"{self.split}-{len(self.shards):06d}.tar"
            self.local = self.tmp / self.name
            self.writer = _open_tar(self.local)
            self.count = self.size = 0
        self.writer.write(sample)
        self.count += 1
        self.size += nbytes + 3 * 1024  # tar headers and padding
        if self.size >= self.target:
            self.finish()

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        entry, fresh = _publish(self.local, self.dst, self.name, self.count)
        self.shards.append(entry)
        self.written, self.kept = self.written + fresh, self.kept + (not fresh)
        self.local.unlink()
        self.writer = None


def _open_tar(path: Path):
    import webdataset as wds

    # Fixed mtime and owner: the same samples give byte-identical shards (resumable writes).
    # An integer mtime: a float one makes tarfile add a PAX header to every member, which
    # doubles the header parsing of every reader (~15% of the read task's time here).
    return wds.TarWriter(str(path), mtime=0, user="vit", group="vit")


def _publish(local: Path, dst: str, name: str, count: int) -> tuple[dict, bool]:
    """Put one finished shard at dst unless an identical one is there; -> (entry, written)."""
    sha = _sha256(local)
    size = local.stat().st_size
    entry = {"name": name, "samples": count, "bytes": size, "sha256": sha}
    uri = storage.join(dst, name)
    if storage.is_s3(dst):
        meta = storage.object_metadata(uri)
        if meta is not None and meta.get("sha256") == sha:
            return entry, False
        storage.upload_file(local, uri, metadata={"sha256": sha})
        return entry, True
    target = Path(uri)
    if target.exists() and target.stat().st_size == size and _sha256(target) == sha:
        return entry, False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.partial")
    try:
        with open(local, "rb") as src, open(partial, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(partial, target)
    except BaseException:                 # interrupted or failed: no half-written file left
        partial.unlink(missing_ok=True)
        raise
    return entry, True


def read_manifest(uri: str) -> dict:
    """The manifest of a dataset written by `write_shards` (or by `index.index_shards`), with
    one clear error if absent."""
    if "{" in uri or uri.endswith(".tar"):
        raise DatasetError(f"{uri} names shards, not a dataset folder: index them once with "
                           f"`python jobs/make_shards.py index '{uri}'` and pass the folder "
                           f"that holds manifest.json")
    if not storage.is_s3(uri) and not Path(uri).is_dir():
        raise DatasetError(f"{uri}: no such folder; give the folder (or s3:// prefix) that "
                           f"holds the dataset's {MANIFEST} (vit-shards writes one)")
    path = storage.join(uri, MANIFEST)
    try:
        doc = json.loads(storage.read_bytes(path))
    except storage.NotFound:
        raise DatasetError(f"{uri}: no {MANIFEST}; the path is wrong, the dataset is "
                           f"incomplete, or its shards were written elsewhere (index them "
                           f"with `python jobs/make_shards.py index {uri}`)") from None
    except json.JSONDecodeError:
        raise DatasetError(f"{path}: not valid JSON; rewrite the dataset") from None
    if doc.get("format") != "webdataset":
        raise DatasetError(f"{path}: not a webdataset manifest")
    return doc
