"""Reading one WebDataset shard, sample by sample, with a policy for bad data. No Ray.

A long run must neither die on one bad image nor train on it unseen. Each problem is either
skipped and reported (shard, key, reason, how many samples it cost) or, in strict mode,
raised as `DataError` naming the shard and the key:

- a corrupt image (does not decode)         - a sample with no label
- a label that is not an integer or is      - a truncated tar (the rest of the shard is lost;
  outside [0, num_classes)                    the manifest says how many samples that was)
- a sample with no image                    - an empty shard, or one that vanished
- more labels than the set allows (`max_labels` in the manifest; 1 unless multi-label)

A shard that holds more samples than the manifest says is not bad data but a stale manifest:
the stream cannot place the extra samples (a data position counts a shard's samples from the
manifest), so it is always an error (`ManifestMismatch`), naming the shard and both counts.
Fewer samples than the manifest says are skipped and counted like a truncated tar.

Labels, as public WebDataset collections write them: `.cls` holds an integer, or several
(a JSON list `[3, 17]`, or separated by commas or spaces) for multi-label sets such as JFT;
without `.cls`, a `.json` member's `labels` (a list) or `label` / `cls` (an integer), as in
the ImageNet WebDataset copies on the Hugging Face Hub.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


class DataError(RuntimeError):
    """Bad data that stops the run (strict mode, a stale manifest, too much bad data): one
    line naming the shard and the key, or what was skipped. Deterministic: a retry would meet
    it again. Raised inside a Ray Data task, it reaches the train worker as a
    `RayTaskError(DataError)`, which is still an instance of it (`first_line` reads it)."""

    def first_line(self) -> str:
        # Ray's wrapper holds the original in `cause`; its own str() is a traceback.
        err = getattr(self, "cause", None) or self
        text = str(err.args[0] if err.args else err).strip()
        return text.splitlines()[0] if text else type(err).__name__


class ManifestMismatch(DataError):
    """A shard holds more samples than its manifest entry says."""


# What a problem cost, as the skip summary counts it ("380 undecodable images, ...").
UNDECODABLE = "undecodable images"
NO_IMAGE = "samples without an image"
BAD_LABEL = "samples with a missing or bad label"
TRUNCATED = "samples in truncated or unreadable tars"
SHORT = "samples a manifest lists beyond a shard's end"
MISSING = "samples in missing or empty shards"


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str
    reason: str
    samples: int = 1  # samples lost to it
    kind: str = BAD_LABEL
    first: int = -1   # the lost samples are indices [first, first + samples) of the shard


@dataclass(frozen=True)
class RawSample:
    key: str
    index: int       # position in the shard
    image: bytes
    label: int | tuple[int, ...]   # a tuple for a multi-label sample


def parse_label(members: dict[str, bytes]) -> int | tuple[int, ...]:
    """The label(s) of a sample's members (see the module docstring). Raises ValueError
    saying what is wrong; KeyError when the sample has no label at all."""
    if "cls" in members:
        text = members["cls"].decode("utf-8", "replace").strip()
        if text.startswith("["):
            values = json.loads(text)
        elif "," in text or " " in text:
            values = [v for v in text.replace(",", " ").split()]
        else:
            return _integer(text)
        return tuple(_integer(v) for v in values)
    if "json" in members:
        doc = json.loads(members["json"])
        if isinstance(doc, dict):
            if isinstance(doc.get("labels"), list):
                return tuple(_integer(v) for v in doc["labels"])
            for field in ("label", "cls"):
                if field in doc:
                    return _integer(doc[field])
    raise KeyError("no label (.cls member, or labels/label in .json)")


def _integer(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"label {str(value)[:20]!r} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"label {str(value)[:20]!r} is not an integer") from None


class BadDataPolicy:
    """Skip-and-report, or raise in strict mode. `report` receives every Problem."""

    def __init__(self, strict: bool = False, report: Callable[[Problem], None] | None = None):
        self.strict = strict
        self.report = report

    def __call__(self, problem: Problem) -> None:
        where = f"shard {problem.shard}, key {problem.key}"
        if self.strict:
            raise DataError(f"bad data in {where}: {problem.reason}; fix or remove it, or run "
                            f"without strict data checks to skip and count such samples")
        log.warning("skipping %d sample(s): %s: %s", problem.samples, where, problem.reason)
        if self.report is not None:
            self.report(problem)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first '.' of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_samples(stream, shard: str, policy: BadDataPolicy, num_classes: int | None = None,
                 expected: int | None = None, max_labels: int = 1) -> Iterator[RawSample]:
    """Samples of one tar stream (read sequentially, never whole into memory).

    `expected` (from the manifest) turns a truncation into a count of lost samples, and a
    sample past it raises `ManifestMismatch` (after counting the rest of the tar, to name
    both counts). With `max_labels` 1, a sample's label is an int; above, a tuple of up to
    that many. Returns (as StopIteration's value) how many samples the tar holds, bad ones
    included.
    """
    index, good, key, members = 0, 0, None, {}

    def finish(key: str, members: dict) -> RawSample | None:
        nonlocal index
        i = index
        index += 1
        if expected is not None and i >= expected:
            raise _PastManifest
        image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
        if image is None:
            policy(Problem(shard, key, f"no image member (has {sorted(members)})",
                           kind=NO_IMAGE, first=i))
            return None
        try:
            label = parse_label(members)
        except KeyError as err:
            policy(Problem(shard, key, err.args[0], first=i))
            return None
        except ValueError as err:   # json.JSONDecodeError included
            policy(Problem(shard, key, str(err)[:80], first=i))
            return None
        labels = label if isinstance(label, tuple) else (label,)
        if not labels:
            policy(Problem(shard, key, "no label (an empty label list)", first=i))
            return None
        if len(labels) > max_labels:
            policy(Problem(shard, key, f"{len(labels)} labels, the set allows {max_labels} "
                                       f"(index it with `jobs/make_shards.py index` to record "
                                       f"a multi-label set)", first=i))
            return None
        bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
        if bad:
            policy(Problem(shard, key, f"label {bad[0]} outside [0, {num_classes})", first=i))
            return None
        label = labels[0] if max_labels == 1 else labels
        return RawSample(key, i, image, label)

    tar = None
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isfile():
                continue
            k, suffix = _split_name(info.name)
            if k != key and key is not None:
                if (s := finish(key, members)) is not None:
                    good += 1
                    yield s
                members = {}
            key = k
            data = tar.extractfile(info).read()
            members[suffix] = data
        if key is not None:
            if (s := finish(key, members)) is not None:
                good += 1
                yield s
    except _PastManifest:
        raise ManifestMismatch(_past_manifest(shard, expected, tar)) from None
    except (tarfile.TarError, EOFError, OSError) as err:
        lost = max(expected - index, 1) if expected is not None else 1
        policy(Problem(shard, key or "-", f"truncated or unreadable tar after {index} samples "
                                          f"({type(err).__name__}: {str(err)[:80]})", lost,
                       TRUNCATED, index))
        return index
    finally:
        if tar is not None:
            tar.close()
    if index == 0:
        policy(Problem(shard, "-", "empty shard (no samples)", expected or 0, MISSING, 0))
    elif expected is not None and index < expected:
        policy(Problem(shard, "-", f"shard has {index} samples, the manifest says {expected}",
                       expected - index, SHORT, index))
    return index


class _PastManifest(Exception):
    pass


def _past_manifest(shard: str, expected: int, tar) -> str:
    """The error line for a shard with more samples than the manifest says, with the real
    count: its keys, from the start (a stream-mode TarFile iterates again from its first
    member, which it keeps, and reads on to the end)."""
    count, last = 0, None
    try:
        for info in tar:
            k, _ = _split_name(info.name)
            if info.isfile() and k != last:
                count, last = count + 1, k
        actual = str(count)
    except (tarfile.TarError, EOFError, OSError):
        actual = f"at least {count}"
    return (f"manifest.json says {shard} has {expected} samples but it has {actual}: the "
            f"shard changed after the manifest was written; rewrite the dataset (vit-shards "
            f"folder/vtab/synthetic resumes, keeping identical shards) or re-index it "
            f"(vit-shards index)")
