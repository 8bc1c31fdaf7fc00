"""FLOP counts against the published (timm fvcore) figures (timm's model tables)."""

import pytest

from pipeline.model import ViTConfig
from pipeline.perf import forward_flops_per_image, train_flops_per_image


@pytest.mark.parametrize("variant,size,gmacs", [("Ti/16", 224, 1.26), ("S/16", 224, 4.61),
                                                ("B/16", 224, 17.58), ("L/16", 224, 61.6),
                                                ("H/14", 224, 167.4), ("B/16", 384, 55.54),
                                                ("B/32", 224, 4.41)])
def test_forward_flops_match_timm(variant, size, gmacs):
    cfg = ViTConfig.from_variant(variant, image_size=size)
    assert forward_flops_per_image(cfg) / 2e9 == pytest.approx(gmacs, rel=0.01)


def test_train_is_three_forwards():
    cfg = ViTConfig.from_variant("B/16")
    assert train_flops_per_image(cfg) == 3 * forward_flops_per_image(cfg)
