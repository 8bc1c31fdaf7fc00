"""GPU path of VTAB fine-tuning: bf16 autocast, the micro-batch that halves after an
out-of-memory error. Skipped without CUDA (CI has none); `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import finetune as ft
from pipeline.model import ViT, ViTConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_finetuning_on_gpu_learns():
    torch.manual_seed(0)
    cfg = ViTConfig.from_variant("S/16", image_size=224, num_classes=10)
    model = ft.build_model(cfg.to_dict(), ViT(cfg).state_dict(), 2, 224)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    images = np.where(labels[:, None, None, None] == 1, 200, 50).astype(np.uint8) \
        .repeat(224, 1).repeat(224, 2).repeat(3, 3)
    dtypes = []
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    stats = ft.finetune(model, images, labels,
                        ft.FinetuneConfig(resolution=224, steps=20, warmup_steps=2,
                                          batch_size=64),
                        lr=0.01, seed=0, crop=False, flip=True, device="cuda")
    assert dtypes[0] == torch.bfloat16
    assert stats["micro_batch_size"] == 64          # fits whole on any GPU
    preds = ft.predict(model, [images[:64]], "cuda")
    assert ft.top1(preds, labels[:64]) > 95


def test_micro_batch_halves_until_it_fits():
    """A memory cap small enough that the whole batch of ViT-B at 384 px cannot fit."""
    torch.manual_seed(0)
    cfg = ViTConfig.from_variant("B/16", image_size=384, num_classes=10)
    model = ft.build_model(cfg.to_dict(), ViT(cfg).state_dict(), 2, 384)
    images = np.zeros((256, 384, 384, 3), np.uint8)
    labels = np.zeros(256, np.int64)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 12 * 2**30 / total))
    try:
        stats = ft.finetune(model, images, labels,
                            ft.FinetuneConfig(resolution=384, steps=2, warmup_steps=0,
                                              batch_size=256),
                            lr=0.01, seed=0, crop=False, flip=False, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert stats["micro_batch_size"] < 256


def test_analysis_on_gpu_in_bf16_agrees_with_cpu_fp32():
    """jobs/analyze.py's GPU path: bf16 forward, fp32 measures; the mean attention distance
    and the rollout agree with the CPU's fp32 within bf16's precision."""
    from pipeline import analysis

    torch.manual_seed(0)
    model = ViT(ViTConfig(patch_size=16, hidden_size=192, depth=4, num_heads=3, mlp_dim=768,
                          image_size=224, num_classes=0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    images = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)

    def run(device, bf16):
        return analysis.analyze(model, iter([([str(i) for i in range(16)], images)]),
                                device=device, bf16=bf16, keep=4)

    cpu, gpu = run("cpu", False), run("cuda", True)
    np.testing.assert_allclose(gpu.mean_distance, cpu.mean_distance, rtol=0.03)
    np.testing.assert_allclose(gpu.rollout, cpu.rollout, atol=0.1 * cpu.rollout.max())
