"""The ViT of the paper: shapes, gradients, published parameter counts, heads, resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from pipeline.model import ViT, ViTConfig, resample_pos_embed

TINY = dict(patch_size=8, hidden_size=48, depth=2, num_heads=3, mlp_dim=96, image_size=32,
            num_classes=7)


def tiny(**kw) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**TINY, **kw}))


@pytest.mark.parametrize("kw", [{}, {"representation_size": 40}, {"pool": "gap"},
                                {"dropout": 0.1, "attention_dropout": 0.1}])
def test_outputs_are_finite_and_shaped(kw):
    model = tiny(**kw)
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    feats = model.forward_features(x)
    assert feats.shape == (3, 48)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (3, kw.get("representation_size", 48))


@pytest.mark.parametrize("kw", [{}, {"representation_size": 40}, {"pool": "gap"}])
def test_every_parameter_receives_a_gradient(kw):
    model = tiny(dropout=0.1, **kw)
    # The head is zero-initialised (vit_jax), which blocks gradients to the body at step 0;
    # give it values so that every parameter is reachable.
    torch.nn.init.normal_(model.head.weight, std=0.1)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("variant,count", [("Ti/16", 5_717_416), ("S/16", 22_050_664),
                                           ("B/16", 86_567_656)])
def test_parameter_counts_match_published(variant, count):
    with torch.device("meta"):
        model = ViT(ViTConfig.from_variant(variant, num_classes=1000))
    assert sum(p.numel() for p in model.parameters()) == count


def test_variant_table():
    cfg = ViTConfig.from_variant("L/16")
    assert (cfg.depth, cfg.hidden_size, cfg.mlp_dim, cfg.num_heads) == (24, 1024, 4096, 16)
    cfg = ViTConfig.from_variant("H/14")
    assert (cfg.depth, cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.patch_size) == (
        32, 1280, 5120, 16, 14)
    assert ViTConfig.from_variant("B/32").variant == "B/32"
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        ViTConfig.from_variant("X/16")
    with pytest.raises(ValueError, match=r"smaller than one patch \(16 px\)"):
        ViTConfig.from_variant("B/16", image_size=8)


def test_a_size_that_is_not_a_multiple_of_the_patch_drops_the_remainder():
    """H/14 at 384 px, as vit_jax runs it (VALID convolution): 27 x 27 patches, the same
    model as at 378 px on the image without its last 6 rows and columns."""
    small = ViTConfig(patch_size=14, hidden_size=32, depth=1, num_heads=2, mlp_dim=64,
                      num_classes=5)
    at_384 = ViT(small.replace(image_size=384)).eval()
    assert at_384.cfg.grid_size == 27 and at_384.pos_embed.shape[1] == 27 * 27 + 1
    at_378 = ViT(small.replace(image_size=378)).eval()
    at_378.load_state_dict(at_384.state_dict())
    torch.nn.init.normal_(at_384.head.weight)
    at_378.head.weight.data.copy_(at_384.head.weight)
    x = torch.randn(2, 3, 384, 384)
    torch.testing.assert_close(at_384(x), at_378(x[:, :, :378, :378]))
    assert not torch.allclose(at_384(x), at_378(x[:, :, 6:, 6:]))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTConfig(hidden_size=50, num_heads=3)


def test_reset_head_gives_exactly_zero_logits():
    model = tiny(representation_size=40)
    torch.nn.init.normal_(model.head.weight)
    assert model(torch.randn(2, 3, 32, 32)).abs().sum() > 0
    model.reset_head(5)
    assert model.pre_logits is None, "the whole pre-training head must go"
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    assert torch.equal(logits, torch.zeros(2, 5))
    assert model.cfg.num_classes == 5 and model.cfg.representation_size is None
    # Zero logits -> uniform prediction: cross-entropy is exactly log(K).
    loss = F.cross_entropy(logits, torch.tensor([0, 3]))
    assert math.isclose(loss.item(), math.log(5), rel_tol=1e-6)


def test_init_follows_reference_code():
    torch.manual_seed(0)
    model = ViT(ViTConfig.from_variant("S/16", representation_size=384))
    D = model.cfg.hidden_size
    assert torch.equal(model.cls_token, torch.zeros_like(model.cls_token))
    assert torch.equal(model.head.weight, torch.zeros_like(model.head.weight))
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    blk = model.blocks[0]
    # Xavier uniform per D x D projection: bound sqrt(6 / (D + D)).
    bound = math.sqrt(6 / (2 * D))
    for i in range(3):
        w = blk.attn.qkv.weight[i * D:(i + 1) * D]
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert blk.mlp.fc1.bias.abs().max() < 1e-5 and blk.mlp.fc1.bias.abs().max() > 0
    # LeCun normal on the patch embedding: std sqrt(1 / fan_in).
    fan_in = 3 * 16 * 16
    assert abs(model.patch_embed.weight.std().item() - math.sqrt(1 / fan_in)) < 0.003


def test_dropout_only_where_the_paper_puts_it():
    model = tiny(dropout=0.5)
    drops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    expected = {"pos_drop"} | {f"blocks.{i}.{s}" for i in range(2)
                               for s in ("attn.proj_drop", "mlp.drop")}
    assert set(drops) == expected
    x = torch.randn(2, 3, 32, 32)
    torch.nn.init.normal_(model.head.weight)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_attention_maps_are_the_softmax_sdpa_uses():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    N = model.cfg.num_patches + 1
    assert len(maps) == 2 and all(m.shape == (2, 3, N, N) for m in maps)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 3, N))
    # attention @ v through the explicit map equals the fused SDPA output of layer 0.
    blk = model.blocks[0]
    h = blk.norm1(model.embed(x))
    _, _, v = blk.attn._qkv(h)
    manual = (maps[0] @ v).transpose(1, 2).reshape(2, N, -1)
    torch.testing.assert_close(blk.attn.proj(manual), blk.attn(h), atol=1e-5, rtol=1e-5)


def test_no_weight_decay_rule():
    model = tiny(representation_size=40)
    decay, no_decay = model.param_groups(weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= skipped
    assert {"patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
            "pre_logits.weight", "head.weight"} <= decayed
    assert decayed.isdisjoint(skipped)
    assert len(decayed) + len(skipped) == len(list(model.parameters()))
    assert model.no_weight_decay() == skipped


def test_resample_is_identity_at_same_size():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert torch.equal(resample_pos_embed(pos, 14), pos)


@pytest.mark.parametrize("old,new", [(14, 24), (14, 7), (7, 10), (4, 13)])
@pytest.mark.parametrize("prefix", [1, 0])
def test_resample_matches_scipy_zoom(old, new, prefix):
    rng = np.random.default_rng(old * new)
    pos = rng.normal(size=(1, prefix + old * old, 16))
    # vit_jax `interpolate_posembed`: zoom the (g, g, D) grid with order=1, class token aside.
    grid = pos[0, prefix:].reshape(old, old, 16)
    ref = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(new * new, 16)
    ref = np.concatenate([pos[0, :prefix], ref])[None]
    ours = resample_pos_embed(torch.from_numpy(pos).float(), new, prefix)
    assert ours.shape == (1, prefix + new * new, 16)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6)
    if prefix:  # the class-token embedding is kept exactly
        assert torch.equal(ours[:, 0], torch.from_numpy(pos[:, 0]).float())


def test_set_image_size_runs_at_the_new_resolution():
    model = tiny()
    with pytest.raises(ValueError, match="resample the position embedding"):
        model(torch.randn(1, 3, 48, 48))
    model.set_image_size(48)
    assert model.pos_embed.shape == (1, 1 + 36, 48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_first_token_path_is_exact():
    """forward_features skips the last block's work for patch tokens; it must not change y."""
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    full = model.encode(model.embed(x))[:, 0]                  # every token through every block
    torch.testing.assert_close(model.forward_features(x), full, atol=1e-6, rtol=1e-6)
