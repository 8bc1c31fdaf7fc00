"""Reading one WebDataset shard, sample by sample, with a policy for bad data. No Ray.

A long run must neither die on one bad image nor train on it unseen. Each problem is either
skipped and reported (shard, key, reason, how many samples it cost) or, in strict mode,
raised as `DataError` naming the shard and the key:

- a corrupt image (does not decode)         - a sample with no label (`.cls`)
- a label that is not an integer or is      - a truncated tar (the rest of the shard is lost;
  outside [0, num_classes)                    the manifest says how many samples that was)
- a sample with no image                    - an empty shard, or one that vanished
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


class DataError(RuntimeError):
    """Bad data in strict mode: names the shard and the key."""


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str
    reason: str
    samples: int = 1  # samples lost to it


@dataclass(frozen=True)
class RawSample:
    key: str
    index: int       # position in the shard
    image: bytes
    label: int


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
                 expected: int | None = None) -> Iterator[RawSample]:
    """Samples of one tar stream (read sequentially, never whole into memory).

    `expected` (from the manifest) turns a truncation into a count of lost samples.
    """
    index, good, key, members = 0, 0, None, {}

    def finish(key: str, members: dict) -> RawSample | None:
        nonlocal index
        i = index
        index += 1
        image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
        if image is None:
            policy(Problem(shard, key, f"no image member (has {sorted(members)})"))
            return None
        if "cls" not in members:
            policy(Problem(shard, key, "no label (.cls member)"))
            return None
        try:
            label = int(members["cls"].strip())
        except ValueError:
            policy(Problem(shard, key, f"label {members['cls'][:20]!r} is not an integer"))
            return None
        if label < 0 or (num_classes is not None and label >= num_classes):
            policy(Problem(shard, key, f"label {label} outside [0, {num_classes})"))
            return None
        return RawSample(key, i, image, label)

    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
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
    except (tarfile.TarError, EOFError, OSError) as err:
        lost = max(expected - index, 1) if expected is not None else 1
        policy(Problem(shard, key or "-", f"truncated or unreadable tar after {index} samples "
                                          f"({type(err).__name__}: {str(err)[:80]})", lost))
        return
    if index == 0:
        policy(Problem(shard, "-", "empty shard (no samples)", expected or 0))
    elif expected is not None and index < expected:
        policy(Problem(shard, "-", f"shard has {index} samples, the manifest says {expected}",
                       expected - index))
