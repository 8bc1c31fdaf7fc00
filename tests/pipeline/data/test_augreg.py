"""AugReg's RandAugment and Mixup (pipeline/data/augreg.py).

Each op is checked against PIL's ImageOps / ImageEnhance / Image.transform (or, where PIL has
no such op, a NumPy transcription of the TF code big_vision uses); the sampling against the
RandAugment definition of the authors' code (big_vision pp/archive/autoaugment.py), written
out here from that code rather than taken from the module; Mixup's ratio against the
distribution of max(a, 1 - a), a ~ Beta(p, p).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import special, stats

from pipeline.data.augreg import (
    LEVELS,
    OPS,
    BatchAugment,
    RandAugment,
    apply_op,
    level,
    mixup,
    op_argument,
)

H, W = 40, 56        # not square: rows and columns must not be swapped anywhere


def photos(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, 3) images with structure (gradients, a bright square) and noise, and
    channels with different ranges, so that every op has something to change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        lo, hi = rng.integers(0, 60, 3), rng.integers(150, 256, 3)
        for c in range(3):
            base = (xx * rng.uniform(0.5, 2) + yy * rng.uniform(-1, 1)) % 97 / 96
            img = lo[c] + (hi[c] - lo[c]) * base + rng.normal(0, 12, (H, W))
            r, q = rng.integers(0, H - 10), rng.integers(0, W - 10)
            img[r:r + 10, q:q + 10] += 60
            out[i, ..., c] = np.clip(img, lo[c], hi[c]).astype(np.uint8)
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def ours(op: str, images: np.ndarray, arg: float, centres=None) -> np.ndarray:
    n = len(images)
    c = None if centres is None else torch.as_tensor(centres)
    return to_uint8(apply_op(op, to_tensor(images), torch.full((n,), float(arg)), c))


GREY = (128, 128, 128)


def pil_reference(op: str, img: Image.Image, arg: float) -> Image.Image:
    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    if op == "Posterize":
        return ImageOps.posterize(img, int(arg))
    if op == "Solarize":
        return ImageOps.solarize(img, arg)
    enhance = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if op in enhance:
        return enhance[op](img).enhance(arg)
    if op == "Rotate":
        return img.rotate(arg, resample=Image.Resampling.NEAREST, fillcolor=GREY)
    # PIL's AFFINE data maps output pixel centres (x + 0.5, y + 0.5) to input coordinates;
    # the TF ops map pixel indices. The same map in PIL's coordinates:
    data = {"ShearX": (1, arg, -0.5 * arg, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, -0.5 * arg),
            "TranslateX": (1, 0, arg, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, arg)}[op]
    return img.transform(img.size, Image.Transform.AFFINE, data,
                         resample=Image.Resampling.NEAREST, fillcolor=GREY)


# op, argument, largest difference in 8-bit levels allowed, smallest share of equal pixels
PIL_CASES = [
    ("AutoContrast", 0, 1, 0.5),        # PIL truncates the stretched value, we round
    ("Equalize", 0, 0, 1.0),
    ("Invert", 0, 0, 1.0),
    ("Posterize", 1, 0, 1.0), ("Posterize", 4, 0, 1.0), ("Posterize", 6, 0, 1.0),
    ("Posterize", 8, 0, 1.0),
    ("Solarize", 100, 0, 1.0), ("Solarize", 200, 0, 1.0), ("Solarize", 256, 0, 1.0),
    ("Color", 0.1, 2, 0.5), ("Color", 2.8, 2, 0.5),
    ("Contrast", 0.1, 2, 0.3), ("Contrast", 2.8, 2, 0.5),   # PIL rounds the mean to a level
    ("Brightness", 0.1, 1, 0.5), ("Brightness", 2.8, 1, 0.5),
    ("Sharpness", 0.1, 2, 0.5), ("Sharpness", 2.8, 2, 0.5),
    ("Rotate", 45, 255, 0.97), ("Rotate", -17, 255, 0.97),
    ("ShearX", 0.45, 255, 0.97), ("ShearY", -0.3, 255, 0.97),
    ("TranslateX", 20, 0, 1.0), ("TranslateY", -13, 0, 1.0),
]


@pytest.mark.parametrize("op,arg,max_diff,equal_share", PIL_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in PIL_CASES])
def test_op_matches_pil(op, arg, max_diff, equal_share):
    images = photos(6)
    got = ours(op, images, arg)
    want = np.stack([np.asarray(pil_reference(op, Image.fromarray(im), arg)) for im in images])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert (diff == 0).mean() >= equal_share, f"{op}({arg}): {(diff == 0).mean():.3f} equal"
    if max_diff < 255:
        assert diff.max() <= max_diff, f"{op}({arg}): differs by up to {diff.max()} levels"
    assert not np.array_equal(got, images) or op == "Solarize" and arg >= 256 or \
        op == "Posterize" and arg == 8, f"{op}({arg}) changed nothing"


def test_geometric_ops_fill_with_grey_and_move_the_right_way():
    img = photos(1)
    # Translating by +t reads the input t pixels to the right: content moves left and grey
    # fills the last t columns (TF's translate([-t, 0]), PIL's AFFINE (1, 0, t, ...)).
    got = ours("TranslateX", img, 10)[0]
    assert np.array_equal(got[:, :W - 10], img[0][:, 10:])
    assert (got[:, W - 10:] == 128).all()
    got = ours("TranslateY", img, -5)[0]
    assert np.array_equal(got[5:], img[0][:H - 5]) and (got[:5] == 128).all()
    # Shear along x by s about the top-left corner: row r reads columns shifted by s * r.
    got = ours("ShearX", img, 0.25)[0]
    assert np.array_equal(got[0], img[0][0])
    assert np.array_equal(got[20, :W - 5], img[0][20, 5:])


def solarize_add_reference(images: np.ndarray, addition: int, threshold: int = 128):
    """big_vision's solarize_add, transcribed: add to the pixels below the threshold."""
    added = np.clip(images.astype(np.int64) + addition, 0, 255).astype(np.uint8)
    return np.where(images < threshold, added, images)


def cutout_reference(image: np.ndarray, pad: int, row: int, col: int) -> np.ndarray:
    """big_vision's cutout, transcribed: a (2 pad) square of grey around (row, col), clipped."""
    h, w = image.shape[:2]
    lower, upper = max(0, row - pad), max(0, h - row - pad)
    left, right = max(0, col - pad), max(0, w - col - pad)
    mask = np.pad(np.zeros((h - lower - upper, w - left - right)),
                  [[lower, upper], [left, right]], constant_values=1)
    out = image.copy()
    out[mask == 0] = 128
    return out


def test_solarize_add_and_cutout_match_the_tf_code():
    images = photos(4)
    for addition in (0, 110, 165):
        assert np.array_equal(ours("SolarizeAdd", images, addition),
                              solarize_add_reference(images, addition))
    centres = [(0, 0), (20, 30), (39, 55), (3, 50)]
    for pad in (0, 6, 25):
        got = ours("Cutout", images, pad, centres)
        want = np.stack([cutout_reference(im, pad, r, c)
                         for im, (r, c) in zip(images, centres, strict=True)])
        assert np.array_equal(got, want), pad


def test_posterize_zero_bits_blacks_the_image():
    # RandAugment at magnitude 0 ("light1") posterizes to int(0 * 4) = 0 bits.
    assert (ours("Posterize", photos(2), 0) == 0).all()


# The authors' level -> argument table (big_vision pp/archive/autoaugment.py, level_to_arg
# with RandAugment's cutout_const=40, translate_const=100; MAX_LEVEL 10), at 224 px.
def reference_argument(op: str, m: float) -> float:
    return {
        "AutoContrast": 0, "Equalize": 0, "Invert": 0,
        "Rotate": m / 10 * 30, "ShearX": m / 10 * 0.3, "ShearY": m / 10 * 0.3,
        "TranslateX": m / 10 * 100, "TranslateY": m / 10 * 100,
        "Color": m / 10 * 1.8 + 0.1, "Contrast": m / 10 * 1.8 + 0.1,
        "Brightness": m / 10 * 1.8 + 0.1, "Sharpness": m / 10 * 1.8 + 0.1,
        "Posterize": int(m / 10 * 4), "Solarize": int(m / 10 * 256),
        "SolarizeAdd": int(m / 10 * 110), "Cutout": int(m / 10 * 40),
    }[op]


def test_magnitudes_are_the_authors():
    assert set(OPS) == {"AutoContrast", "Equalize", "Invert", "Rotate", "Posterize",
                        "Solarize", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                        "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"}
    for m in (0, 5, 10, 15, 20):
        for op in OPS:
            assert op_argument(op, m) == pytest.approx(reference_argument(op, m)), (op, m)
    # M = 15 ("medium"): 45 degrees, shear 0.45, 150 px, factor 2.8, 6 bits, no solarize.
    assert op_argument("Rotate", 15) == pytest.approx(45)
    assert op_argument("Posterize", 15) == 6 and op_argument("Solarize", 15) == 384
    # Pixel sizes scale with the image: 448 px translates twice as far.
    assert op_argument("TranslateX", 15, 448) == pytest.approx(300)
    assert op_argument("TranslateX", 15, 384) == 257      # 257.1: whole pixels
    assert op_argument("Cutout", 10, 112) == 20
    assert LEVELS["medium1"] == (2, 15, 0.2) and LEVELS["light1"] == (2, 0, 0.0)
    assert level("strong2") == BatchAugment(2, 20, 0.8)
    with pytest.raises(ValueError, match="unknown AugReg level"):
        level("medium")


def test_sampling_follows_randaugment():
    """N ops per image, each uniform over the 16 and independent of the other layers and
    images; signed ops' signs are fair coins; Cutout's centre is uniform over the image."""
    B, N = 32_000, 2
    plan = RandAugment(N, 10).sample(B, H, W, np.random.default_rng(1))
    assert plan.ops.shape == (B, N)
    for layer in range(N):
        counts = np.bincount(plan.ops[:, layer].numpy(), minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-3, counts
    joint = np.bincount((plan.ops[:, 0] * 16 + plan.ops[:, 1]).numpy(), minlength=256)
    assert stats.chisquare(joint).pvalue > 1e-3
    assert abs((plan.signs == 1).float().mean().item() - 0.5) < 0.01
    rows, cols = plan.centres[..., 0].numpy().ravel(), plan.centres[..., 1].numpy().ravel()
    assert rows.min() == 0 and rows.max() == H - 1 and cols.min() == 0 and cols.max() == W - 1
    assert stats.chisquare(np.bincount(cols, minlength=W)).pvalue > 1e-3


def test_each_image_gets_its_own_ops_in_order():
    """The batch transform equals applying each image's drawn ops one after the other."""
    images = photos(48, seed=3)
    ra = RandAugment(2, 13, size=W)
    plan = ra.sample(len(images), H, W, np.random.default_rng(7))
    got = ra.apply(to_tensor(images), plan)
    for i in range(len(images)):
        x = to_tensor(images[i:i + 1])
        for layer in range(2):
            op = OPS[int(plan.ops[i, layer])]
            arg = op_argument(op, 13, W) * (float(plan.signs[i, layer]) if op in (
                "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY") else 1.0)
            x = apply_op(op, x, torch.tensor([arg]), plan.centres[i:i + 1, layer])
        assert torch.equal(got[i:i + 1], x), (i, plan.ops[i])
    assert len({int(o) for o in plan.ops.ravel()}) == 16       # every op was exercised


def max_beta_cdf(t: np.ndarray, p: float) -> np.ndarray:
    """CDF of max(a, 1 - a) for a ~ Beta(p, p), t in [0.5, 1]: P(1 - t <= a <= t)."""
    return special.betainc(p, p, t) - special.betainc(p, p, 1 - t)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_mixup_ratio_and_mixing(p):
    rng = np.random.default_rng(0)
    images = torch.rand(8, 3, 4, 4)
    targets = torch.eye(8)
    ratios = []
    for _ in range(3000):
        mixed, mixed_targets, a = mixup(images, targets, p, rng)
        ratios.append(a)
    assert stats.kstest(ratios, lambda t: max_beta_cdf(np.asarray(t), p)).pvalue > 1e-3
    assert torch.allclose(mixed, a * images + (1 - a) * images.roll(1, 0))
    # Sample i keeps weight a on its own class and gives 1 - a to its predecessor's.
    assert mixed_targets[3, 3] == pytest.approx(a) and mixed_targets[3, 2] == pytest.approx(1 - a)
    assert torch.allclose(mixed_targets.sum(1), torch.ones(8))


def test_batch_augment_is_reproducible_and_reaches_the_model_range():
    images = torch.from_numpy(photos(16))
    labels = torch.arange(16) % 5
    aug = BatchAugment(2, 15, 0.5)
    x1, y1 = aug(images, labels, 5, aug.rng(0, 0, 10, 0))
    x2, y2 = aug(images, labels, 5, aug.rng(0, 0, 10, 0))
    x3, _ = aug(images, labels, 5, aug.rng(0, 0, 11, 0))
    assert x1.shape == (16, 3, H, W) and y1.shape == (16, 5) and y1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.min() >= -1 and x1.max() <= 1
    assert torch.allclose(y1.sum(1), torch.ones(16))
    # Off: exactly the plain scaling to [-1, 1], labels untouched.
    x0, y0 = BatchAugment()(images, labels, 5, aug.rng(0, 0, 0, 0))
    assert torch.equal(x0, (images.permute(0, 3, 1, 2).float() - 127.5) / 127.5) or \
        torch.allclose(x0, (images.permute(0, 3, 1, 2).float() - 127.5) / 127.5, atol=1e-6)
    assert torch.equal(y0, labels)


def test_randaugment_rejects_bad_settings():
    with pytest.raises(ValueError, match="magnitude must be in"):
        RandAugment(2, 31)
    with pytest.raises(ValueError, match="layers must be >= 0"):
        RandAugment(-1, 10)
