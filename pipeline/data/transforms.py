"""Image decoding and augmentation: plain NumPy / PIL, no Ray.

Every image leaves here as uint8 (S, S, 3); the scaling to [-1, 1] (`(x - 127.5) / 127.5`, as
in vit_jax and big_vision) happens on the training device (`to_model_input`), where it is free
and the transfer is 4x smaller than float32.

Augmentations:
- "inception": Inception-style random-resized crop + horizontal flip: pretraining. Area
  5%-100% and aspect 3/4-4/3 as big_vision's `inception_crop` (area_min=5, TF's
  `sample_distorted_bounding_box`); the sampling is torchvision's RandomResizedCrop (10 tries
  at an area and log-uniform aspect, else a central crop) where TF makes 100 tries and then
  takes the whole image: the same crops whenever a try fits, which is almost always.
- "resize_crop": resize to `resize_to` (square) then a random S x S crop + flip: BiT / ViT
  fine-tuning (§2.2 of vtab.md); VTAB tasks switch the crop and / or flip off (Supp. F).
- "resize": resize to S x S: evaluation.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 200_000_000  # decompression-bomb guard, above any real photo


@dataclass(frozen=True)
class Augment:
    kind: Literal["inception", "resize_crop", "resize"] = "inception"
    size: int = 224
    flip: bool = True
    crop: bool = True                # resize_crop only: False -> plain resize to `size`
    resize_to: int | None = None     # resize_crop only: pre-crop size (default 448/384 * size)
    area: tuple[float, float] = (0.05, 1.0)        # big_vision's inception_crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.kind not in ("inception", "resize_crop", "resize"):
            raise ValueError(f"unknown augmentation {self.kind!r}; use inception, resize_crop "
                             f"or resize")
        if self.size <= 0:
            raise ValueError(f"augmentation size must be positive, got {self.size}")

    @property
    def train(self) -> bool:
        return self.kind != "resize"


def decode(data: bytes, draft_to: int | None = None) -> Image.Image:
    """Decode JPEG / PNG bytes to an RGB PIL image. `draft_to`: let the JPEG decoder scale
    down by a power of two while both sides stay >= draft_to (several times faster on large
    photos, no visible cost after the final resize)."""
    img = Image.open(io.BytesIO(data))
    if draft_to and img.format == "JPEG":
        img.draft("RGB", (draft_to, draft_to))
    return img.convert("RGB")


def inception_box(w: int, h: int, rng: np.random.Generator, area=(0.05, 1.0),
                  ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random crop box (left, top, right, bottom): 10 tries at a random area fraction and
    log-uniform aspect ratio, else the central crop at the nearest allowed ratio."""
    total = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = total * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(rng.integers(0, w - cw + 1))
            y = int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def augment(img: Image.Image, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """PIL image -> uint8 (S, S, 3) with the augmentation `aug`."""
    S = aug.size
    if aug.kind == "inception":
        box = inception_box(img.width, img.height, rng, aug.area, aug.ratio)
        # Crop and resize in one resampling pass; reducing_gap keeps big downscales fast.
        out = img.resize((S, S), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    elif aug.kind == "resize_crop" and aug.crop:
        R = aug.resize_to or int(round(S * 448 / 384))
        out = img.resize((R, R), Image.Resampling.BILINEAR, reducing_gap=3.0)
        x, y = int(rng.integers(0, R - S + 1)), int(rng.integers(0, R - S + 1))
        out = out.crop((x, y, x + S, y + S))
    else:
        out = img.resize((S, S), Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(out, dtype=np.uint8)
    if aug.train and aug.flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def decode_and_augment(data: bytes, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    # The draft size keeps enough pixels for the smallest crop the augmentation can take.
    if aug.kind == "inception":
        # the smallest crop (area[0] of the image) still has S pixels a side
        draft = math.ceil(aug.size / math.sqrt(aug.area[0]))
    elif aug.kind == "resize_crop" and aug.crop:
        draft = aug.resize_to or int(round(aug.size * 448 / 384))
    else:
        draft = aug.size
    return augment(decode(data, draft_to=draft), aug, rng)


def to_model_input(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """uint8 (B, H, W, 3) torch tensor -> float (B, 3, H, W) on its device, normalised as the
    model expects (`ViTConfig.input_mean` / `input_std`): (x / 255 - mean) / std; the default
    gives [-1, 1] as in vit_jax and big_vision."""
    import torch

    x = images.permute(0, 3, 1, 2).to(torch.float32)
    return normalise(x.div_(255), mean, std)


def normalise(x01, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """float (B, 3, H, W) on [0, 1] -> (x - mean) / std per channel, in place."""
    if tuple(mean) == (0.5, 0.5, 0.5) and tuple(std) == (0.5, 0.5, 0.5):
        return x01.mul_(2).sub_(1)
    m = x01.new_tensor(mean).view(1, -1, 1, 1)
    s = x01.new_tensor(std).view(1, -1, 1, 1)
    return x01.sub_(m).div_(s)
