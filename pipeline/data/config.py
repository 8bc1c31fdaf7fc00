"""The `data` section of the pretraining config: what a user sets about the training data.

Read where the data is built (`pipeline.train.run`: the stream, `stream.InputConfig`; the
few-shot probe's sets, `probe`; the device-side AugReg, `augreg.BatchAugment`) and composed
into `pipeline.train.config.PretrainConfig`. Field names are the `--set data.<field>=...`
keys and the keys of every `config.json` a run has logged: renaming one breaks loading them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# big_vision configs/vit_i21k.py: the named settings of the AugReg paper (Fig. 4), as
# (RandAugment layers, magnitude, Mixup p).
LEVELS = {
    "none": (0, 0, 0.0),
    "light1": (2, 0, 0.0),
    "light2": (2, 10, 0.2),
    "medium1": (2, 15, 0.2),
    "medium2": (2, 15, 0.5),
    "strong1": (2, 20, 0.5),
    "strong2": (2, 20, 0.8),
}


def check_randaugment(num_layers: int, magnitude: float) -> None:
    """RandAugment(N, M)'s arguments: N >= 0 layers, magnitude M in [0, 30]."""
    if num_layers < 0:
        raise ValueError(f"RandAugment layers must be >= 0, got {num_layers}")
    if not 0 <= magnitude <= 30:
        raise ValueError(f"RandAugment magnitude must be in [0, 30], got {magnitude}")


@dataclass(frozen=True)
class DataConfig:
    """Training data: WebDataset shards (`source="shards"`, `uri` with a manifest) or the
    synthetic source (`source="synthetic"`, for tests and starvation checks)."""

    source: Literal["shards", "synthetic"] = "shards"
    uri: str = ""
    split: str = "train"
    augment: Literal["inception", "resize_crop", "resize"] = "inception"
    # AugReg (Steiner et al., 2021) on the training device, after the read tasks' crop and
    # flip (pipeline/data/augreg.py): RandAugment with `randaug_layers` ops per image (0: off)
    # at magnitude `randaug_magnitude` (0-30, the authors' scale of 10), then Mixup with a
    # Beta(mixup, mixup) ratio (0: off). The paper's named settings: LEVELS.
    randaug_layers: int = 0
    randaug_magnitude: float = 0.0
    mixup: float = 0.0
    strict: bool = False
    # Samples each worker mixes locally (Ray Data's local shuffle buffer), at most
    # `loop.SHUFFLE_STEPS` of its micro-batches: what sits in the buffers at a checkpoint is
    # not trained yet, and each such sample is a hole the data position must list.
    shuffle_buffer: int = 4096
    block_rows: int = 64
    # CPUs each read task asks for: one task per such share of the CPUs the Train workers
    # leave, at least one per worker (then each asks for less: `run.read_slots`).
    num_cpus_per_read: float = 1.0
    synthetic_samples: int = 4096
    synthetic_classes: int = 10
    # A local folder where every worker appends "step epoch shard index" for each sample it
    # trains on: an audit of the data order across restarts ("": off).
    trace_dir: str = ""
    # The same samples reach the same worker in the same order on every run (Ray Data's
    # preserve_order): reproducible runs and comparisons, at some cost in throughput.
    preserve_order: bool = False
    # Each Train worker executes a stream of its own ("on"), or takes its part of one stream
    # through Ray Train's split ("off": one coordinator actor for all, the limit of a large
    # cluster); "auto": on with GPUs, on a cluster of several nodes, or for one worker
    # (run.streams_per_worker; chosen when each worker-group start builds the stream).
    worker_streams: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self):
        if self.source not in ("shards", "synthetic"):
            raise ValueError(f"data.source must be 'shards' or 'synthetic', got {self.source!r}")
        check_randaugment(self.randaug_layers, self.randaug_magnitude)
        if self.worker_streams not in ("auto", "on", "off"):
            raise ValueError(f"data.worker_streams must be auto, on or off, got "
                             f"{self.worker_streams!r}")
        if self.mixup < 0:
            raise ValueError(f"data.mixup must be >= 0 (0: off), got {self.mixup}")
        if self.source == "shards" and not self.uri:
            raise ValueError("data.uri is required for data.source='shards' (a folder or "
                             "s3:// prefix with manifest.json; see jobs/make_shards.py)")
