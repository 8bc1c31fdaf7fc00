"""Export to Hugging Face transformers and timm, hf:// checkpoints, and the input
normalisation a checkpoint carries. transformers is the real library (dev extra); timm cannot
be installed beside the CPU torch here: its names are checked against a key list written out
from timm's own model definition, and tests/pipeline/test_interop.py loads the exports in timm
itself, in its own environment (`make interop-env`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.transforms import to_model_input
from pipeline.model import ViT, ViTConfig
from pipeline.weights import CheckpointError, export_vit, load_vit, save_vit

ROOT = Path(__file__).resolve().parents[2]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small(**kw) -> ViTConfig:
    return ViTConfig(**{**dict(patch_size=8, hidden_size=48, depth=2, num_heads=3, mlp_dim=96,
                               image_size=32, num_classes=5), **kw})


def trained_like(cfg: ViTConfig, seed: int = 0) -> ViT:
    """A model with every parameter away from its initial value (a zero head gives zero
    logits, which would match anything, and the GroupNorms that start at scale 0 would hide
    a hybrid's ResNet)."""
    torch.manual_seed(seed)
    model = ViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_hf_export_loads_in_transformers_with_our_logits(tmp_path):
    from transformers import ViTForImageClassification, ViTImageProcessor

    ours = trained_like(small())
    save_vit(ours, tmp_path / "ours")
    out = export_vit(tmp_path / "ours", tmp_path / "hf", "hf")
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    hf = ViTForImageClassification.from_pretrained(out).eval()
    # Through Hugging Face's own preprocessing of uint8 images, against ours.
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    pixels = ViTImageProcessor.from_pretrained(out)(list(images), return_tensors="pt")
    x = to_model_input(torch.from_numpy(images), ours.cfg.input_mean, ours.cfg.input_std)
    torch.testing.assert_close(pixels["pixel_values"], x, atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = hf(**pixels).logits
        mine = ours(x)
    assert (theirs - mine).abs().max().item() < 1e-4
    assert mine.abs().max() > 0.1, "the logits compared are not trivially zero"
    # And back: the export is a Hugging Face checkpoint load_vit reads.
    back = load_vit(out).eval()
    with torch.no_grad():
        assert (back(x) - mine).abs().max().item() < 1e-5


def test_hf_export_of_a_model_with_pre_logits_is_a_vit_model_with_that_pooler(tmp_path):
    from transformers import ViTModel

    ours = trained_like(small(representation_size=24))
    save_vit(ours, tmp_path / "ours")
    out = export_vit(tmp_path / "ours", tmp_path / "hf", "hf")
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["architectures"] == ["ViTModel"] and config["pooler_output_size"] == 24
    hf = ViTModel.from_pretrained(out).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = hf(pixel_values=x).pooler_output
        mine = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert (pooled - mine).abs().max().item() < 1e-4


def test_imported_normalisation_travels_through_load_fine_tuning_and_export(tmp_path):
    """A Hugging Face checkpoint trained with ImageNet mean / std: load_vit takes them from
    its preprocessor config, fine-tuning's predict uses them, and both exports write them."""
    from eval.finetune import predict

    ours = trained_like(small(input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD))
    save_vit(ours, tmp_path / "ours")
    hf_dir = export_vit(tmp_path / "ours", tmp_path / "hf", "hf")
    pre = json.loads((Path(hf_dir) / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(IMAGENET_MEAN) and pre["image_std"] == list(IMAGENET_STD)
    loaded = load_vit(hf_dir)
    assert loaded.cfg.input_mean == IMAGENET_MEAN and loaded.cfg.input_std == IMAGENET_STD
    images = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        right = ours(to_model_input(torch.from_numpy(images), IMAGENET_MEAN, IMAGENET_STD))
        wrong = ours(to_model_input(torch.from_numpy(images)))
    assert not torch.equal(right.argmax(-1), wrong.argmax(-1)), "normalisation matters here"
    assert np.array_equal(predict(loaded, [images]), right.argmax(-1).numpy())
    timm_dir = export_vit(tmp_path / "ours", tmp_path / "timm", "timm")
    pretrained_cfg = json.loads((Path(timm_dir) / "config.json").read_text())["pretrained_cfg"]
    assert pretrained_cfg["mean"] == list(IMAGENET_MEAN)
    assert load_vit(timm_dir).cfg.input_std == IMAGENET_STD


def timm_keys(depth: int, gap: bool = False) -> set[str]:
    """The state-dict names of timm's VisionTransformer (timm/models/vision_transformer.py:
    `patch_embed` = PatchEmbed with `proj`; `cls_token`, `pos_embed`; `blocks` = Block with
    `norm1`, `attn` (timm/layers/attention.py: `qkv`, `proj`), `norm2`, `mlp` (layers/mlp.py:
    `fc1`, `fc2`); `norm` (or, with global_pool='avg' and fc_norm=True, `fc_norm`); `head`),
    without LayerScale, qk-norm or register tokens, as the vit_* models are."""
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias"}
    if not gap:
        keys.add("cls_token")
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_timm_export_has_timms_names_and_config(tmp_path, pool):
    from safetensors.torch import load_file

    cfg = small(pool=pool, hidden_size=768, num_heads=12, mlp_dim=3072, patch_size=16,
                image_size=32, depth=2)
    ours = trained_like(cfg)
    save_vit(ours, tmp_path / "ours")
    out = Path(export_vit(tmp_path / "ours", tmp_path / "timm", "timm"))
    state = load_file(out / "model.safetensors")
    assert set(state) == timm_keys(2, gap=pool == "gap")
    assert state["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert state["blocks.1.attn.qkv.weight"].shape == (3 * 768, 768)
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["global_pool"] == ("avg" if pool == "gap" else "token")
    assert config["model_args"]["class_token"] is (pool == "token")
    assert config["model_args"]["mlp_ratio"] == 4.0 and config["num_classes"] == 5
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    back = load_vit(out).eval()
    assert back.cfg == cfg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))


def test_exports_refuse_what_the_target_cannot_hold(tmp_path):
    save_vit(trained_like(small(pool="gap")), tmp_path / "gap")
    with pytest.raises(CheckpointError, match="no Hugging Face ViTModel equivalent.*timm"):
        export_vit(tmp_path / "gap", tmp_path / "x", "hf")
    save_vit(trained_like(small(representation_size=24)), tmp_path / "rep")
    with pytest.raises(CheckpointError, match="no pre-logits"):
        export_vit(tmp_path / "rep", tmp_path / "y", "timm")
    with pytest.raises(CheckpointError, match="unknown export format 'onnx'"):
        export_vit(tmp_path / "rep", tmp_path / "z", "onnx")


@pytest.mark.parametrize("cfg, name", [
    (ViTConfig.from_variant("Ti/16"), "vit_tiny_patch16_224"),
    (ViTConfig.from_variant("B/16", image_size=384), "vit_base_patch16_384"),
    (ViTConfig.from_variant("B/8", image_size=32), "vit_base_patch8_224"),   # timm's at 224
    (ViTConfig.from_variant("B/16", pool="gap"), "vit_base_patch16_224"),  # its gap: 16 heads
    (ViTConfig.from_variant("H/14", pool="gap", image_size=448), "vit_huge_patch14_gap_224"),
    (small(), "vit_base_patch16_224"),                                       # no timm name
    (ViTConfig.from_variant("R50+B/16", image_size=384), "vit_base_r50_s16_384"),
    (ViTConfig.from_variant("R50+L/32"), "vit_large_r50_s32_224"),
    (ViTConfig.from_variant("R26+B/32"), "vit_base_r26_s32_224"),
    (ViTConfig.from_variant("R50+B/16", depth=2, hidden_size=48, num_heads=3, mlp_dim=96),
     "vit_base_r50_s16_224"),                                   # R50's ResNet, no timm name
    (small(resnet_layers=(), patch_size=2), "vit_tiny_r_s16_p8_224"),       # the root alone
])
def test_timm_architecture_is_timms_name_or_an_entry_point_of_the_right_kind(cfg, name):
    """Whatever the name, model_args state every shape field (the interop tests build the
    model from them in timm); the class count is in the pretrained config, where timm's loader
    compares it."""
    from pipeline.weights import timm

    with torch.device("meta"):
        state = ViT(cfg).state_dict()
    config = timm.export(cfg, state, "x")[1]["config.json"]
    assert config["architecture"] == name
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["img_size"],
            args["patch_size"]) == (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.image_size,
                                    cfg.patch_size)
    assert int(args["embed_dim"] * args["mlp_ratio"]) == cfg.mlp_dim
    assert config["pretrained_cfg"]["num_classes"] == args["num_classes"] == cfg.num_classes


@pytest.mark.parametrize("fields, message", [
    (dict(representation_size=24), "representation_size=24"),
    (dict(hidden_size=15, num_heads=3, mlp_dim=123), "mlp_dim=123 for hidden_size=15"),
    (dict(resnet_layers=(1, 1), patch_size=1), "resnet_layers=[1, 1], which has no timm"),
    (dict(resnet_layers=(3, 4, 9), resnet_width=32, patch_size=1), "resnet_width=32"),
])
def test_timm_export_refuses_what_timm_cannot_build_naming_the_field(tmp_path, fields, message):
    save_vit(trained_like(small(**fields)), tmp_path / "ours")
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        export_vit(tmp_path / "ours", tmp_path / "timm", "timm")
    assert "\n" not in str(err.value)


def hf_export_with(tmp_path: Path, **config) -> Path:
    """Our small model's hf export with config.json fields changed."""
    save_vit(trained_like(small()), tmp_path / "ours")
    out = Path(export_vit(tmp_path / "ours", tmp_path / "hf", "hf"))
    doc = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**doc, **config}))
    return out


@pytest.mark.parametrize("field, value, why", [
    ("qkv_bias", False, "always has q, k and v biases"),
    ("hidden_act", "gelu_new", "only the exact GELU"),
    ("pooler_act", "relu", "uses tanh"),
    ("image_size", [32, 16], "only square images"),
    ("patch_size", [8, 4], "only square images and patches"),
    ("architectures", ["ViTForMaskedImageModeling"], "ViTForMaskedImageModeling is not"),
    ("pruned_heads", {"0": [1]}, "heads removed"),
])
def test_transformers_configs_ours_cannot_be_are_refused_naming_field_and_value(
        tmp_path, field, value, why):
    out = hf_export_with(tmp_path, **{field: value})
    with pytest.raises(CheckpointError) as err:
        load_vit(out)
    assert str(err.value).startswith(f"{out}: config.json has {field}={value!r}: ")
    assert why in str(err.value) and "\n" not in str(err.value)


def test_transformers_own_qkv_bias_false_model_is_refused_by_its_config(tmp_path):
    """Saved by transformers itself: the config is read before the weights, whose missing q,
    k, v biases would otherwise be the message."""
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    ViTForImageClassification(HFConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
        image_size=32, patch_size=8, num_labels=5, qkv_bias=False)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"config.json has qkv_bias=False: "):
        load_vit(tmp_path)
    # Square images and patches given as pairs are fine.
    out = hf_export_with(tmp_path / "pairs", image_size=[32, 32], patch_size=[8, 8])
    assert load_vit(out).cfg.patch_size == 8


@pytest.mark.s3
def test_export_recipe_for_an_s3_export_says_how_to_copy_it_first(s3, tmp_path):
    from pipeline.weights import export_recipe

    save_vit(trained_like(small()), tmp_path / "ours")
    uri = f"s3://{s3}/exports/smoke-timm"
    export_vit(tmp_path / "ours", uri, "timm")
    assert export_recipe(uri, "timm") == (
        f"# copy it to a local folder first: aws s3 cp --recursive {uri} smoke-timm\n"
        f"import timm\nmodel = timm.create_model('local-dir:smoke-timm', pretrained=True).eval()")


def fill_hub_cache(cache: Path, repo: str, files_from: Path) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_hub_names_resolve_through_an_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    ours = trained_like(small())
    save_vit(ours, tmp_path / "ours")
    fill_hub_cache(tmp_path / "cache", "acme/tiny-vit",
                   Path(export_vit(tmp_path / "ours", tmp_path / "hf", "hf")))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model = load_vit("hf://acme/tiny-vit").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ours(x)).abs().max().item() < 1e-5
    with pytest.raises(CheckpointError, match="hf://acme/absent: not in the Hugging Face cache"):
        load_vit("hf://acme/absent")
    with pytest.raises(CheckpointError, match="not a Hugging Face Hub name"):
        load_vit("hf://not a name")


def test_export_command(tmp_path):
    save_vit(trained_like(small()), tmp_path / "ours")
    ok = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--checkpoint",
                         str(tmp_path / "ours"), "--out", str(tmp_path / "out"), "--format",
                         "timm"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "exported" in ok.stdout and (tmp_path / "out" / "config.json").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--checkpoint",
                          str(tmp_path / "nothing"), "--out", str(tmp_path / "out2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: checkpoint not found")
    assert len(bad.stderr.strip().splitlines()) == 1
