"""Fine-tuning maths without Ray: the zero-initialised head, the resolution change, the batch
augmentation, gradient accumulation, learning, divergence; and the learning-rate choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import finetune as ft
from eval.finetune import FinetuneConfig, FinetuneError, augment_batch, build_model
from eval.sweep import SweepConfig, choose_lrs
from pipeline.model import ViT, ViTConfig


def pretrained(image_size=32, patch=8, **kw):
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=32, depth=2,
                    num_heads=2, mlp_dim=64, num_classes=10, representation_size=32, **kw)
    model = ViT(cfg)
    # A trained-looking head: non-zero weights that fine-tuning must remove.
    torch.nn.init.normal_(model.head.weight)
    return cfg.to_dict(), model.state_dict()


def test_zero_initialised_head_predicts_uniformly_at_step_0():
    config, state = pretrained()
    model = build_model(config, state, num_classes=7, resolution=32)
    assert model.pre_logits is None                        # the whole head is gone
    assert model.head.weight.shape == (7, 32)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    probs = model(x).softmax(-1)
    torch.testing.assert_close(probs, torch.full((5, 7), 1 / 7))
    # ... while the backbone is the pre-trained one, unchanged.
    for key in ("pos_embed", "blocks.0.attn.qkv.weight", "norm.weight"):
        torch.testing.assert_close(model.state_dict()[key], state[key])


def test_224_to_384_resamples_the_position_embedding():
    """ViT-Ti/16 pre-trained at 224 px (14 x 14 patches), fine-tuned at 384 (24 x 24): the
    class token is kept and the grid is zoomed bilinearly, as vit_jax's scipy zoom."""
    from scipy import ndimage

    torch.manual_seed(0)
    cfg = ViTConfig.from_variant("Ti/16", image_size=224, num_classes=10)
    state = ViT(cfg).state_dict()
    model = build_model(cfg.to_dict(), state, num_classes=3, resolution=384)
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 24 * 24, 192)
    torch.testing.assert_close(pos[0, 0], state["pos_embed"][0, 0])
    grid = state["pos_embed"][0, 1:].reshape(14, 14, 192).double().numpy()
    want = ndimage.zoom(grid, (24 / 14, 24 / 14, 1), order=1)
    np.testing.assert_allclose(pos[0, 1:].reshape(24, 24, 192).numpy(), want, atol=1e-5)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 384, 384)).shape == (1, 3)


def test_augment_batch_crops_inside_and_flips():
    gen = torch.Generator().manual_seed(0)
    base = torch.arange(10 * 10, dtype=torch.int64).reshape(1, 10, 10, 1).repeat(64, 1, 1, 3)
    out = augment_batch(base, 8, crop=True, flip=False, gen=gen)
    assert out.shape == (64, 8, 8, 3)
    for img in out[..., 0]:
        y, x = divmod(int(img[0, 0]), 10)
        assert 0 <= y <= 2 and 0 <= x <= 2
        assert torch.equal(img, base[0, y:y + 8, x:x + 8, 0])      # a contiguous window
    flipped = augment_batch(base[:, :8, :8], 8, crop=False, flip=True, gen=gen)
    same = [torch.equal(f, base[0, :8, :8]) for f in flipped]
    mirrored = [torch.equal(f, base[0, :8, :8].flip(1)) for f in flipped]
    assert all(a or b for a, b in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 54                                 # about half
    with pytest.raises(ValueError, match="training images are 10 px, expected 8"):
        augment_batch(base, 8, crop=False, flip=False, gen=gen)


def separable(n=64, size=16, seed=0):
    """Two classes: bright or dark images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = np.where(labels[:, None, None, None] == 1, 200, 50) + rng.integers(-30, 30, (
        n, size, size, 3))
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


def test_accumulated_batch_equals_the_whole_batch():
    config, state = pretrained(image_size=16, patch=8)
    images, labels = separable()
    params = []
    for micro in (32, 8):
        model = build_model(config, state, 2, 16)
        cfg = FinetuneConfig(resolution=16, steps=3, warmup_steps=1, batch_size=32,
                             micro_batch_size=micro)
        ft.finetune(model, images, labels, cfg, lr=0.1, seed=0, crop=False, flip=True)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-5, rtol=1e-4)


def test_finetuning_learns_a_separable_task():
    config, state = pretrained(image_size=16, patch=8)
    images, labels = separable(128)
    test_images, test_labels = separable(64, seed=1)
    model = build_model(config, state, 2, 16)
    before = ft.top1(ft.predict(model, [test_images]), test_labels)
    seen = []
    cfg = FinetuneConfig(resolution=16, steps=40, warmup_steps=5, batch_size=32)
    stats = ft.finetune(model, images, labels, cfg, lr=0.03, seed=0, crop=False, flip=True,
                        progress=lambda s, loss: seen.append(s), progress_every=10)
    assert seen == [10, 20, 30, 40]
    assert stats["train_loss"] < 0.3
    after = ft.top1(ft.predict(model, [test_images[:30], test_images[30:]]), test_labels)
    assert before < 70 and after > 95


def test_a_diverging_learning_rate_stops_with_the_step():
    config, state = pretrained(image_size=16, patch=8)
    images, labels = separable()
    model = build_model(config, state, 2, 16)
    # Clipping at norm 1 keeps any finite rate from overflowing in a few steps.
    with pytest.raises(FinetuneError, match=r"non-finite loss at step 2 \(lr inf\)"):
        ft.finetune(model, images, labels,
                    FinetuneConfig(resolution=16, steps=20, warmup_steps=0, batch_size=32),
                    lr=float("inf"), seed=0, crop=False, flip=False)


def records(scores):
    return [{"task": t, "lr": lr, "top1": v} for (t, lr), v in scores.items()]


def test_choice_of_learning_rate():
    scores = {("dtd", 0.01): 50.0, ("dtd", 0.03): 60.0,
              ("kitti", 0.01): 90.0, ("kitti", 0.03): 70.0}
    cfg = SweepConfig(tasks=("dtd", "kitti"), lrs=(0.01, 0.03))
    # vit: one rate for all, best on average (0.01: 70, 0.03: 65)
    assert choose_lrs(cfg, records(scores)) == {"dtd": 0.01, "kitti": 0.01}
    per_task = SweepConfig(tasks=("dtd", "kitti"), lrs=(0.01, 0.03), protocol="per-task")
    assert choose_lrs(per_task, records(scores)) == {"dtd": 0.03, "kitti": 0.01}
    # a diverged run (nan) never wins; ties go to the smaller rate
    scores[("kitti", 0.01)] = float("nan")
    assert choose_lrs(per_task, records(scores))["kitti"] == 0.03
    tie = {("dtd", 0.01): 50.0, ("dtd", 0.03): 50.0, ("kitti", 0.01): 5.0,
           ("kitti", 0.03): 5.0}
    assert choose_lrs(cfg, records(tie)) == {"dtd": 0.01, "kitti": 0.01}
