"""Checkpoints: our format (bit-exact round trip, local and S3), imports from Hugging Face,
timm and the authors' .npz (checked against independent references), and every bad case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import torch
from safetensors.torch import load_file, save_file

from pipeline.model import ViT, ViTConfig
from pipeline.weights import CheckpointError, load_vit, save_vit

SMALL = dict(patch_size=8, hidden_size=48, depth=2, num_heads=3, mlp_dim=96, image_size=32,
             num_classes=5, representation_size=40)


def small_model(**kw) -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig(**{**SMALL, **kw}))
    with torch.no_grad():  # no zeros, so that a value landing in the wrong place shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ---- our format ---------------------------------------------------------------------------
def test_save_load_is_bit_exact(tmp_path):
    model = small_model()
    save_vit(model, tmp_path / "ckpt", metadata={"step": 7})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors",
                                                                    "vit.json"]
    doc = json.loads((tmp_path / "ckpt" / "vit.json").read_text())
    assert doc["config"]["representation_size"] == 40 and doc["metadata"] == {"step": 7}
    loaded = load_vit(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


@pytest.mark.s3
def test_save_load_on_s3_is_bit_exact(s3):
    model = small_model(pool="gap", representation_size=None)
    uri = f"s3://{s3}/runs/a/final"
    save_vit(model, uri)
    loaded = load_vit(uri)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_overrides_head_and_resolution(tmp_path):
    model = small_model()
    save_vit(model, tmp_path / "c")
    ft = load_vit(tmp_path / "c", num_classes=9, image_size=48, dropout=0.1)
    assert ft.cfg.num_classes == 9 and ft.cfg.image_size == 48 and ft.cfg.dropout == 0.1
    assert ft.pre_logits is None
    assert torch.equal(ft.eval()(torch.randn(2, 3, 48, 48)), torch.zeros(2, 9))
    assert torch.equal(ft.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)
    assert load_vit(tmp_path / "c", image_size=50).cfg.grid_size == 50 // model.cfg.patch_size
    with pytest.raises(CheckpointError, match="image_size=4 is smaller than .* patch size"):
        load_vit(tmp_path / "c", image_size=4)


# ---- Hugging Face transformers ------------------------------------------------------------
def hf_pair(hidden, heads, depth, patch, mlp, with_pooler=False):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification, ViTModel

    cfg = HFConfig(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                   intermediate_size=mlp, image_size=224, patch_size=patch, num_labels=11,
                   layer_norm_eps=1e-6)
    torch.manual_seed(1)
    model = ViTModel(cfg) if with_pooler else ViTForImageClassification(cfg)
    with torch.no_grad():  # random weights everywhere (HF zero-inits biases)
        for name, p in model.named_parameters():
            # Position embeddings as large as the patch embeddings, so that a resampling
            # error shows in the outputs.
            p.normal_(0, 1.0 if "position_embeddings" in name else 0.05)
    return model.eval(), cfg


HF_SIZES = [dict(hidden=192, heads=3, depth=3, patch=16, mlp=768),
            dict(hidden=384, heads=6, depth=2, patch=32, mlp=1536)]


@pytest.mark.slow
@pytest.mark.parametrize("size", HF_SIZES, ids=["192w-p16", "384w-p32"])
def test_hf_import_matches_at_224_and_384(tmp_path, size):
    from transformers import ViTForImageClassification

    hf, cfg = hf_pair(**size)
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors, Hub key names
    x224, x384 = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 384, 384)

    ours = load_vit(tmp_path / "hf").eval()
    assert ours.cfg.num_heads == size["heads"] and ours.cfg.num_classes == 11
    with torch.no_grad():
        torch.testing.assert_close(ours(x224), hf(x224).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.forward_features(x224),
                                   hf.vit(x224).last_hidden_state[:, 0], atol=1e-4, rtol=0)

    # 384 px: the reference is HF at 384 px with vit_jax's scipy-zoomed position embedding.
    ours384 = load_vit(tmp_path / "hf", image_size=384).eval()
    state = hf.state_dict()
    key = next(k for k in state if k.endswith("position_embeddings"))
    pos = state[key].double().numpy()
    g, g2, D = 224 // size["patch"], 384 // size["patch"], size["hidden"]
    grid = scipy.ndimage.zoom(pos[0, 1:].reshape(g, g, D), (g2 / g, g2 / g, 1), order=1)
    state[key] = torch.from_numpy(np.concatenate([pos[0, :1], grid.reshape(-1, D)])[None]).float()
    cfg.image_size = 384
    hf384 = ViTForImageClassification(cfg).eval()
    hf384.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours384(x384), hf384(x384).logits, atol=1e-4, rtol=0)
        hf_tokens = hf384.vit(x384).last_hidden_state
        torch.testing.assert_close(ours384.forward_features(x384), hf_tokens[:, 0],
                                   atol=1e-4, rtol=0)
        # Every token, not only [class]: with random weights the class token averages the
        # patches, which would hide a resampling error.
        torch.testing.assert_close(ours384.encode(ours384.embed(x384)), hf_tokens,
                                   atol=1e-4, rtol=0)


def test_hf_vitmodel_pooler_is_the_pre_logits(tmp_path):
    hf, _ = hf_pair(hidden=48, heads=3, depth=2, patch=16, mlp=96, with_pooler=True)
    # A bare state dict in transformers 5.x names, as torch.save writes it.
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_vit(tmp_path / "pytorch_model.bin", num_heads=3).eval()
    assert ours.head is None and ours.cfg.representation_size == 48
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = hf(x)
        torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state[:, 0],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x)),
                                   out.pooler_output, atol=1e-4, rtol=0)


# ---- timm ---------------------------------------------------------------------------------
def test_timm_state_dict_import(tmp_path):
    """timm's VisionTransformer layout (`patch_embed.proj`, `blocks.N.attn.qkv`, `norm`,
    `fc_norm` as Identity, `head`), wrapped as DDP would save it."""
    model = small_model(representation_size=None)
    timm_state = {}
    for k, v in model.state_dict().items():
        k = k.replace("patch_embed.", "patch_embed.proj.")
        timm_state["module." + k] = v.clone()
    save_file(timm_state, tmp_path / "vit_timm.safetensors")
    ours = load_vit(tmp_path / "vit_timm.safetensors", num_heads=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x), model(x))


# ---- the authors' .npz ----------------------------------------------------------------------
def vit_jax_params(rng, D=48, H=3, L=2, M=96, P=8, C=3, grid=4, rep=40, K=5):
    """Every parameter of the vit_jax `VisionTransformer` layout, random values."""
    d = D // H
    n = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)  # noqa: E731
    p = {"embedding/kernel": n(P, P, C, D), "embedding/bias": n(D), "cls": n(1, 1, D),
         "Transformer/posembed_input/pos_embedding": n(1, grid * grid + 1, D),
         "Transformer/encoder_norm/scale": 1 + n(D), "Transformer/encoder_norm/bias": n(D),
         "pre_logits/kernel": n(D, rep), "pre_logits/bias": n(rep),
         "head/kernel": n(rep, K), "head/bias": n(K)}
    for i in range(L):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            p[b + ln + "/scale"], p[b + ln + "/bias"] = 1 + n(D), n(D)
        for x in ("query", "key", "value"):
            p[f"{b}MultiHeadDotProductAttention_1/{x}/kernel"] = n(D, H, d)
            p[f"{b}MultiHeadDotProductAttention_1/{x}/bias"] = n(H, d)
        p[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = n(H, d, D)
        p[f"{b}MultiHeadDotProductAttention_1/out/bias"] = n(D)
        p[f"{b}MlpBlock_3/Dense_0/kernel"], p[f"{b}MlpBlock_3/Dense_0/bias"] = n(D, M), n(M)
        p[f"{b}MlpBlock_3/Dense_1/kernel"], p[f"{b}MlpBlock_3/Dense_1/bias"] = n(M, D), n(D)
    return p


def vit_jax_forward(p, images_nhwc, L=2, cls_posemb=True):
    """A NumPy transcription of vit_jax's forward pass (flax layouts, NHWC, exact GELU)."""
    def ln(x, pre):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * p[pre + "/scale"] + p[pre + "/bias"]

    k = p["embedding/kernel"]
    P, _, C, D = k.shape
    B, Hh, W, _ = images_nhwc.shape
    x = images_nhwc.reshape(B, Hh // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, -1, P * P * C) @ k.reshape(P * P * C, D) + p["embedding/bias"]
    x = np.concatenate([np.repeat(p["cls"], B, 0), x], 1)
    x = x + p["Transformer/posembed_input/pos_embedding"]
    for i in range(L):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        y = ln(x, b + "LayerNorm_0")
        q, kk, v = (np.einsum("bnd,dhk->bhnk", y, p[a + t + "/kernel"])
                    + p[a + t + "/bias"][None, :, None] for t in ("query", "key", "value"))
        s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        s = np.exp(s - s.max(-1, keepdims=True))
        o = (s / s.sum(-1, keepdims=True)) @ v
        x = x + np.einsum("bhnk,hkd->bnd", o, p[a + "out/kernel"]) + p[a + "out/bias"]
        y = ln(x, b + "LayerNorm_2")
        m = b + "MlpBlock_3/"
        h = y @ p[m + "Dense_0/kernel"] + p[m + "Dense_0/bias"]
        h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
        x = x + h @ p[m + "Dense_1/kernel"] + p[m + "Dense_1/bias"]
    y = ln(x, "Transformer/encoder_norm")[:, 0]
    y = np.tanh(y @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return y @ p["head/kernel"] + p["head/bias"]


def test_npz_import_maps_every_vit_jax_parameter(tmp_path):
    rng = np.random.default_rng(0)
    params = vit_jax_params(rng)
    np.savez(tmp_path / "ViT-x.npz", **params)
    ours = load_vit(tmp_path / "ViT-x.npz").double().eval()
    assert ours.cfg.num_heads == 3 and ours.cfg.representation_size == 40
    # Every array is used (an unused one raises), and the model agrees with the reference.
    images = rng.uniform(-1, 1, (2, 32, 32, 3))
    ref = vit_jax_forward({k: v.astype(np.float64) for k, v in params.items()}, images)
    with torch.no_grad():
        out = ours(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-8)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(v.size for v in params.values())


def test_npz_import_big_vision_layout(tmp_path):
    """big_vision names: `params/img/...`, scanned blocks, LayerNorm_0/1, MlpBlock_0, and a
    position embedding without a class-token row."""
    rng = np.random.default_rng(1)
    p = vit_jax_params(rng)
    bv = {"params/img/embedding/kernel": p["embedding/kernel"],
          "params/img/embedding/bias": p["embedding/bias"], "params/img/cls": p["cls"],
          "params/img/pos_embedding": p["Transformer/posembed_input/pos_embedding"][:, 1:],
          "params/img/Transformer/encoder_norm/scale": p["Transformer/encoder_norm/scale"],
          "params/img/Transformer/encoder_norm/bias": p["Transformer/encoder_norm/bias"],
          "params/img/head/kernel": p["head/kernel"][:40], "params/img/head/bias": p["head/bias"],
          "params/img/pre_logits/kernel": p["pre_logits/kernel"],
          "params/img/pre_logits/bias": p["pre_logits/bias"],
          "opt/state/mu": np.zeros(3, np.float32)}  # optimizer state is ignored
    rename = {"LayerNorm_0": "LayerNorm_0", "LayerNorm_2": "LayerNorm_1",
              "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
              "MlpBlock_3": "MlpBlock_0"}
    for key in p:
        if key.startswith("Transformer/encoderblock_0/"):
            rest = key[len("Transformer/encoderblock_0/"):]
            mod, tail = rest.split("/", 1)
            stacked = np.stack([p[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
            bv[f"params/img/Transformer/encoderblock/{rename[mod]}/{tail}"] = stacked
    np.savez(tmp_path / "bv.npz", **bv)
    ours = load_vit(tmp_path / "bv.npz").double().eval()
    ref_params = dict(p)
    ref_params["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [np.zeros_like(p["cls"]), bv["params/img/pos_embedding"]], 1)  # no posemb on [class]
    images = rng.uniform(-1, 1, (2, 32, 32, 3))
    ref = vit_jax_forward({k: v.astype(np.float64) for k, v in ref_params.items()}, images)
    with torch.no_grad():
        out = ours(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-8)


# ---- bad checkpoints: one clear error each ------------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope"):
        load_vit(tmp_path / "nope")


@pytest.mark.s3
def test_missing_checkpoint_on_s3(s3):
    with pytest.raises(CheckpointError, match=f"checkpoint not found: s3://{s3}/nope"):
        load_vit(f"s3://{s3}/nope")


def test_not_a_vit(tmp_path):
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 4)},
              tmp_path / "bert.safetensors")
    with pytest.raises(CheckpointError, match="is not a ViT checkpoint"):
        load_vit(tmp_path / "bert.safetensors")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a ViT checkpoint: config.json has "
                                              "model_type='bert'"):
        load_vit(tmp_path / "hf")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a ViT checkpoint"):
        load_vit(tmp_path / "other")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    save_vit(small_model(), tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    state = load_file(weights)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(CheckpointError,
                       match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\]; "
                             r"unexpected keys \[blocks\.1\.extra\.weight\]"):
        load_vit(tmp_path / "c")


def test_wrong_shape_is_named(tmp_path):
    save_vit(small_model(), tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    state = load_file(weights)
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(48, 64)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"shape mismatch for blocks\.0\.mlp\.fc2\.weight"):
        load_vit(tmp_path / "c")


def test_patch_size_and_width_mismatch(tmp_path):
    save_vit(small_model(), tmp_path / "c")
    with pytest.raises(CheckpointError, match="patch size mismatch: the checkpoint has "
                                              "patch_size=8, but patch_size=16"):
        load_vit(tmp_path / "c", patch_size=16)
    with pytest.raises(CheckpointError, match="width mismatch: .*hidden_size=48, but "
                                              "hidden_size=768"):
        load_vit(tmp_path / "c", hidden_size=768)
    with pytest.raises(CheckpointError, match="mismatch"):
        load_vit(tmp_path / "c", variant="B/16")
    # The config file and the weights disagree.
    doc = json.loads((tmp_path / "c" / "vit.json").read_text())
    doc["config"]["patch_size"] = 16
    (tmp_path / "c" / "vit.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="config says patch_size=16 but the weights have "
                                              "patch_size=8"):
        load_vit(tmp_path / "c")


@pytest.mark.parametrize("name", ["model.safetensors", "w.npz", "w.bin"])
def test_unreadable_file(tmp_path, name):
    model = small_model()
    if name == "model.safetensors":
        save_vit(model, tmp_path / "c")
        path = tmp_path / "c" / name
        path.write_bytes(path.read_bytes()[:1000])  # truncated
        target = tmp_path / "c"
    else:
        target = tmp_path / name
        target.write_bytes(b"PK\x03\x04 this is not a real archive")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file"):
        load_vit(target)


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_no_arbitrary_unpickling(tmp_path, capsys):
    torch.save({"patch_embed.weight": torch.zeros(1), "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: not a file of tensors"):
        load_vit(tmp_path / "evil.pt")
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_unknown_override(tmp_path):
    save_vit(small_model(), tmp_path / "c")
    with pytest.raises(TypeError, match="unknown overrides \\['colour'\\]"):
        load_vit(tmp_path / "c", colour="red")
