"""The paper's hybrids (§3.1): vit_jax's ResNet stem (post-activation, BiT's StdConv and
GroupNorm) + ViT. The ResNet against transformers' `BitModel` on the same weights, the whole
hybrid imported from the authors' .npz names against a NumPy transcription of vit_jax's
forward, timm's names, parameter counts from the authors' checkpoint shapes, FLOPs against
PyTorch's counter, and the downstream paths (checkpoints, resolution, fine-tuning head,
few-shot features, inspection, export)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model import HYBRID_RESNETS, VARIANTS, StdConv2d, ViT, ViTConfig, pad_same
from pipeline.weights import CheckpointError, export_vit, load_vit, save_vit
from tests.pipeline.test_checkpoint import vit_jax_forward, vit_jax_params

TINY = dict(patch_size=1, hidden_size=48, depth=2, num_heads=3, mlp_dim=96, image_size=32,
            num_classes=5, resnet_layers=(1, 2), resnet_width=32)


def tiny(**kw) -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():                # away from the init (gn3 at 0 hides the units)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------
# Names, shapes, counts
# ---------------------------------------------------------------------------------------------
def test_variant_names_as_the_paper_writes_them():
    cfg = ViTConfig.from_variant("R50+B/16", num_classes=10)
    assert (cfg.resnet_layers, cfg.patch_size, cfg.effective_patch_size, cfg.grid_size) == (
        (3, 4, 9), 1, 16, 14)
    assert cfg.variant == "R50+B/16"
    assert ViTConfig.from_variant("R50+ViT-L/32").resnet_layers == (3, 4, 6, 3)
    assert ViTConfig.from_variant("R26+S/32").variant == "R26+S/32"
    assert ViTConfig.from_variant("R50+B/16", image_size=384).grid_size == 24
    # "SAME" layers round up: 200 px -> 100 -> 50 -> 25 -> 13.
    assert ViTConfig.from_variant("R50+B/16", image_size=200).grid_size == 13
    with pytest.raises(ValueError, match="unknown hybrid 'R26\\+B/16'"):
        ViTConfig.from_variant("R26+B/16")
    with pytest.raises(ValueError, match="multiple of 32"):
        ViTConfig(**{**TINY, "resnet_width": 48})


def vit_jax_hybrid_shapes(variant: str, num_classes: int, rep: int | None) -> dict:
    """Every parameter of vit_jax's `VisionTransformer` with a ResNet, with its shape, written
    out from `models_resnet.py` (ResidualUnit, ResNetStage) and `models_vit.py` (root block,
    embedding, Encoder) without using the code under test."""
    name, size = variant.split("+")
    layers = HYBRID_RESNETS[(name, int(size.split("/")[1]))]
    L, D, M, H = VARIANTS[size.split("/")[0]]
    shapes = {"conv_root/kernel": (7, 7, 3, 64), "gn_root/scale": (64,), "gn_root/bias": (64,)}
    cin = 64
    for i, units in enumerate(layers):
        w = 64 * 2**i
        for j in range(units):
            pre = f"block{i + 1}/unit{j + 1}/"
            if j == 0:
                shapes[pre + "conv_proj/kernel"] = (1, 1, cin, 4 * w)
                shapes[pre + "gn_proj/scale"] = shapes[pre + "gn_proj/bias"] = (4 * w,)
            shapes[pre + "conv1/kernel"] = (1, 1, cin if j == 0 else 4 * w, w)
            shapes[pre + "conv2/kernel"] = (3, 3, w, w)
            shapes[pre + "conv3/kernel"] = (1, 1, w, 4 * w)
            for g, c in (("gn1", w), ("gn2", w), ("gn3", 4 * w)):
                shapes[f"{pre}{g}/scale"] = shapes[f"{pre}{g}/bias"] = (c,)
        cin = 4 * w
    grid = 224 // int(size.split("/")[1])
    shapes.update({"embedding/kernel": (1, 1, cin, D), "embedding/bias": (D,), "cls": (1, 1, D),
                   "Transformer/posembed_input/pos_embedding": (1, grid * grid + 1, D),
                   "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,)})
    for b in range(L):
        pre = f"Transformer/encoderblock_{b}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{pre}{ln}/scale"] = shapes[f"{pre}{ln}/bias"] = (D,)
        for x in ("query", "key", "value"):
            shapes[f"{pre}MultiHeadDotProductAttention_1/{x}/kernel"] = (D, H, D // H)
            shapes[f"{pre}MultiHeadDotProductAttention_1/{x}/bias"] = (H, D // H)
        shapes[f"{pre}MultiHeadDotProductAttention_1/out/kernel"] = (H, D // H, D)
        shapes[f"{pre}MultiHeadDotProductAttention_1/out/bias"] = (D,)
        shapes[f"{pre}MlpBlock_3/Dense_0/kernel"] = (D, M)
        shapes[f"{pre}MlpBlock_3/Dense_0/bias"] = (M,)
        shapes[f"{pre}MlpBlock_3/Dense_1/kernel"] = (M, D)
        shapes[f"{pre}MlpBlock_3/Dense_1/bias"] = (D,)
    if rep:
        shapes["pre_logits/kernel"], shapes["pre_logits/bias"] = (D, rep), (rep,)
    shapes["head/kernel"], shapes["head/bias"] = (rep or D, num_classes), (num_classes,)
    return shapes


@pytest.mark.parametrize("variant", ["R50+B/16", "R50+L/32", "R26+S/32", "R26+B/32"])
def test_parameter_counts_are_those_of_the_authors_checkpoints(variant):
    # The released i21k checkpoints: pre-logits of width D and 21,843 classes.
    D = VARIANTS[variant.split("+")[1].split("/")[0]][1]
    shapes = vit_jax_hybrid_shapes(variant, 21843, D)
    with torch.device("meta"):
        model = ViT(ViTConfig.from_variant(variant, num_classes=21843, representation_size=D))
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s)
                                                             for s in shapes.values())
    resnet = sum(math.prod(s) for k, s in shapes.items() if k.startswith(("conv_root",
                                                                        "gn_root", "block")))
    assert sum(p.numel() for p in model.resnet.parameters()) == resnet


def test_flops_count_the_resnet_as_pytorchs_counter_does():
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.perf import resnet_macs

    for variant, size in (("R50+B/16", 224), ("R26+S/32", 160), ("R50+B/16", 200)):
        cfg = ViTConfig.from_variant(variant, image_size=size)
        with torch.device("meta"):
            model = ViT(cfg)
        with FlopCounterMode(display=False) as counter:
            model.resnet(torch.empty(1, 3, size, size, device="meta"))
        assert 2 * resnet_macs(cfg)[0] == counter.get_total_flops(), (variant, size)


# ---------------------------------------------------------------------------------------------
# The ResNet against transformers' BitModel, on the same weights
# ---------------------------------------------------------------------------------------------
def test_resnet_matches_transformers_bitmodel():
    """transformers' `BitModel` with layer_type="bottleneck" (post-activation; "preactivation"
    is BiT's own) and "SAME" padding is the hybrid's ResNet. It standardises weights as
    (w - mean) / sqrt(var + eps) and uses GroupNorm eps 1e-5, where vit_jax divides by
    std + 1e-5 and uses 1e-6: both sides get (nearly) 0 and 1e-6 here, so the comparison is of
    everything else, and exact."""
    from transformers import BitConfig, BitModel

    torch.manual_seed(0)
    bit = BitModel(BitConfig(num_channels=3, embedding_size=32, hidden_sizes=[128, 256],
                             depths=[1, 2], layer_type="bottleneck", global_padding="SAME",
                             embedding_dynamic_padding=True)).eval()
    with torch.no_grad():
        for p in bit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for m in bit.modules():
        if type(m).__name__ == "WeightStandardizedConv2d":
            m.eps = 1e-20                  # > 0 for batch_norm; sqrt(var + 1e-20) = std
        elif isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-6
    ours = tiny().resnet
    for m in ours.modules():
        if isinstance(m, StdConv2d):
            m.eps = 0.0
    names = {"embedder.convolution.weight": "conv_root.weight",
             "embedder.norm.weight": "gn_root.weight", "embedder.norm.bias": "gn_root.bias"}
    for key in bit.state_dict():
        if key.startswith("encoder.stages."):
            parts = key.split(".")                 # encoder.stages.i.layers.j.<module>.<param>
            i, j, rest = parts[2], parts[4], ".".join(parts[5:])
            rest = (rest.replace("downsample.conv", "conv_proj")
                    .replace("downsample.norm", "gn_proj").replace("norm", "gn"))
            names[key] = f"stages.{i}.{j}.{rest}"
    theirs = bit.state_dict()
    assert sorted(names.values()) == sorted(ours.state_dict())
    ours.load_state_dict({names[k]: v for k, v in theirs.items()}, strict=True)
    bit, ours = bit.double(), ours.double()         # float64: the comparison is exact
    for size in (32, 37):                           # odd: "SAME" puts the extra pad bottom-right
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        with torch.no_grad():
            expected = bit(pixel_values=x).last_hidden_state
            got = ours(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# The whole hybrid from the authors' .npz names, against a NumPy transcription of vit_jax
# ---------------------------------------------------------------------------------------------
def np_pad_same(x, k, s, value=0.0):
    """flax/TF "SAME" (NHWC): ceil(n / s) outputs, the odd padding at the end."""
    H, W = x.shape[1:3]
    ph = max((math.ceil(H / s) - 1) * s + k - H, 0)
    pw = max((math.ceil(W / s) - 1) * s + k - W, 0)
    return np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                  constant_values=value)


def np_std_conv(x, kernel, stride):
    """vit_jax StdConv: weight_standardize(kernel, axis=[0, 1, 2], eps=1e-5), SAME, no bias."""
    w = kernel - kernel.mean(axis=(0, 1, 2))
    w = w / (w.std(axis=(0, 1, 2)) + 1e-5)
    k = w.shape[0]
    x = np_pad_same(x, k, stride)
    oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += x[:, i:i + stride * oh:stride, j:j + stride * ow:stride] @ w[i, j]
    return out


def np_group_norm(x, scale, bias, groups=32, eps=1e-6):
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(B, H, W, C) * scale + bias


def np_resnet(p, x, layers):
    """vit_jax's root block and ResNetStage / ResidualUnit, NHWC."""
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    x = relu(np_group_norm(np_std_conv(x, p["conv_root/kernel"], 2), p["gn_root/scale"],
                           p["gn_root/bias"]))
    x = np_pad_same(x, 3, 2, -np.inf)                               # nn.max_pool, SAME
    oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    x = np.max([x[:, i:i + 2 * oh:2, j:j + 2 * ow:2] for i in range(3) for j in range(3)], 0)
    for i, units in enumerate(layers):
        for j in range(units):
            u = f"block{i + 1}/unit{j + 1}/"
            stride = 2 if (i > 0 and j == 0) else 1
            gn = lambda a, n, u=u: np_group_norm(a, p[u + n + "/scale"], p[u + n + "/bias"])  # noqa: E731
            residual = x
            if u + "conv_proj/kernel" in p:
                residual = gn(np_std_conv(x, p[u + "conv_proj/kernel"], stride), "gn_proj")
            y = relu(gn(np_std_conv(x, p[u + "conv1/kernel"], 1), "gn1"))
            y = relu(gn(np_std_conv(y, p[u + "conv2/kernel"], stride), "gn2"))
            y = gn(np_std_conv(y, p[u + "conv3/kernel"], 1), "gn3")
            x = relu(residual + y)
    return x


def jax_hybrid_params(rng, layers=(1, 2), width=32, grid=4):
    n = lambda *s: rng.normal(0, 0.2, s)  # noqa: E731
    p = {"conv_root/kernel": n(7, 7, 3, width), "gn_root/scale": 1 + n(width),
         "gn_root/bias": n(width)}
    cin = width
    for i, units in enumerate(layers):
        w = width * 2**i
        for j in range(units):
            u = f"block{i + 1}/unit{j + 1}/"
            if j == 0:
                p[u + "conv_proj/kernel"] = n(1, 1, cin, 4 * w)
                p[u + "gn_proj/scale"], p[u + "gn_proj/bias"] = 1 + n(4 * w), n(4 * w)
            p[u + "conv1/kernel"] = n(1, 1, cin if j == 0 else 4 * w, w)
            p[u + "conv2/kernel"] = n(3, 3, w, w)
            p[u + "conv3/kernel"] = n(1, 1, w, 4 * w)
            for g, c in (("gn1", w), ("gn2", w), ("gn3", 4 * w)):
                p[f"{u}{g}/scale"], p[f"{u}{g}/bias"] = 1 + n(c), n(c)
        cin = 4 * w
    p.update({k: v.astype(np.float64) for k, v in
              vit_jax_params(rng, D=48, H=3, L=2, M=96, P=1, C=cin, grid=grid).items()})
    return p


@pytest.mark.parametrize("size", [32, 36])
def test_npz_hybrid_matches_a_numpy_transcription_of_vit_jax(tmp_path, size):
    rng = np.random.default_rng(0)
    grid = {32: 4, 36: 5}[size]          # three "SAME" halvings: 36 -> 18 -> 9 -> 5
    params = jax_hybrid_params(rng, grid=grid)
    np.savez(tmp_path / "R-tiny.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    model = load_vit(tmp_path / "R-tiny.npz", image_size=size).double().eval()
    assert model.cfg.resnet_layers == (1, 2) and model.cfg.resnet_width == 32
    assert model.cfg.grid_size == grid
    images = rng.uniform(-1, 1, (2, size, size, 3))
    ref_params = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    features = np_resnet(ref_params, images, (1, 2))
    assert features.shape == (2, grid, grid, 256)
    expected = vit_jax_forward(ref_params, features)
    with torch.no_grad():
        got = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-7)
    # Every array was used, and nothing else is in the model.
    assert sum(p.numel() for p in model.parameters()) == sum(v.size for v in params.values())


def test_npz_with_a_stray_resnet_array_is_refused(tmp_path):
    params = jax_hybrid_params(np.random.default_rng(1))
    params["block2/unit3/conv9/kernel"] = np.zeros((1, 1, 2, 2))
    np.savez(tmp_path / "bad.npz", **params)
    with pytest.raises(CheckpointError, match="unexpected keys.*block2/unit3/conv9"):
        load_vit(tmp_path / "bad.npz")


def test_pad_same_puts_the_odd_row_at_the_bottom():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    padded = pad_same(x, 3, 2)                     # total 1: none on top, one at the bottom
    assert padded.shape == (1, 1, 5, 5)
    assert torch.equal(padded[0, 0, :4, :4], x[0, 0]) and padded[0, 0, 4].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# timm's names
# ---------------------------------------------------------------------------------------------
# The backbone keys of a timm hybrid with layers (1, 2), written out from timm's resnetv2.py
# (create_resnetv2_stem 'same' with preact=False: stem.conv, stem.norm; ResNetStage.blocks;
# Bottleneck conv1-3 / norm1-3; DownsampleConv conv / norm on each stage's first block).
TIMM_BACKBONE = ["stem.conv.weight", "stem.norm.weight", "stem.norm.bias"] + [
    f"stages.{i}.blocks.{j}.{m}" for i, units in enumerate((1, 2)) for j in range(units)
    for m in ((["downsample.conv.weight", "downsample.norm.weight", "downsample.norm.bias"]
               if j == 0 else [])
              + ["conv1.weight", "norm1.weight", "norm1.bias", "conv2.weight", "norm2.weight",
                 "norm2.bias", "conv3.weight", "norm3.weight", "norm3.bias"])]


def timm_state(model: ViT) -> dict:
    """Our hybrid's weights under timm's names (the mapping written out here, from timm)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("resnet."):
            rest = key[len("resnet."):]
            rest = rest.replace("conv_root.", "stem.conv.").replace("gn_root.", "stem.norm.")
            parts = rest.split(".")
            if parts[0] == "stages":
                module = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}.get(
                    parts[3], parts[3].replace("gn", "norm"))
                rest = f"stages.{parts[1]}.blocks.{parts[2]}.{module}.{parts[4]}"
            out["patch_embed.backbone." + rest] = value
        elif key.startswith("patch_embed."):
            out[key.replace("patch_embed.", "patch_embed.proj.")] = value
        else:
            out[key] = value
    return out


def test_timm_hybrid_state_dict_imports(tmp_path):
    from safetensors.torch import save_file

    ours = tiny()
    state = timm_state(ours)
    assert sorted(k[len("patch_embed.backbone."):] for k in state
                  if k.startswith("patch_embed.backbone.")) == sorted(TIMM_BACKBONE)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "timm.safetensors"))
    loaded = load_vit(tmp_path / "timm.safetensors", num_heads=3).eval()
    assert loaded.cfg.resnet_layers == (1, 2) and loaded.cfg.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))
    # A key timm's backbone does not have is named, not silently dropped.
    state["patch_embed.backbone.stages.1.blocks.1.se.fc.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_vit(tmp_path / "bad.safetensors", num_heads=3)


def test_timm_numerics_differ_from_the_authors_only_in_the_epsilons():
    """timm's StdConv2dSame standardises with batch_norm (eps 1e-8 under the root) and its
    GroupNormAct uses eps 1e-5; written out here, the same weights give features within
    1e-3 of ours (the authors' epsilons), as `from_timm`'s docstring says."""
    model = tiny()

    def timm_conv(conv, x):
        w = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-8).reshape_as(conv.weight)
        return F.conv2d(pad_same(x, conv.kernel_size[0], conv.stride[0]), w, None, conv.stride)

    def timm_gn(gn, x):
        return F.group_norm(x, 32, gn.weight, gn.bias, 1e-5)

    r = model.resnet
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = F.relu(timm_gn(r.gn_root, timm_conv(r.conv_root, x)))
        y = F.max_pool2d(pad_same(y, 3, 2, float("-inf")), 3, 2)
        for stage in r.stages:
            for u in stage:
                short = y if u.conv_proj is None else timm_gn(u.gn_proj, timm_conv(u.conv_proj, y))
                z = F.relu(timm_gn(u.gn1, timm_conv(u.conv1, y)))
                z = F.relu(timm_gn(u.gn2, timm_conv(u.conv2, z)))
                y = F.relu(short + timm_gn(u.gn3, timm_conv(u.conv3, z)))
        ours = r(x)
    diff = (ours - y).abs().max().item()
    assert 0 < diff < 1e-3 * ours.abs().max().item()


# ---------------------------------------------------------------------------------------------
# Downstream: checkpoints, resolution, fine-tuning head, few-shot, export, inspection
# ---------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_another_resolution_on_the_feature_grid(tmp_path):
    model = tiny(num_classes=7)
    save_vit(model, tmp_path / "ckpt")
    loaded = load_vit(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # 48 px: 24 -> 12 -> 6 cells; the position embedding is resampled from 4 x 4 to 6 x 6.
    big = load_vit(tmp_path / "ckpt", image_size=48, num_classes=3)
    assert big.cfg.grid_size == 6 and big.pos_embed.shape == (1, 37, 48)
    assert big.head.out_features == 3 and big.head.weight.abs().sum() == 0
    assert big(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    from pipeline.model import resample_pos_embed

    torch.testing.assert_close(big.pos_embed, resample_pos_embed(model.pos_embed, 6))
    # Asking for a pure ViT where the file holds a hybrid is a named mismatch.
    with pytest.raises(CheckpointError, match="ResNet stages"):
        load_vit(tmp_path / "ckpt", variant="S/16")


def test_a_hybrid_on_a_16_px_map_reads_back_from_its_checkpoint(tmp_path):
    """A /16 map (three stages, as R50+B/16): reading the shapes back once built a throwaway
    config with the default 16-px patch, 256 px with the ResNet's stride, more than its
    default 224-px image, and refused every R50 checkpoint."""
    cfg = ViTConfig(**{**TINY, "resnet_layers": (1, 1, 1), "image_size": 64})
    assert cfg.resnet_stride == 16
    save_vit(ViT(cfg), tmp_path / "ckpt")
    assert load_vit(tmp_path / "ckpt").cfg == cfg


def test_finetuning_and_the_fewshot_probe_take_a_hybrid():
    from pipeline.train.fewshot import fewshot_accuracy

    model = tiny()
    model.reset_head(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    x[:, 0] += y[:, None, None] * 0.5                  # learnable from the red channel
    model.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.resnet.parameters())
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
    acc = fewshot_accuracy(feats[:8], y[:8].numpy(), feats[8:], y[8:].numpy(), 4, shots=2)
    assert acc > 0.5                   # chance is 0.25; the features separate the classes


def test_export_timm_names_and_hf_refusal(tmp_path):
    save_vit(tiny(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no ViT hybrid.*format='timm'"):
        export_vit(tmp_path / "ckpt", tmp_path / "hf", "hf")
    with pytest.raises(CheckpointError, match="no timm architecture"):
        export_vit(tmp_path / "ckpt", tmp_path / "timm", "timm")
    from pipeline.weights import timm

    with torch.device("meta"):
        cfg = ViTConfig.from_variant("R50+B/16", num_classes=0, image_size=384)
        state = ViT(cfg).state_dict()
    tensors, files = timm.export(cfg, state, "x")
    assert files["config.json"]["architecture"] == "vit_base_r50_s16_384"
    backbone = [k for k in tensors if k.startswith("patch_embed.backbone.")]
    assert "patch_embed.backbone.stages.2.blocks.8.norm3.bias" in backbone
    assert "patch_embed.backbone.stem.conv.weight" in backbone
    assert "patch_embed.proj.weight" in tensors and len(backbone) == 3 + 16 * 9 + 3 * 3


def test_inspection_measures_in_input_pixels_and_draws_the_root_filters():
    from pipeline import analysis

    model = tiny()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    result = analysis.analyze(model, iter([(["a", "b", "c", "d"], images)]), keep=2)
    assert (result.grid, result.pixels_per_token) == (4, 8)     # 4 x 4 cells of 8 px
    assert result.uniform_distance == pytest.approx(float(
        analysis.token_distances(4, 8).mean()))
    comps, _ = analysis.embedding_components(model.pixel_filters())
    assert comps.shape[1:] == (3, 7, 7)
    w = model.pixel_filters().flatten(1)
    torch.testing.assert_close(w.mean(1), torch.zeros(32), atol=1e-6, rtol=0)


def test_init_takes_the_authors_hybrid_npz_and_a_plain_run_refuses_it(tmp_path):
    """`--init R50+ViT-B_16.npz` for a hybrid run: the body (ResNet included) loaded, this
    run's head and resolution; a pure-ViT run asked to start from it says why not."""
    from pipeline.train import checkpoints

    params = jax_hybrid_params(np.random.default_rng(2))
    np.savez(tmp_path / "R.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    run = ViT(ViTConfig(**{**TINY, "image_size": 48, "num_classes": 11}))
    checkpoints.init_model(run, str(tmp_path / "R.npz"))
    torch.testing.assert_close(run.resnet.conv_root.weight,
                               torch.from_numpy(params["conv_root/kernel"].transpose(3, 2, 0, 1)
                                                .astype(np.float32)))
    assert run.pos_embed.shape == (1, 37, 48) and run.head.out_features == 11
    plain = ViT(ViTConfig(**{**TINY, "resnet_layers": None, "patch_size": 8}))
    with pytest.raises(CheckpointError, match="ResNet stages"):
        checkpoints.init_model(plain, str(tmp_path / "R.npz"))
