"""AugReg's augmentation: RandAugment and Mixup, on whole batches on the training device.

"How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers"
(Steiner et al., 2021) pretrains on ImageNet-21k with RandAugment (Cubuk et al., 2019) and
Mixup (Zhang et al., 2017) on top of the Inception crop and flip. Both run here on the uint8
batch after it reaches the device, so the read tasks do exactly what they do without them:
on a GPU the whole RandAugment of a batch is a few dozen kernels. The ops come from kornia
(`kornia.enhance`, `kornia.geometry.warp_affine`); the sampling and the magnitudes are those
of the authors' code, big_vision `pp/archive/autoaugment.py` (`distort_image_with_randaugment`,
the TF EfficientNet implementation):

- 16 ops; each of the `num_layers` layers picks one of them uniformly for each image and
  always applies it, at the one shared magnitude M (no per-op probability).
- Magnitudes are on a scale of 10 (`MAX_LEVEL`): Rotate M/10 * 30 degrees, ShearX/Y M/10 * 0.3,
  TranslateX/Y M/10 * 100 pixels, each with a random sign; Color, Contrast, Brightness and
  Sharpness blend with factor M/10 * 1.8 + 0.1 (no sign); Posterize keeps int(M/10 * 4) bits;
  Solarize inverts pixels at or above int(M/10 * 256) (M >= 10: none); SolarizeAdd adds
  int(M/10 * 110) to pixels below 128; Cutout greys a square of side 2 * int(M/10 * 40) at a
  uniformly drawn centre. Empty pixels of the geometric ops and Cutout take grey (128).
  M = 0 is not a no-op ("Actually not nothing!", big_vision `configs/vit_i21k.py`): Posterize
  then blacks the image, Solarize inverts it and the blends go to factor 0.1.
- Pixel sizes (translate 100, cutout 40) are those of 224 px images; at another resolution
  they scale with it (to whole pixels), so a 448 px run translates by the same fraction.
- Each op's result is rounded to the 8-bit grid, as the uint8 ops of the reference are
  (they truncate where this rounds: at most one level apart).
- Departure: Contrast blends with the mean grey level, as PIL does and kornia implements.
  The TF code divides the histogram's sum (the pixel count) by 256 instead of the weighted
  sum, so it blends with grey H*W/256 (196 at 224 px) whatever the image.

Mixup as big_vision `utils.get_mixup`: one ratio a ~ Beta(p, p) per batch, a = max(a, 1 - a),
images and (multi-hot) targets mixed with the batch rolled by one. Here "batch" is one
worker's micro-batch.

Randomness comes from a NumPy generator on the host (no device synchronisation), seeded by
(seed, rank, step, micro-batch): a resumed run augments as an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.config import LEVELS, check_randaugment

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
       "Cutout", "SolarizeAdd")
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
MAX_LEVEL = 10.0
# Ops whose result leaves the 8-bit grid (the others select, shift or look up 8-bit values).
OFF_GRID = frozenset({"AutoContrast", "Color", "Contrast", "Brightness", "Sharpness",
                      "SolarizeAdd"})
REFERENCE_SIZE = 224        # the image size the reference's pixel constants are written for
GREY = 128 / 255



def op_argument(op: str, magnitude: float, size: int = REFERENCE_SIZE) -> float:
    """The argument the reference gives `op` at `magnitude` (before the random sign): degrees,
    shear factor, pixels, blend factor, bits, or a threshold / addition in 0-255 levels."""
    level = magnitude / MAX_LEVEL
    scale = size / REFERENCE_SIZE
    if op == "Rotate":
        return level * 30.0
    if op in ("ShearX", "ShearY"):
        return level * 0.3
    if op in ("TranslateX", "TranslateY"):     # whole pixels (a half-pixel shift is all ties)
        return level * 100.0 if scale == 1 else float(round(level * 100.0 * scale))
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if op == "Posterize":
        return float(min(int(level * 4), 8))
    if op == "Solarize":
        return float(int(level * 256))
    if op == "SolarizeAdd":
        return float(int(level * 110))
    if op == "Cutout":
        return float(int(level * 40 * scale))
    if op in ("AutoContrast", "Equalize", "Invert"):
        return 0.0
    raise ValueError(f"unknown RandAugment op {op!r}; ops are {list(OPS)}")


# ---------------------------------------------------------------------------------------------
# The ops: float (n, 3, H, W) in [0, 1] on the 8-bit grid, one argument per image (n,)
# ---------------------------------------------------------------------------------------------
def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 1]; a flat channel stays as it is."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    stretched = ((x - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    return torch.where(hi > lo, stretched, x)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Brightness: a blend with black, i.e. x * factor (kornia's adjust_brightness adds)."""
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def solarize_add(x: torch.Tensor, addition: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """Add `addition` levels to the pixels below `threshold` (clipped); the others stay."""
    added = (x + addition.view(-1, 1, 1, 1) / 255).clamp(0, 1)
    return torch.where(x < threshold / 255, added, x)


def cutout(x: torch.Tensor, pad: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Grey the pixels within `pad` of each image's centre (row, col): rows
    [r - pad, r + pad) and the same columns, clipped to the image."""
    n, _, H, W = x.shape
    pad = pad.view(n, 1)
    rows = torch.arange(H, device=x.device).view(1, H)
    cols = torch.arange(W, device=x.device).view(1, W)
    r, c = centres[:, :1], centres[:, 1:]
    inside = ((rows >= r - pad) & (rows < r + pad)).view(n, 1, H, 1) & \
             ((cols >= c - pad) & (cols < c + pad)).view(n, 1, 1, W)
    return torch.where(inside, torch.full_like(x, GREY), x)


def affine(x: torch.Tensor, out_to_in: torch.Tensor) -> torch.Tensor:
    """Warp with (n, 2, 3) matrices that map output pixel (col, row) to the input pixel it
    reads (pixel-index coordinates, as TF's ImageProjectiveTransform and PIL's AFFINE data
    take them); nearest neighbour, grey where the input has no pixel."""
    from kornia.geometry.transform import warp_affine

    full = torch.cat([out_to_in, out_to_in.new_tensor([0, 0, 1]).expand(len(x), 1, 3)], 1)
    forward = torch.linalg.inv(full.double()).to(x.dtype)[:, :2]    # kornia takes src -> dst
    fill = torch.full((3,), GREY, device=x.device, dtype=x.dtype)
    return warp_affine(x, forward, (x.shape[2], x.shape[3]), mode="nearest",
                       padding_mode="fill", fill_value=fill, align_corners=True)


def geometry(op: str, arg: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(n, 2, 3) output-to-input matrices of a geometric op: TF's `rotate` (about the centre,
    counter-clockwise), `shear_x` [1 s; 0 1], `shear_y` [1 0; s 1], `translate` by -pixels."""
    n = len(arg)
    m = torch.zeros(n, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1
    a = arg.double()
    if op == "Rotate":
        t = torch.deg2rad(a)
        cx, cy = (W - 1) / 2, (H - 1) / 2
        cos, sin = torch.cos(t), torch.sin(t)
        m[:, 0, 0], m[:, 0, 1] = cos, -sin
        m[:, 1, 0], m[:, 1, 1] = sin, cos
        m[:, 0, 2] = cx - cos * cx + sin * cy
        m[:, 1, 2] = cy - sin * cx - cos * cy
    elif op == "ShearX":
        m[:, 0, 1] = a
    elif op == "ShearY":
        m[:, 1, 0] = a
    elif op == "TranslateX":
        m[:, 0, 2] = a
    elif op == "TranslateY":
        m[:, 1, 2] = a
    return m


def apply_op(op: str, x: torch.Tensor, arg: torch.Tensor, centres: torch.Tensor | None = None
             ) -> torch.Tensor:
    """One RandAugment op on images (n, 3, H, W) in [0, 1] with per-image arguments (n,) on
    x's device (`op_argument`, signed where the op is in SIGNED); Cutout also takes centres
    (n, 2). -> the result rounded to the 8-bit grid."""
    import kornia.enhance as K

    if op == "AutoContrast":
        out = autocontrast(x)
    elif op == "Equalize":
        out = K.equalize(x)
    elif op == "Invert":
        out = 1.0 - x
    elif op == "Posterize":
        out = K.posterize(x, arg.long())
    elif op == "Solarize":
        out = K.solarize(x, thresholds=arg / 255)
    elif op == "SolarizeAdd":
        out = solarize_add(x, arg)
    elif op == "Color":
        out = K.adjust_saturation_with_gray_subtraction(x, arg)
    elif op == "Contrast":
        out = K.adjust_contrast_with_mean_subtraction(x, arg)
    elif op == "Brightness":
        out = brightness(x, arg)
    elif op == "Sharpness":
        out = K.sharpness(x, arg)
    elif op == "Cutout":
        out = cutout(x, arg.long(), centres)
    elif op in SIGNED:
        matrices = geometry(op, arg.cpu(), x.shape[2], x.shape[3]).to(x.device)
        out = affine(x, matrices)
    else:
        raise ValueError(f"unknown RandAugment op {op!r}; ops are {list(OPS)}")
    return torch.round(out * 255) / 255 if op in OFF_GRID else out


# ---------------------------------------------------------------------------------------------
# Sampling and the batch transform
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What RandAugment does to each image of a batch: op index per (image, layer), the sign
    of signed ops' arguments, and Cutout's centre (row, col). Host tensors."""

    ops: torch.Tensor       # (B, N) int64, indices into OPS
    signs: torch.Tensor     # (B, N) float, +1 or -1
    centres: torch.Tensor   # (B, N, 2) int64


class RandAugment:
    """RandAugment(N, M) as the authors' code applies it (module docstring)."""

    def __init__(self, num_layers: int, magnitude: float, size: int = REFERENCE_SIZE):
        check_randaugment(num_layers, magnitude)
        self.num_layers, self.magnitude, self.size = num_layers, magnitude, size
        self.args = torch.tensor([op_argument(op, magnitude, size) for op in OPS])

    def sample(self, batch: int, height: int, width: int, rng: np.random.Generator) -> Plan:
        n = self.num_layers
        return Plan(ops=torch.from_numpy(rng.integers(0, len(OPS), (batch, n))),
                    signs=torch.from_numpy(np.where(rng.random((batch, n)) < 0.5, -1.0, 1.0)),
                    centres=torch.from_numpy(np.stack(
                        [rng.integers(0, height, (batch, n)), rng.integers(0, width, (batch, n))],
                        -1)))

    def apply(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> augmented, each op on the images that drew it."""
        x = x.clone()
        for layer in range(self.num_layers):
            chosen = plan.ops[:, layer]
            for k, op in enumerate(OPS):
                idx = torch.nonzero(chosen == k).squeeze(1)      # on the host: no device sync
                if not len(idx):
                    continue
                arg = self.args[k].expand(len(idx))
                if op in SIGNED:
                    arg = arg * plan.signs[idx, layer]
                on = idx.to(x.device, non_blocking=True)
                out = apply_op(op, x.index_select(0, on), arg.to(x.device, x.dtype),
                               plan.centres[idx, layer].to(x.device))
                x.index_copy_(0, on, out)
        return x


def mixup(images: torch.Tensor, targets: torch.Tensor, p: float, rng: np.random.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """big_vision's mixup: a ~ Beta(p, p), a = max(a, 1 - a); each image and target becomes
    a * itself + (1 - a) * its neighbour in the batch rolled by one. -> (images, targets, a)."""
    a = float(rng.beta(p, p))
    a = max(a, 1.0 - a)
    mix = lambda t: a * t + (1.0 - a) * torch.roll(t, 1, 0)      # noqa: E731
    return mix(images), mix(targets), a


@dataclass(frozen=True)
class BatchAugment:
    """The device-side half of the pretraining augmentation (after the read tasks' crop and
    flip): RandAugment(layers, magnitude) then Mixup(p). All zero: nothing."""

    randaug_layers: int = 0
    randaug_magnitude: float = 0.0
    mixup: float = 0.0

    @property
    def active(self) -> bool:
        return self.randaug_layers > 0 or self.mixup > 0

    def rng(self, seed: int, rank: int, step: int, micro: int) -> np.random.Generator:
        return np.random.default_rng([seed, rank, step, micro, 0x5A17])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 rng: np.random.Generator, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, H, W, 3) on the device and labels -> model input (B, 3, H, W),
        normalised with `mean` / `std` (default: [-1, 1]), and labels (float (B, K) targets
        when Mixup mixed them)."""
        from pipeline.data.transforms import normalise

        x = images.permute(0, 3, 1, 2).float().div_(255)
        if self.randaug_layers:
            ra = RandAugment(self.randaug_layers, self.randaug_magnitude, x.shape[-1])
            x = ra.apply(x, ra.sample(len(x), x.shape[2], x.shape[3], rng))
        if self.mixup > 0:
            from pipeline.data.labels import multi_hot

            x, labels, _ = mixup(x, multi_hot(labels, num_classes), self.mixup, rng)
        return normalise(x, mean, std), labels


def level(name: str) -> BatchAugment:
    """One of the AugReg paper's named settings (LEVELS) as a BatchAugment."""
    if name not in LEVELS:
        raise ValueError(f"unknown AugReg level {name!r}; use one of {list(LEVELS)}")
    layers, magnitude, p = LEVELS[name]
    return BatchAugment(layers, magnitude, p)

