"""Small real data for the data tests: JPEG files, hand-made tars with chosen defects."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size=(48, 40), colour=None) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if colour is not None:
        arr[:] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """samples: [{"__key__": k, "jpg": bytes, "cls": b"3", ...}] in order."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for suffix, data in s.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=5) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"img.{i}.jpg").write_bytes(jpeg_bytes(c * 100 + i, (60 + 7 * i, 50)))
    return root


def every_sample(sizes, epochs) -> set:
    """All (epoch, shard, index) of the epochs, from the shard sizes alone."""
    return {(e, s, i) for e in range(epochs) for s, n in enumerate(sizes) for i in range(n)}
