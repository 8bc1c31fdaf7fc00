"""Ray Data sources that feed Ray Train: WebDataset shards on storage, and a synthetic twin.

The training stream is a plan of (epoch, shard) reads: every epoch visits every shard of the
split once, in an order drawn from (seed, epoch), and the epochs are concatenated. Training is
counted in steps, so the worker iterates the stream once; the `epoch` column says where it is.
Same seed -> same plan; a resumed run starts the plan at its saved position instead of
re-reading from the top of an epoch.

Ray Data reads the shards in parallel tasks (one per shard; a generator that streams the tar,
decodes, augments and yields blocks of `block_rows` rows), and Ray Train's `DataConfig` splits
the stream across workers, so the workers see disjoint parts of each epoch. On the worker,
`iter_torch_batches` prefetches and mixes samples in a local shuffle buffer (`batches`).

Rows: `image` uint8 (S, S, 3), `label` int64, `epoch`, `shard`, `index` int32 (where the
sample came from: with the manifest it identifies the sample).

We read tars with our own reader instead of `ray.data.read_webdataset` so that one corrupt
image or a truncated tar is skipped and counted (or raised, naming shard and key) instead of
failing the read task (../shared/docs/ray.md §1.6).
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.data.reader import BadDataPolicy, Problem, iter_samples
from pipeline.data.shards import DatasetError, read_manifest
from pipeline.data.transforms import Augment, decode_and_augment

log = logging.getLogger(__name__)

COLUMNS = ("image", "label", "epoch", "shard", "index")


@dataclass(frozen=True)
class InputConfig:
    """Where the training images come from and how they are prepared."""

    uri: str = ""                   # dataset root (with manifest.json), local or s3://
    split: str = "train"
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    strict: bool = False            # raise on bad data instead of skipping and counting
    shuffle_buffer: int = 2048      # samples mixed locally on each worker (0: off)
    prefetch_batches: int = 2
    block_rows: int = 64            # rows per block a read task yields
    num_cpus_per_read: float = 1.0

    def __post_init__(self):
        if self.block_rows <= 0:
            raise ValueError(f"InputConfig.block_rows must be positive, got {self.block_rows}")
        if self.shuffle_buffer < 0:
            raise ValueError("InputConfig.shuffle_buffer must be >= 0")


# ---------------------------------------------------------------------------------------------
# Bad-data accounting across read tasks
# ---------------------------------------------------------------------------------------------
def data_health(name: str):
    """A small named actor that counts skipped samples for the training loop to log.
    Read tasks report to it; `summary()` returns {"skipped": n, "by_reason": {...},
    "recent": [...]}."""
    import ray

    @ray.remote(num_cpus=0)
    class DataHealth:
        def __init__(self):
            self.skipped, self.by_reason, self.recent = 0, {}, []

        def record(self, shard: str, key: str, reason: str, samples: int) -> None:
            self.skipped += samples
            kind = reason.split(" (")[0].split(":")[0]
            self.by_reason[kind] = self.by_reason.get(kind, 0) + samples
            self.recent = (self.recent + [f"{shard}:{key}: {reason}"])[-20:]

        def summary(self) -> dict:
            return {"skipped": self.skipped, "by_reason": dict(self.by_reason),
                    "recent": list(self.recent)}

    # Owned by the driver: it lives as long as the run and takes no CPU.
    return DataHealth.options(name=name, get_if_exists=True).remote()


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of one epoch: a permutation drawn from (seed, epoch)."""
    order = list(range(num_shards))
    random.Random(f"shards-{seed}-{epoch}").shuffle(order)
    return order


def plan(manifest: dict, split: str, seed: int, num_epochs: int,
         start: tuple[int, int] = (0, 0)) -> list[dict]:
    """Reads for epochs [start_epoch, num_epochs), beginning at position `start[1]` of the
    first one: [{"epoch", "position", "shard", "name", "samples"}, ...]."""
    if split not in manifest["splits"]:
        raise DatasetError(f"no split {split!r} in the dataset; it has "
                           f"{sorted(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise DatasetError(f"split {split!r} has no shards")
    items = []
    for epoch in range(start[0], num_epochs):
        for pos, idx in enumerate(shard_order(len(shards), seed, epoch)):
            if epoch == start[0] and pos < start[1]:
                continue
            items.append({"epoch": epoch, "position": pos, "shard": idx,
                          "name": shards[idx]["name"], "samples": shards[idx]["samples"]})
    return items


def position_after(manifest: dict, split: str, seed: int, samples: int) -> tuple[int, int]:
    """(epoch, position in that epoch's shard order) at which a run that has consumed
    `samples` samples resumes: the shard that was being read (shard granularity)."""
    info = manifest["splits"][split]
    per_epoch = max(info["num_samples"], 1)
    epoch, rem = divmod(samples, per_epoch)
    counts = [s["samples"] for s in info["shards"]]
    seen = 0
    for pos, idx in enumerate(shard_order(len(counts), seed, epoch)):
        if seen + counts[idx] > rem:
            return epoch, pos
        seen += counts[idx]
    return epoch + 1, 0


def epochs_for(manifest: dict, split: str, samples: int) -> int:
    """Epochs needed to supply `samples` samples (one spare for what a split may drop)."""
    per_epoch = manifest["splits"][split]["num_samples"]
    return math.ceil(samples / max(per_epoch, 1)) + 1


# ---------------------------------------------------------------------------------------------
# Reading (runs inside Ray Data tasks)
# ---------------------------------------------------------------------------------------------
class ShardReader:
    """Ray Data UDF: a batch of plan items -> blocks of decoded, augmented rows."""

    def __init__(self, fs, root: str, cfg: InputConfig, num_classes: int, health=None):
        self.fs, self.root, self.cfg = fs, root.rstrip("/"), cfg
        self.num_classes, self.health = num_classes, health

    def _report(self, problem: Problem) -> None:
        if self.health is not None:  # fire and forget: reporting never slows the read
            self.health.record.remote(problem.shard, problem.key, problem.reason,
                                      problem.samples)

    def __call__(self, batch: dict) -> Iterator[dict]:
        cfg = self.cfg
        policy = BadDataPolicy(cfg.strict, self._report)
        rows = _empty_rows()
        for epoch, shard, name, expected in zip(batch["epoch"], batch["shard"], batch["name"],
                                                batch["samples"], strict=True):
            for sample in self._samples(name, policy, int(expected)):
                rng = np.random.default_rng([cfg.seed, int(epoch), int(shard), sample.index])
                try:
                    image = decode_and_augment(sample.image, cfg.augment, rng)
                except Exception as err:  # noqa: BLE001 - any decoder failure is bad data
                    policy(Problem(name, sample.key, f"corrupt image ({type(err).__name__}: "
                                                     f"{str(err)[:60]})"))
                    continue
                rows["image"].append(image)
                rows["label"].append(sample.label)
                rows["epoch"].append(epoch)
                rows["shard"].append(shard)
                rows["index"].append(sample.index)
                if len(rows["image"]) >= cfg.block_rows:
                    yield _to_block(rows)
                    rows = _empty_rows()
        if rows["image"]:
            yield _to_block(rows)

    def _samples(self, name: str, policy: BadDataPolicy, expected: int):
        path = f"{self.root}/{name}"
        try:
            stream = self.fs.open_input_stream(path)
        except (FileNotFoundError, OSError) as err:
            if "not found" in str(err).lower() or "no such" in str(err).lower() or isinstance(
                    err, FileNotFoundError):
                policy(Problem(name, "-", "shard vanished (listed in the manifest, not on "
                                          "storage)", expected))
                return
            raise
        with stream:
            yield from iter_samples(stream, name, policy, self.num_classes, expected)


def _empty_rows() -> dict:
    return {c: [] for c in COLUMNS}


def _to_block(rows: dict) -> dict:
    return {"image": np.stack(rows["image"]),
            "label": np.asarray(rows["label"], dtype=np.int64),
            "epoch": np.asarray(rows["epoch"], dtype=np.int32),
            "shard": np.asarray(rows["shard"], dtype=np.int32),
            "index": np.asarray(rows["index"], dtype=np.int32)}


def shard_dataset(cfg: InputConfig, num_epochs: int, start: tuple[int, int] = (0, 0),
                  health_name: str | None = None, manifest: dict | None = None):
    """-> (ray.data.Dataset of the training stream, manifest, data-health actor handle).

    Keep the handle for as long as the data is read: the actor goes when its last handle
    does. Train workers can also find it by name (`health_name`). Pass `manifest` when the
    caller has read it already."""
    import ray

    # Ray Data reserves a share of the CPUs per operator; on a pipeline that is one map, that
    # left half the CPUs idle (bench/data.py: 0.89k -> 1.34k images/s on 2 CPUs).
    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = False
    # Emit blocks of about `block_rows` images instead of one block per shard, so that the
    # first batch arrives after a few images, not after a whole shard.
    ctx.target_max_block_size = cfg.block_rows * 3 * cfg.augment.size**2 + (1 << 16)
    manifest = manifest or read_manifest(cfg.uri)
    items = plan(manifest, cfg.split, cfg.seed, num_epochs, start)
    fs, root = storage.filesystem(cfg.uri)
    health = data_health(health_name or f"data-health-{uuid.uuid4().hex[:12]}")
    reader = ShardReader(fs, root, cfg, manifest["num_classes"], health)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(reader, batch_size=1, num_cpus=cfg.num_cpus_per_read,
                        batch_format="numpy")
    return ds, manifest, health


def synthetic_rows(ids: np.ndarray, num_samples: int, num_classes: int, image_size: int,
                   learnable: bool = True) -> dict:
    """Rows of the synthetic source for global sample ids (epoch * num_samples + index).
    `learnable`: the red channel of each image encodes its label, so the loss can fall."""
    n = len(ids)
    labels = (ids % num_samples) % num_classes
    rng = np.random.default_rng(int(ids[0]) if n else 0)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    if learnable:
        shade = (labels * (192 // max(num_classes - 1, 1))).astype(np.int32)   # 0..192
        images[..., 0] = (images[..., 0] // 4 + shade[:, None, None]).astype(np.uint8)
    return {"image": images, "label": labels.astype(np.int64),
            "epoch": (ids // num_samples).astype(np.int32), "shard": np.zeros(n, np.int32),
            "index": (ids % num_samples).astype(np.int32)}


def synthetic_dataset(num_samples: int, num_classes: int = 10, image_size: int = 224,
                      num_epochs: int = 1, block_rows: int = 64, learnable: bool = True):
    """Same columns as `shard_dataset`, generated in memory: for tests, and to ask "is the
    accelerator starved?" (train on it and compare images/s with the real input)."""
    import ray

    def make(batch: dict) -> dict:
        return synthetic_rows(batch["id"], num_samples, num_classes, image_size, learnable)

    total = num_samples * num_epochs
    ds = ray.data.range(total, override_num_blocks=max(1, total // block_rows))
    return ds.map_batches(make, batch_size=block_rows, batch_format="numpy")


def iter_batches(data_iterator, batch_size: int, cfg: InputConfig | None = None,
                 drop_last: bool = True, seed: int | None = None):
    """Torch batches from a Ray Train dataset shard, with prefetching and the local shuffle
    buffer; the `image` column stays uint8 (see `transforms.to_model_input`)."""
    cfg = cfg or InputConfig()
    shuffle = cfg.shuffle_buffer if cfg.shuffle_buffer >= batch_size else (
        batch_size if cfg.shuffle_buffer else None)
    return data_iterator.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=cfg.prefetch_batches, drop_last=drop_last,
        local_shuffle_buffer_size=shuffle, local_shuffle_seed=seed if shuffle else None)


def load_probe(uri: str, split: str, image_size: int, max_images: int, seed: int = 0) -> dict:
    """A small labelled set for the few-shot probe, read directly (no Ray Data), resized to
    the model's resolution: {"images": uint8 (n, S, S, 3), "labels": int64 (n,)}. Bad samples
    are skipped."""
    manifest = read_manifest(uri)
    if split not in manifest["splits"]:
        raise DatasetError(f"{uri}: no split {split!r} for the few-shot probe; it has "
                           f"{sorted(manifest['splits'])} (set data.fewshot_split)")
    fs, root = storage.filesystem(uri)
    aug = Augment("resize", image_size)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    policy = BadDataPolicy(strict=False)
    for entry in manifest["splits"][split]["shards"]:
        try:
            stream = fs.open_input_stream(f"{root.rstrip('/')}/{entry['name']}")
        except (FileNotFoundError, OSError):
            continue
        with stream:
            for sample in iter_samples(stream, entry["name"], policy, manifest["num_classes"]):
                try:
                    images.append(decode_and_augment(sample.image, aug, rng))
                except Exception:  # noqa: BLE001
                    continue
                labels.append(sample.label)
                if len(images) >= max_images:
                    break
        if len(images) >= max_images:
            break
    return {"images": np.stack(images) if images else np.zeros((0, image_size, image_size, 3),
                                                                 np.uint8),
            "labels": np.asarray(labels, dtype=np.int64)}
