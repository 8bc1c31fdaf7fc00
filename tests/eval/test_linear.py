"""The `linear` protocol's maths and features (eval/linear.py), without Ray."""

from __future__ import annotations

import numpy as np
import torch

from eval.config import PRESETS
from eval.data import Encoded, decode, read_encoded, write_grating_task
from eval.linear import L2_GRID, choose_l2, feature_model, features, probe
from eval.report import choices
from eval.tasks import BY_NAME
from pipeline.model import ViT, ViTConfig


def clusters(n: int, num_classes: int, dim: int, seed: int, spread: float = 0.3):
    """Gaussian clusters around one centre per class (the same centres for every seed)."""
    centres = np.random.default_rng(123).normal(0, 3, (num_classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    x = centres[labels] + rng.normal(0, spread, (n, dim))
    return torch.tensor(x, dtype=torch.float32), labels


def test_linearly_separable_features_score_100_percent():
    xt, yt = clusters(80, 5, 16, seed=1)
    xv, yv = clusters(20, 5, 16, seed=2)
    xs, ys = clusters(200, 5, 16, seed=3)
    out = probe(xt, yt, xv, yv, xs, ys, num_classes=5)
    assert out["top1"] == 100.0
    assert out["l2"] in L2_GRID and set(out["val200"]) == set(L2_GRID)


def test_random_labels_score_about_chance():
    xt, _ = clusters(400, 4, 8, seed=1, spread=3.0)
    xv, _ = clusters(100, 4, 8, seed=2, spread=3.0)
    xs, _ = clusters(2000, 4, 8, seed=3, spread=3.0)
    rng = np.random.default_rng(0)
    out = probe(xt, rng.integers(0, 4, 400), xv, rng.integers(0, 4, 100), xs,
                rng.integers(0, 4, 2000), num_classes=4)
    assert 15 < out["top1"] < 35


def test_the_regulariser_is_chosen_on_val_never_on_test():
    """Noisy, high-dimensional features, so that the L2 matters; the test labels then
    changed from true to shuffled leave the choice alone, and the chosen L2 is the one best on
    val200."""
    xt, yt = clusters(60, 3, 64, seed=1, spread=4.0)
    xv, yv = clusters(30, 3, 64, seed=2, spread=4.0)
    xs, ys = clusters(300, 3, 64, seed=3, spread=4.0)
    true = probe(xt, yt, xv, yv, xs, ys, num_classes=3)
    shuffled = probe(xt, yt, xv, yv, xs, np.random.default_rng(0).permutation(ys),
                     num_classes=3)
    assert true["l2"] == shuffled["l2"] and true["val200"] == shuffled["val200"]
    best, val = choose_l2(xt, yt, xv, yv, 3)
    assert true["l2"] == best and val[best] == max(val.values())
    assert len(set(val.values())) > 1          # the regulariser did matter here


def test_features_are_the_pre_logits_of_a_generated_task(tmp_path):
    """A tiny ViT with a representation layer on a generated task's real JPEG files: the
    features are its tanh pre-logits (the head's input), and the probe runs end to end."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, depth=1, num_heads=2,
                    mlp_dim=64, num_classes=10, representation_size=24)
    vit = ViT(cfg)
    task = BY_NAME["eurosat"]
    root = tmp_path / "vtab"
    write_grating_task(root, task, train=40, val=20, test=30, image_size=32)
    model = feature_model(cfg.to_dict(), vit.state_dict(), resolution=32)
    enc = read_encoded(root, task, "test")
    images = decode(Encoded(enc.images[:7], enc.labels[:7]), 32).images
    feats = features(model, images, batch_size=3)
    assert feats.shape == (7, 24) and feats.abs().max() <= 1.0     # tanh
    with torch.no_grad():
        x = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        assert torch.allclose(vit.forward_head(vit.forward_features(x), pre_logits=True),
                              feats, atol=1e-4)

    def split(name):
        s = decode(read_encoded(root, task, name), 32)
        return features(model, s.images), np.asarray(s.labels)

    (xt, yt), (xv, yv), (xs, ys) = split("train800"), split("val200"), split("test")
    out = probe(xt, yt, xv, yv, xs, ys, task.num_classes)
    assert 0 <= out["top1"] <= 100 and out["l2"] in L2_GRID


def test_the_linear_preset_names_its_protocol():
    cfg = PRESETS["linear"]()
    assert cfg.sweep.protocol == "linear" and cfg.sweep.test_images == 2000
    assert any("linear probe" in line for line in choices(cfg))

