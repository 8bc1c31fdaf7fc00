"""timm's `VisionTransformer` (`vit_*`), both ways.

Import: a bare state dict (`blocks.N.attn.qkv`, close to ours by design), or a directory as
timm's `save_for_hf` / the Hub writes it (`config.json` with `architecture`, `model_args` and
`pretrained_cfg`). A hybrid's ResNet is timm's `patch_embed.backbone` (a `ResNetV2`) and our
`resnet.`.

Export: `model.safetensors` in timm's names and `config.json` as `save_for_hf` writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.model import ViTConfig
from pipeline.weights.build import Loaded
from pipeline.weights.errors import CheckpointError
from pipeline.weights.files import weight_files

SOURCE = "timm"

# timm's hybrid backbone (`patch_embed.backbone.`, a `ResNetV2` with preact=False, or its stem
# alone) -> our `resnet.` names.
_RESNET = [
    (r"stem\.conv\.", "conv_root."), (r"stem\.norm\.", "gn_root."),
    (r"conv\.", "conv_root."), (r"norm\.", "gn_root."),                    # stem-only backbone
    (r"stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.", "stages.{}.{}.conv_proj."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.downsample\.norm\.", "stages.{}.{}.gn_proj."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv([123])\.", "stages.{}.{}.conv{}."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.norm([123])\.", "stages.{}.{}.gn{}."),
]
# Our variant's size letter -> the word in timm's architecture names.
_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def claims_dir(path: Path) -> bool:
    """timm's hub layout: a config.json with `architecture` (and without transformers'
    `model_type`)."""
    if not (path / "config.json").exists():
        return False
    doc = json.loads((path / "config.json").read_text())
    return "architecture" in doc and "model_type" not in doc


def read_dir(path: Path, uri: str, read_file) -> Loaded:
    """A directory as timm's `save_for_hf` / the Hub writes it: config.json with
    `architecture`, `model_args` and `pretrained_cfg` (mean / std), and the weights;
    `read_file` reads the weights file (any names)."""
    doc = json.loads((path / "config.json").read_text())
    if not str(doc["architecture"]).startswith("vit_"):
        raise CheckpointError(f"{uri} is not a ViT checkpoint: timm architecture "
                              f"{doc['architecture']!r}")
    weights = weight_files(path)
    if not weights:
        raise CheckpointError(f"{uri}: config.json found but no model.safetensors or "
                              f"pytorch_model.bin beside it")
    state, fields, _ = read_file(weights[0], uri)
    args, pre = doc.get("model_args", {}), doc.get("pretrained_cfg", {})
    if "num_heads" in args:
        fields["num_heads"] = args["num_heads"]
    # timm's vit_* default (IMAGENET_INCEPTION_MEAN / STD) when the config does not say
    fields.update(input_mean=pre.get("mean", (0.5,) * 3), input_std=pre.get("std", (0.5,) * 3))
    return Loaded(state, fields, SOURCE)


def claims_keys(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `VisionTransformer` names -> ours (they are close by design); a hybrid's
    `patch_embed.backbone.` becomes `resnet.`. timm computes weight standardisation with
    eps 1e-8 inside the square root and GroupNorm with eps 1e-5 where the authors' code (and
    ours) divides by std + 1e-5 and uses 1e-6: the same weights, outputs within ~1e-4."""
    out = {}
    for key, value in state.items():
        if key.startswith(("fc_norm.", "head_drop.")) and value.numel() == 0:
            continue
        if key.startswith("patch_embed.backbone."):
            rest = key[len("patch_embed.backbone."):]
            for pattern, target in _RESNET:
                if m := re.match(pattern, rest):
                    key = "resnet." + target.format(*m.groups()) + rest[m.end():]
                    break
            out[key] = value          # an unknown name stays and fails the strict load
            continue
        key = key.replace("patch_embed.proj.", "patch_embed.")
        key = key.replace("pre_logits.fc.", "pre_logits.")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export(cfg: ViTConfig, state: dict, uri: str) -> tuple[dict, dict]:
    """-> (tensors in timm's names, {"config.json": what `save_for_hf` writes}). GAP models
    get `global_pool="avg", class_token=False, fc_norm=False` (the final norm before pooling,
    as big_vision)."""
    if cfg.representation_size:
        raise CheckpointError(f"{uri}: timm's VisionTransformer has no pre-logits "
                              f"(representation) layer; export with format='hf' (it becomes "
                              f"the pooler) or fine-tune without it")
    tensors = {}
    for key, value in state.items():
        key = key.replace("patch_embed.", "patch_embed.proj.", 1) if key.startswith(
            "patch_embed.") else key
        if key.startswith("resnet."):
            key = _resnet_name(key)
        tensors[key] = value
    gap = cfg.pool == "gap"
    model_args = {"img_size": cfg.image_size, "patch_size": cfg.patch_size,
                  "embed_dim": cfg.hidden_size, "depth": cfg.depth,
                  "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_dim / cfg.hidden_size,
                  "in_chans": cfg.num_channels, "num_classes": cfg.num_classes,
                  "class_token": not gap, "global_pool": "avg" if gap else "token"}
    if gap:
        model_args["fc_norm"] = False
    if cfg.is_hybrid:           # the architecture builds the backbone and its 1x1 embedding
        del model_args["patch_size"], model_args["in_chans"]
    config = {
        "architecture": _architecture(cfg, uri), "num_classes": cfg.num_classes,
        "num_features": cfg.hidden_size, "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [cfg.num_channels, cfg.image_size, cfg.image_size],
            "fixed_input_size": True, "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": list(cfg.input_mean), "std": list(cfg.input_std),
            "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj",
            "classifier": "head"},
    }
    return tensors, {"config.json": config}


def _architecture(cfg: ViTConfig, uri: str) -> str:
    """timm's architecture name for `cfg` (`vit_base_patch16_224`, `vit_base_r50_s16_384`)."""
    variant = cfg.variant
    if cfg.is_hybrid:
        if variant is None:
            raise CheckpointError(f"{uri}: timm builds the hybrids R50+B/16, R50+L/32, "
                                  f"R26+S/32 and R26+B/32 only; this one "
                                  f"(resnet_layers={list(cfg.resnet_layers)}) has no timm "
                                  f"architecture")
        resnet, vit = variant.split("+")
        size = _SIZES[vit.split("/")[0]]
        return f"vit_{size}_{resnet.lower()}_s{cfg.effective_patch_size}_{cfg.image_size}"
    size = _SIZES[variant.split("/")[0]] if variant else "base"
    return f"vit_{size}_patch{cfg.patch_size}_{cfg.image_size}"


def _resnet_name(key: str) -> str:
    """Our `resnet.` name -> timm's `patch_embed.backbone.` name (a ResNetV2 backbone)."""
    rest = key[len("resnet."):]
    rest = re.sub(r"^conv_root\.", "stem.conv.", rest)
    rest = re.sub(r"^gn_root\.", "stem.norm.", rest)
    rest = re.sub(r"^stages\.(\d+)\.(\d+)\.conv_proj\.", r"stages.\1.blocks.\2.downsample.conv.",
                  rest)
    rest = re.sub(r"^stages\.(\d+)\.(\d+)\.gn_proj\.", r"stages.\1.blocks.\2.downsample.norm.",
                  rest)
    rest = re.sub(r"^stages\.(\d+)\.(\d+)\.conv(\d)\.", r"stages.\1.blocks.\2.conv\3.", rest)
    rest = re.sub(r"^stages\.(\d+)\.(\d+)\.gn(\d)\.", r"stages.\1.blocks.\2.norm\3.", rest)
    return "patch_embed.backbone." + rest
