"""The synthetic training stream: noise images generated in memory, with the columns of a
shard stream (`pipeline.data.stream`), for tests and to ask "is the accelerator starved?"
(train on it and compare images/s with the real input). `data.source=synthetic` selects it.

Not the grating JPEGs that `shards.grating_images` writes to shards (real decoding costs),
nor the VTAB-layout grating tasks of `eval.data.write_grating_task`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.data.plan import DataPosition, StreamPlan, ordered_spans
from pipeline.data.stream import Slots, block_bytes, read_slots


def noise_rows(ids: np.ndarray, num_samples: int, num_classes: int, image_size: int,
               learnable: bool = True) -> dict:
    """Rows of the synthetic stream for global sample ids (epoch * num_samples + index):
    uniform noise images. `learnable`: the red channel of each image encodes its label, so
    the loss can fall. A sample's pixels depend on its id only, not on how the stream is cut
    into blocks."""
    n = len(ids)
    labels = (ids % num_samples) % num_classes
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for row, i in enumerate(ids.tolist()):
        images[row] = np.random.default_rng(i).integers(0, 256, images.shape[1:], np.uint8)
    if learnable:
        shade = (labels * (192 // max(num_classes - 1, 1))).astype(np.int32)   # 0..192
        images[..., 0] = (images[..., 0] // 4 + shade[:, None, None]).astype(np.uint8)
    return {"image": images, "label": labels.astype(np.int64),
            "epoch": (ids // num_samples).astype(np.int32), "shard": np.zeros(n, np.int32),
            "index": (ids % num_samples).astype(np.int32)}


def noise_dataset(num_samples: int, num_classes: int = 10, image_size: int = 224,
                  num_epochs: int = 1, block_rows: int = 64, learnable: bool = True,
                  start: DataPosition | None = None, seed: int = 0, read_tasks: int = 0,
                  num_cpus_per_read: float = 1.0, workers: int = 1):
    """A Ray Dataset of `noise_rows`, with the columns of `stream.shard_dataset` (less
    `lost`: nothing is skipped).

    Its plan is `StreamPlan.synthetic(num_samples, seed)`, one shard per epoch; the stream is
    the sample ids (epoch * num_samples + index) of epochs [0, num_epochs) that `start` has
    not consumed, in order, in `read_tasks` spans (0: as many as the CPUs run), one read task
    each (`stream.Slots`). `workers` > 1: slots that `workers` workers can split evenly, each
    taking every `workers`-th block of the stream (not in order)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = block_bytes(block_rows, image_size, lost=False)
    # The ids left, as [lo, hi) runs of global ids: a partly consumed epoch leaves few runs
    # (its holes and the tail), so the id list itself is never materialised.
    plan, start = StreamPlan.synthetic(num_samples, seed), start or DataPosition()
    runs = []
    for r in plan.reads(start, num_epochs):
        base = r["epoch"] * num_samples
        edges = np.r_[-1, np.asarray(r["skip"], np.int64), num_samples]
        keep = edges[1:] - edges[:-1] > 1
        runs += zip((base + edges[:-1][keep] + 1).tolist(), (base + edges[1:][keep]).tolist(),
                    strict=True)
    lo = np.asarray([a for a, _ in runs], np.int64)
    hi = np.asarray([b for _, b in runs], np.int64)
    # A sample's id is its place in the plan, and each cell of the grid of `block_rows` ids
    # is one block. A slot (read task) is some cells, clipped to [first, stop) of the stream.
    b = block_rows
    tasks = read_slots(max(int(hi[-1] - lo[0]) // b, 1), read_tasks, num_cpus_per_read) \
        if runs else 1
    if workers > 1 and runs:
        # A stream per worker (`stream.per_worker`): worker r's slots are r, r + workers, ...,
        # and take the cells c = r (mod workers), in `tasks` chunks each: equal shares.
        first, stop = int(lo[0]), int(hi[-1])
        cells, per = range(first // b, -(-stop // b)), -(-tasks // workers)
        slots = [(cells[r::workers][j::per], first, stop) for j in range(per)
                 for r in range(workers)]
    else:
        # In order: spans of the grid (`ordered_spans`: a resumed stream cut as its run was).
        slots = [(range(f // b, -(-t // b)), f, t)
                 for f, t in ordered_spans(plan, start, num_epochs, b, tasks)]

    def make(batch: dict) -> Iterator[dict]:
        cells, first, stop = slots[int(batch["id"][0])]
        for cell in cells:
            ids = np.arange(max(cell * b, first), min((cell + 1) * b, stop), dtype=np.int64)
            at = np.searchsorted(lo, ids, side="right") - 1
            ids = ids[(at >= 0) & (ids < hi[np.maximum(at, 0)])]     # not consumed
            if len(ids):
                yield noise_rows(ids, num_samples, num_classes, image_size, learnable)

    return Slots(make, len(slots), num_cpus_per_read, workers if runs else 1).dataset()
