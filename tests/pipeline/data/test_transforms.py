"""Decoding and augmentation: shapes, ranges, crop geometry, determinism."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import Augment, decode_and_augment, inception_box, to_model_input

from .helpers import jpeg_bytes


def test_inception_box_respects_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        x0, y0, x1, y1 = inception_box(400, 300, rng)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        assert 0.05 * 400 * 300 <= w * h <= 400 * 300
        assert 0.75 - 0.02 <= w / h <= 1.33 + 0.02        # width = round(height * ratio)
        # TF draws the offset from [0, size - crop): a narrower crop never ends at the edge
        assert x1 < 400 or x0 == 0
        assert y1 < 300 or y0 == 0


def test_inception_box_falls_back_to_the_whole_image():
    # A 1000 x 10 strip: no crop of ratio 0.75-1.33 holds 5% of it; after TF's 100 tries,
    # the whole image.
    assert inception_box(1000, 10, np.random.default_rng(0)) == (0, 0, 1000, 10)


def tf_crop_sizes(w: int, h: int, n: int, rng: np.random.Generator, area=(0.05, 1.0),
                  ratio=(0.75, 1.33), attempts=100) -> tuple[np.ndarray, np.ndarray]:
    """(widths, heights) of n crops as TF's `sample_distorted_bounding_box` draws them with
    no bounding boxes and min_object_covered=0 (big_vision's `inception_crop`), transcribed
    from the kernel (tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc,
    `GenerateRandomCrop`), all n crops at once: per try, ratio r ~ U(ratio); heights from
    round(sqrt(min_area / r)) to round(sqrt(max_area / r)), the top lowered until
    round(height * r) fits the width and clamped to h; height ~ U{lo..hi}; width =
    round(height * r); one step up (down) if the area falls below (above) the bounds; a try
    whose crop still breaks a bound fails. 100 failed tries: the whole image."""
    min_area, max_area = area[0] * w * h, area[1] * w * h
    widths, heights = np.full(n, float(w)), np.full(n, float(h))
    todo = np.arange(n)
    for _ in range(attempts):
        if not len(todo):
            break
        r = ratio[0] + rng.random(len(todo)) * (ratio[1] - ratio[0])
        lo = np.rint(np.sqrt(min_area / r))
        hi = np.rint(np.sqrt(max_area / r))
        wide = np.rint(hi * r) > w
        hi[wide] = np.floor((w + 0.5 - 1e-7) / r[wide])
        hi[wide & (np.rint(hi * r) > w)] -= 1
        hi = np.minimum(hi, h)
        lo = np.minimum(lo, hi)
        ch = lo + np.floor(rng.random(len(todo)) * (hi - lo + 1))
        cw = np.rint(ch * r)
        low = cw * ch < min_area
        ch[low] += 1
        cw[low] = np.rint(ch[low] * r[low])
        high = cw * ch > max_area
        ch[high] -= 1
        cw[high] = np.rint(ch[high] * r[high])
        ok = ((cw * ch >= min_area) & (cw * ch <= max_area) & (cw > 0) & (cw <= w)
              & (ch > 0) & (ch <= h))
        widths[todo[ok]], heights[todo[ok]] = cw[ok], ch[ok]
        todo = todo[~ok]
    return widths, heights


def torchvision_crop_sizes(w: int, h: int, n: int, rng: np.random.Generator):
    """What the crop was before: area ~ U(0.05, 1), log-ratio ~ U(log 3/4, log 4/3), with
    rejection (torchvision's RandomResizedCrop); the test must tell it from TF's."""
    a = rng.uniform(0.05, 1.0, 4 * n) * w * h
    r = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), 4 * n))
    cw, ch = np.rint(np.sqrt(a * r)), np.rint(np.sqrt(a / r))
    fits = (cw <= w) & (ch <= h)
    return cw[fits][:n], ch[fits][:n]


@pytest.mark.parametrize("w, h, tf_mean", [(640, 480, 0.34), (500, 500, 0.38)])
def test_inception_box_draws_tfs_distribution(w, h, tf_mean):
    """Area fraction and aspect ratio of our crops against the transcription of TF's sampler
    above: the same distributions (two-sample KS), where torchvision's, with its larger mean
    area (0.42 on 4:3 images, 0.47 on square ones), is rejected."""
    from scipy.stats import ks_2samp

    n = 20_000
    rng = np.random.default_rng(0)
    boxes = np.array([inception_box(w, h, rng) for _ in range(n)])
    ours_w, ours_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    tf_w, tf_h = tf_crop_sizes(w, h, n, np.random.default_rng(1))
    tv_w, tv_h = torchvision_crop_sizes(w, h, n, np.random.default_rng(2))
    area = {k: cw * ch / (w * h) for k, (cw, ch) in
            {"ours": (ours_w, ours_h), "tf": (tf_w, tf_h), "tv": (tv_w, tv_h)}.items()}
    assert area["tf"].mean() == pytest.approx(tf_mean, abs=0.01)
    assert area["ours"].mean() == pytest.approx(area["tf"].mean(), abs=0.006)
    assert ks_2samp(area["ours"], area["tf"]).pvalue > 1e-3
    assert ks_2samp(ours_w / ours_h, tf_w / tf_h).pvalue > 1e-3
    for q in (0.1, 0.5, 0.9):
        assert np.quantile(area["ours"], q) == pytest.approx(np.quantile(area["tf"], q),
                                                             abs=0.015)
    # the test can fail: torchvision's crops are larger, by a margin KS sees at once
    assert area["tv"].mean() > area["tf"].mean() + 0.07
    assert ks_2samp(area["tv"], area["tf"]).pvalue < 1e-9


@pytest.mark.parametrize("aug", [Augment("inception", 32), Augment("resize_crop", 32),
                                 Augment("resize_crop", 32, crop=False, flip=False),
                                 Augment("resize", 32)])
def test_outputs_are_uint8_of_the_right_size(aug):
    out = decode_and_augment(jpeg_bytes(1, (90, 70)), aug, np.random.default_rng(0))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_png_and_greyscale_decode_to_rgb():
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30), 200, np.uint8), mode="L").save(buf, format="PNG")
    out = decode_and_augment(buf.getvalue(), Augment("resize", 16), np.random.default_rng(0))
    assert out.shape == (16, 16, 3) and (out == 200).all()


def test_same_rng_same_pixels_and_flip_happens():
    data = jpeg_bytes(2, (80, 64))
    aug = Augment("inception", 24)
    a = decode_and_augment(data, aug, np.random.default_rng([1, 2, 3]))
    b = decode_and_augment(data, aug, np.random.default_rng([1, 2, 3]))
    assert np.array_equal(a, b)
    # Without crop randomness, the flip is the only difference: some seeds flip, some not.
    aug = Augment("resize_crop", 24, crop=False)
    outs = [decode_and_augment(data, aug, np.random.default_rng(s)) for s in range(16)]
    plain = decode_and_augment(data, Augment("resize", 24), np.random.default_rng(0))
    flipped = sum(np.array_equal(o, plain[:, ::-1]) for o in outs)
    kept = sum(np.array_equal(o, plain) for o in outs)
    assert flipped + kept == 16 and flipped > 0 and kept > 0


def test_eval_resize_never_flips():
    data = jpeg_bytes(3, (64, 64))
    outs = {decode_and_augment(data, Augment("resize", 32), np.random.default_rng(s)).tobytes()
            for s in range(8)}
    assert len(outs) == 1


def test_to_model_input_scales_to_minus_one_one():
    x = torch.tensor([[[[0, 127, 255]]]], dtype=torch.uint8).expand(2, 4, 4, 3)
    y = to_model_input(x)
    assert y.shape == (2, 3, 4, 4) and y.dtype == torch.float32
    assert y[0, 0, 0, 0] == -1.0 and y[0, 2, 0, 0] == 1.0
    assert y[0, 1, 0, 0] == pytest.approx((127 - 127.5) / 127.5)


def test_unknown_augmentation():
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        Augment("mixup")
