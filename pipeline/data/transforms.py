"""Image decoding and augmentation: plain NumPy / PIL, no Ray.

Every image leaves here as uint8 (S, S, 3); the scaling to [-1, 1] (`(x - 127.5) / 127.5`, as
in vit_jax and big_vision) happens on the training device (`to_model_input`), where it is free
and the transfer is 4x smaller than float32.

Augmentations:
- "inception": Inception-style random crop + horizontal flip: pretraining. The crop is
  big_vision's `inception_crop` (`pp/ops_image.py`: area 5%-100%, TF's default aspect ratios
  0.75-1.33), whose box comes from TF's `sample_distorted_bounding_box`; `inception_box` ports
  that op's sampler. It is not torchvision's RandomResizedCrop, which draws the area
  uniformly and the ratio log-uniformly: TF draws the ratio and then the crop's height
  uniformly, which favours small crops (mean area 0.34 of a 4:3 image, 0.38 of a square one,
  where torchvision's gives 0.42 and 0.47).
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
    area: tuple[float, float] = (0.05, 1.0)        # big_vision's inception_crop(area_min=5)
    ratio: tuple[float, float] = (0.75, 1.33)      # TF's sample_distorted_bounding_box default

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
                  ratio=(0.75, 1.33), max_attempts: int = 100) -> tuple[int, int, int, int]:
    """A random crop box (left, top, right, bottom) of a w x h image, as TF's
    `tf.image.sample_distorted_bounding_box` draws it for big_vision's `inception_crop`
    (no bounding boxes, `use_image_if_no_bounding_boxes=True`, `min_object_covered=0`).

    Ported from TF's kernel (tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc,
    `SampleDistortedBoundingBoxBaseOp::DoCompute` and `GenerateRandomCrop`): up to
    `max_attempts` tries (TF's default 100), each drawing an aspect ratio (width / height)
    uniformly from `ratio`, then a height uniformly among the integers whose crop at that
    ratio has an area within `area` of the image's and fits; the first try that fits wins,
    else the whole image. `ratio` and `area` default to TF's op defaults (0.75, 1.33) and
    (0.05, 1.0), which big_vision's `inception_crop` keeps for the ratio and sets for the
    area (`area_min=5`). As in TF, a crop narrower than the image starts at x in
    [0, w - width) (the last column is never a left edge), and likewise for y. TF computes in
    float32 and rounds with `lrintf` (half to even); this uses Python floats and `round`
    (half to even too), which can differ only where a value falls on a rounding tie."""
    for _ in range(max_attempts):
        aspect = ratio[0] + rng.random() * (ratio[1] - ratio[0])
        box = _random_crop(w, h, area[0], area[1], aspect, rng)
        if box is not None:
            return box
    return 0, 0, w, h


def _random_crop(w: int, h: int, min_rel: float, max_rel: float, aspect: float,
                 rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """TF's `GenerateRandomCrop`: a crop of width round(height * aspect) whose height is
    uniform between the heights at the two area bounds (the larger clamped so that the crop
    fits), nudged by one where rounding left the area outside the bounds; None where no such
    crop exists (the caller tries another aspect ratio)."""
    min_area, max_area = min_rel * w * h, max_rel * w * h
    height = round(math.sqrt(min_area / aspect))
    max_height = round(math.sqrt(max_area / aspect))
    if round(max_height * aspect) > w:
        # the largest height whose width round(height * aspect) still fits
        max_height = int((w + 0.5 - 1e-7) / aspect)
        if round(max_height * aspect) > w:
            max_height -= 1
    max_height = min(max_height, h)
    height = min(height, max_height)
    if height < max_height:
        height += int(rng.integers(0, max_height - height + 1))    # [height, max_height]
    width = round(height * aspect)
    if width * height < min_area:
        height += 1
        width = round(height * aspect)
    if width * height > max_area:
        height -= 1
        width = round(height * aspect)
    if not (min_area <= width * height <= max_area and 0 < width <= w and 0 < height <= h):
        return None
    y = int(rng.integers(0, h - height)) if height < h else 0
    x = int(rng.integers(0, w - width)) if width < w else 0
    return x, y, x + width, y + height


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
