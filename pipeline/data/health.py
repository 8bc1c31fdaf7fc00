"""Bad data, counted across the read tasks of a stream, and the point where it stops a run.

A skipped sample is consumed all the same. Each row of a shard stream carries in `lost` one
range of samples its read task skipped (epoch, shard, first, stop; empty when first == stop;
`stream.lost_ranges`), so the worker that trains the row also records them in the data
position: a read with a bad sample completes, and a resumed run never reads it again.
Skipped samples make the stream shorter than its manifest count, so the plan holds as many
epochs as a run needs when only half of what it reads is usable (`epochs_for`); more skipped
than that stops the run with a `DataError` that counts the skips by cause (`DataHealth`,
`skip_summary`). Before the start, one listing of the dataset folder names shards that are
missing or changed (`check_shards`).
"""

from __future__ import annotations

import math

from pipeline import storage
from pipeline.data.reader import MISSING
from pipeline.data.shards import DatasetError

USABLE_MIN = 0.5   # stop when under this share of the samples read so far was usable...
CHECK_AFTER = 10_000   # ...once this many were read (or a whole epoch, if smaller)


class DataHealth:
    """Counts what the read tasks deliver and skip, by cause (a small named actor, created
    by `data_health`); the training loop logs `skipped`, and the read tasks report what they
    delivered and ask whether too little of the data is usable to go on (`report`, before a
    read, at most every `report_interval`)."""

    def __init__(self):
        self.skipped = self.delivered = 0
        self.by_kind: dict[str, dict] = {}   # kind -> {"samples", "first", "shards"}
        self.recent: list[str] = []

    def record(self, shard: str, key: str, reason: str, samples: int, kind: str) -> None:
        self.skipped += samples
        entry = self.by_kind.setdefault(kind, {"samples": 0, "first": f"{shard}/{key}: "
                                               f"{reason}", "shards": []})
        entry["samples"] += samples
        if kind == MISSING and shard not in entry["shards"] and len(entry["shards"]) < 5:
            entry["shards"].append(shard)
        self.recent = (self.recent + [f"{shard}:{key}: {reason}"])[-20:]

    def read(self, samples: int) -> None:
        self.delivered += samples

    def report(self, samples: int, check_after: int) -> str | None:
        """`read(samples)` and `verdict(check_after)` in one call: what a read task sends at
        most every `report_interval` seconds."""
        self.delivered += samples
        return self.verdict(check_after)

    def summary(self) -> dict:
        return {"skipped": self.skipped, "delivered": self.delivered,
                "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
                "recent": list(self.recent)}

    def verdict(self, check_after: int) -> str | None:
        """The error line when under USABLE_MIN of at least `check_after` samples read was
        usable, else None."""
        read = self.skipped + self.delivered
        if read < max(check_after, 1) or self.skipped <= (1 - USABLE_MIN) * read:
            return None
        return (f"{skip_summary(self.summary())}; that is too much of the data to train on: "
                f"fix or remove them (vit-shards writes a dataset without undecodable files), "
                f"or point data.uri at a sound copy")


# What one DataHealth actor is asked to serve: every read task reports at most this often
# in total (one actor serves ~1,500 calls a second, bench/scale.py).
REPORTS_PER_S = 200


def report_interval(slots: int) -> float:
    """Seconds between one read task's reports (`DataHealth.report`), so that `slots` read
    tasks together send at most REPORTS_PER_S: 0.01 s for 2 slots (every read, here), 20 s
    for the 4,096 of a 1,024-GPU run, where one report per read would be ~3,500 calls a
    second at B/16 speed (a stop for bad data then comes up to 20 s later)."""
    return max(slots, 1) / REPORTS_PER_S


def skip_summary(summary: dict) -> str:
    """'412 of 800 samples read were skipped: 380 undecodable images (first: ...), 32
    samples in missing or empty shards (shard-000006.tar)' from `DataHealth.summary()`."""
    read = summary["skipped"] + summary["delivered"]
    parts = []
    for kind, e in sorted(summary["by_kind"].items(), key=lambda kv: -kv[1]["samples"]):
        where = ", ".join(e["shards"]) if e["shards"] else f"first: {e['first']}"
        parts.append(f"{e['samples']} {kind} ({where})")
    return (f"{summary['skipped']} of {read} samples read were skipped"
            + (": " + ", ".join(parts) if parts else ""))


def data_health(name: str):
    """The `DataHealth` actor of this name (created if absent). Owned by the driver that
    creates it first: it lives as long as the run and takes no CPU. Pinned to the driver's
    node: placed anywhere, it could die with a worker node, and every restarted worker
    group's read tasks would fail on the dead actor until the retries ran out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(DataHealth).options(
        name=name, get_if_exists=True, scheduling_strategy=here).remote()


def check_shards(manifest: dict, uri: str, split: str) -> list[str]:
    """Compare the split's shards with one listing of the dataset folder (on S3, one request
    per 1,000 objects; reading the shards to count them is what `vit-shards index` is for):
    -> one warning line per problem found. Shards named by full URI are not checked. Raises
    DatasetError when none of the shards is there (a wrong data.uri)."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError):
        return []       # read_manifest could read the folder; the reads will name what fails
    sizes = {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
    entries = [e for e in manifest["splits"][split]["shards"]
               if "://" not in e["name"] and not e["name"].startswith("/")]
    missing = [e["name"] for e in entries if e["name"] not in sizes]
    if entries and len(missing) == len(entries):
        raise DatasetError(f"{uri}: none of the {len(entries)} shards of split {split!r} that "
                           f"manifest.json lists is there (e.g. {missing[0]}); check data.uri")
    changed = [f"{e['name']} ({sizes[e['name']]} bytes, manifest.json says {e['bytes']})"
               for e in entries if e["name"] in sizes and e.get("bytes") is not None
               and sizes[e["name"]] != e["bytes"]]
    lines = []
    if missing:
        lines.append(f"{len(missing)} of the {len(entries)} shards of split {split!r} are not "
                     f"at {uri} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
                     f"; their samples are skipped and counted")
    if changed:
        lines.append(f"{len(changed)} shard(s) changed after manifest.json was written: "
                     f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}; one "
                     f"with more samples than it says stops the run when it is read (rewrite "
                     f"or re-index the dataset: vit-shards)")
    return lines


def epochs_for(manifest: dict, split: str, samples: int) -> int:
    """Epochs of the plan for a run that trains on `samples` samples: enough when only
    USABLE_MIN of the data is usable (below that, `DataHealth.verdict` stops the run), and
    one spare for what the split across workers drops. Only an upper bound: the read tasks
    read the plan as the run consumes it, so unused epochs cost nothing."""
    per_epoch = manifest["splits"][split]["num_samples"]
    return math.ceil(samples / (max(per_epoch, 1) * USABLE_MIN)) + 1
