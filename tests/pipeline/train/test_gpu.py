"""GPU paths: bf16 autocast training step and FSDP wrapping. Skipped without CUDA (CI has
none); run them on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import ViT, ViTConfig
from pipeline.train.config import apply_overrides, smoke
from pipeline.train.step import Pretrainer, decay_names, make_optimizer, train_step
from tests.conftest import sqlite_store

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_step_on_gpu_learns():
    dev = torch.device("cuda")
    cfg = apply_overrides(smoke(), ["scale.use_gpu=true"])
    torch.manual_seed(0)
    model = Pretrainer(ViT(ViTConfig.from_variant("S/16", num_classes=10)), "softmax").to(dev)
    opt = make_optimizer(model, decay_names(model), cfg, dev)
    x = torch.rand(32, 3, 224, 224, device=dev) * 2 - 1
    y = torch.randint(0, 10, (32,), device=dev)
    losses = [train_step(model, opt, [(x, y)], 1e-3, 1.0, torch.bfloat16)[0] for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], "memorises one batch in bf16"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.vit.blocks[0].mlp.fc1(torch.randn(2, 384, device=dev)).dtype == \
            torch.bfloat16


@pytest.mark.ray
def test_fsdp_run_on_one_gpu(ray_local, tmp_path):
    from pipeline.train.run import pretrain

    cfg = apply_overrides(smoke(), ["scale.use_gpu=true", "train.parallel=fsdp",
                                    "train.total_steps=20", "checkpoint.every=10",
                                    f"run.storage={tmp_path}", "run.name=fsdp"])
    out = pretrain(cfg, tracking_uri=sqlite_store(tmp_path / "m.db"))
    assert out.step == 20
    from pipeline.weights import load_vit

    assert load_vit(out.checkpoint).cfg == cfg.model


def test_fsdp2_bf16_mixed_precision_on_one_gpu_matches_the_plain_step():
    """FSDP2 with the bf16 policy (bf16 parameters and compute, fp32 reductions and master
    weights) against the plain module under bf16 autocast: the same losses to bf16 rounding."""
    from tests.pipeline.train.test_units import _fsdp_one_process

    for plain, sharded in _fsdp_one_process("cuda", torch.bfloat16):
        assert sharded == pytest.approx(plain, rel=2e-2)


def test_augreg_on_the_gpu_equals_the_cpu():
    """RandAugment + Mixup on a CUDA batch give what they give on the CPU (same draws; the
    8-bit rounding absorbs float differences up to a level)."""
    from pipeline.data.augreg import BatchAugment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 224, 224, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 1000, (256,), generator=g)
    aug = BatchAugment(2, 15, 0.2)
    x_cpu, y_cpu = aug(images, labels, 1000, aug.rng(0, 0, 0, 0))
    x_gpu, y_gpu = aug(images.cuda(), labels.cuda(), 1000, aug.rng(0, 0, 0, 0))
    levels = ((x_gpu.cpu() - x_cpu).abs() * 127.5)
    assert levels.max() <= 1.01 and (levels > 0.5).float().mean() < 1e-3
    assert torch.allclose(y_gpu.cpu(), y_cpu)
