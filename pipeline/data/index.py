"""Index WebDataset shards written by others: the manifest the training stream needs, without
rewriting a byte of the shards.

Public WebDataset collections (ImageNet copies on the Hugging Face Hub, LAION-style sets,
JFT-like internal sets) come as numbered tars named by a brace pattern,
`s3://bucket/imagenet-train-{000000..001281}.tar`, with `jpg` + `cls` (or `json`) members
and no manifest. The stream needs each shard's sample count (an epoch visits every sample
once, and a resumed run knows exactly which ones it has seen), so the shards are read once,
in parallel, and counted:

    python jobs/make_shards.py index "s3://b/imagenet-train-{000000..001281}.tar" --split train
    python jobs/make_shards.py index "s3://b/imagenet-val-{000000..000049}.tar" --split val

Each command adds (or replaces) its split in `manifest.json` of the destination (by default
the folder holding the shards; a DST folder after the pattern when that is not writable, the
shards then named by full URI). Counting streams each tar once (a tar has no index) and
does not decode images: bad samples are found, skipped and counted by the training stream
as usual. Labels as `reader.parse_label` reads them; a set where some sample has several
is recorded as multi-label (`max_labels`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.data.reader import BadDataPolicy, Problem, iter_samples
from pipeline.data.shards import MANIFEST, DatasetError, check_destination

log = logging.getLogger(__name__)


def expand(spec: str) -> list[str]:
    """The shard URIs a spec names: a brace pattern (`train-{000000..001281}.tar`, several
    braces and `{a,b}` lists too), one tar, or a folder / S3 prefix (every .tar in it)."""
    import braceexpand  # webdataset's own dependency, the library that defines its patterns

    if "{" in spec:
        return list(braceexpand.braceexpand(spec))
    if spec.endswith(".tar"):
        return [spec]
    if storage.is_s3(spec):
        names = sorted(k for k in storage.list_objects(spec) if k.endswith(".tar"))
        return [storage.join(spec, k) for k in names]
    folder = Path(spec)
    if not folder.is_dir():
        raise DatasetError(f"{spec}: no such folder; give a folder or prefix of .tar shards, "
                           f"one .tar, or a brace pattern like 'train-{{000000..000099}}.tar'")
    return [str(p) for p in sorted(folder.rglob("*.tar"))]


@dataclass(frozen=True)
class ShardCount:
    uri: str
    samples: int        # every sample the tar holds, as the reader numbers them
    bytes: int
    max_label: int      # -1: no good sample
    max_labels: int     # most labels on one sample
    problems: int       # samples with no image, no label, a bad label, or lost to truncation


def count(uri: str) -> ShardCount:
    """One pass over a shard (a buffered stream: one GET per 32 MiB on S3)."""
    fs, path = storage.filesystem(uri)
    problems: list[Problem] = []
    policy = BadDataPolicy(strict=False, report=problems.append)
    max_label, max_labels, size = -1, 0, 0
    try:
        size = fs.get_file_info(path).size or 0
        stream = storage.open_read(fs, path)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"{uri}: cannot read it ({str(err)[:120]}); check the pattern and "
                           f"the credentials") from None
    with stream:
        samples = iter_samples(stream, uri, policy, num_classes=None, max_labels=1 << 20)
        while True:
            try:
                sample = next(samples)
            except StopIteration as stop:
                total = stop.value or 0
                break
            labels = sample.label if isinstance(sample.label, tuple) else (sample.label,)
            max_label = max(max_label, *labels)
            max_labels = max(max_labels, len(labels))
    return ShardCount(uri, total, size, max_label, max_labels,
                      sum(p.samples for p in problems))


def index_shards(spec: str, split: str = "train", out: str | None = None,
                 num_classes: int | None = None, workers: int = 16,
                 log_line: Callable[[str], None] = print) -> dict:
    """Count the shards `spec` names and write (or update) `<out>/manifest.json` with their
    split. -> the manifest. `out` defaults to the folder that holds the shards."""
    from tqdm import tqdm

    uris = expand(spec)
    if not uris:
        raise DatasetError(f"{spec}: names no .tar shards")
    out = (out or _common_folder(uris)).rstrip("/")
    check_destination(out)              # before reading every shard
    with ThreadPoolExecutor(max(1, workers)) as pool:
        counts = list(tqdm(pool.map(count, uris), total=len(uris), unit="shard",
                           desc=f"index {split}", disable=None))
    empty = [c.uri for c in counts if c.samples == 0]
    if len(empty) == len(counts):
        raise DatasetError(f"{spec}: no samples in any of the {len(counts)} shards")

    manifest = _existing(out)
    splits = dict(manifest.get("splits", {}))
    splits[split] = {
        "num_samples": sum(c.samples for c in counts),
        "num_skipped": sum(c.problems for c in counts),
        "pattern": spec,
        "shards": [{"name": _name(c.uri, out), "samples": c.samples, "bytes": c.bytes}
                   for c in counts],
    }
    found = max(c.max_label for c in counts) + 1
    classes = max(num_classes or 0, found, int(manifest.get("num_classes", 0)))
    if num_classes is not None and found > num_classes:
        log.warning("labels up to %d in %s, but --num-classes %d: such samples are skipped",
                    found - 1, spec, num_classes)
        classes = num_classes
    max_labels = max(max(c.max_labels for c in counts), int(manifest.get("max_labels", 1)))
    manifest = {"format": "webdataset", "num_classes": classes,
                "classes": manifest.get("classes") or [str(i) for i in range(classes)],
                **({"max_labels": max_labels} if max_labels > 1 else {}),
                "indexed": True, "splits": splits}
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    info = splits[split]
    log_line(f"  {split:<16} {info['num_samples']:>9} samples in {len(counts)} shards "
             f"({sum(c.bytes for c in counts) / 1e9:.2f} GB), {info['num_skipped']} without a "
             f"usable label or image; {classes} classes"
             + (f", up to {max_labels} labels per sample" if max_labels > 1 else ""))
    if empty:
        log_line(f"  {len(empty)} empty shard(s), e.g. {empty[0]}")
    log_line(f"  manifest: {storage.join(out, MANIFEST)}")
    return manifest


def _common_folder(uris: list[str]) -> str:
    parents = {u.rsplit("/", 1)[0] for u in uris}
    return os.path.commonpath(list(parents)) if not storage.is_s3(uris[0]) else (
        "s3://" + os.path.commonpath([p[len("s3://"):] for p in parents]))


def _name(uri: str, out: str) -> str:
    """Relative to the manifest's folder where the shard lies under it, else its full URI."""
    if uri.startswith(out + "/"):
        return uri[len(out) + 1:]
    return uri if storage.is_s3(uri) else str(Path(uri).resolve())


def _existing(out: str) -> dict:
    try:
        doc = json.loads(storage.read_bytes(storage.join(out, MANIFEST)))
    except storage.StorageError:
        return {}
    except json.JSONDecodeError:
        raise DatasetError(f"{storage.join(out, MANIFEST)}: not valid JSON; remove it and "
                           f"index again") from None
    return doc if doc.get("format") == "webdataset" else {}
