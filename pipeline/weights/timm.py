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
# timm's registered ViTs that are exactly one of ours at their own defaults (timm 1.0.31,
# timm/models/vision_transformer.py and vision_transformer_hybrid.py): name -> (our variant,
# pooling, image size). Left out: `vit_base_patch16_gap_224` (16 heads, not B/16's 12) and
# every variant with extra parts (register tokens, LayerScale, qk-norm, CLIP's pre-norm).
_NAMED = {
    "vit_tiny_patch16_224": ("Ti/16", "token", 224),
    "vit_tiny_patch16_384": ("Ti/16", "token", 384),
    "vit_small_patch8_224": ("S/8", "token", 224),
    "vit_small_patch16_224": ("S/16", "token", 224),
    "vit_small_patch16_384": ("S/16", "token", 384),
    "vit_small_patch32_224": ("S/32", "token", 224),
    "vit_small_patch32_384": ("S/32", "token", 384),
    "vit_base_patch8_224": ("B/8", "token", 224),
    "vit_base_patch16_224": ("B/16", "token", 224),
    "vit_base_patch16_384": ("B/16", "token", 384),
    "vit_base_patch32_224": ("B/32", "token", 224),
    "vit_base_patch32_384": ("B/32", "token", 384),
    "vit_large_patch14_224": ("L/14", "token", 224),
    "vit_large_patch16_224": ("L/16", "token", 224),
    "vit_large_patch16_384": ("L/16", "token", 384),
    "vit_large_patch32_224": ("L/32", "token", 224),
    "vit_large_patch32_384": ("L/32", "token", 384),
    "vit_huge_patch14_224": ("H/14", "token", 224),
    "vit_huge_patch14_gap_224": ("H/14", "gap", 224),
    "vit_huge_patch16_gap_448": ("H/16", "gap", 448),
    "vit_base_r50_s16_224": ("R50+B/16", "token", 224),
    "vit_base_r50_s16_384": ("R50+B/16", "token", 384),
    "vit_large_r50_s32_224": ("R50+L/32", "token", 224),
    "vit_large_r50_s32_384": ("R50+L/32", "token", 384),
    "vit_small_r26_s32_224": ("R26+S/32", "token", 224),
    "vit_small_r26_s32_384": ("R26+S/32", "token", 384),
    "vit_base_r26_s32_224": ("R26+B/32", "token", 224),
}
# A shape timm has no name for: the entry point that builds the right kind of model, every
# shape field then given in `model_args` (which override the entry point's own: timm's entry
# points build `dict(their_args, **kwargs)`). Hybrids: the one whose ResNet has these units
# per stage (timm's `_resnetv2` fixes them and the root width 64; `()` is the root alone).
_PLAIN_BASE = "vit_base_patch16_224"
_HYBRID_BASES = {(3, 4, 9): "vit_base_r50_s16_224", (3, 4, 6, 3): "vit_large_r50_s32_224",
                 (2, 2, 2, 2): "vit_small_r26_s32_224", (): "vit_tiny_r_s16_p8_224"}


def export(cfg: ViTConfig, state: dict, uri: str) -> tuple[dict, dict]:
    """-> (tensors in timm's names, {"config.json": what timm's `save_for_hf` writes}).

    What a timm user runs on the folder (the recipe `load_recipe` prints, the tests run):
    `timm.create_model("local-dir:OUT", pretrained=True)`, or the same by hand:
    `create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(pretrained_cfg,
    file=OUT/model.safetensors), **model_args)`. Three things make that exact:
    - `architecture` is a name timm registers: ours where the shape has one (`_NAMED`), else
      the entry point of the right kind (`_PLAIN_BASE`, `_HYBRID_BASES`); `model_args` state
      every shape field either way, so the model built is ours whatever the name's defaults.
    - `pretrained_cfg.num_classes` is our class count: timm's `load_pretrained` drops the
      classifier, without an error, when the model's class count differs from the pretrained
      config's (a named architecture's default config says 1000).
    - GAP models get `global_pool="avg", class_token=False, fc_norm=False` (the final norm
      before pooling, as big_vision).
    Refused in one line naming the field: a pre-logits layer, a ResNet timm cannot build, an
    MLP width timm's `int(embed_dim * mlp_ratio)` does not give back. Not carried: dropout
    rates (as the hf export), and a LayerNorm eps other than timm's 1e-6 (imports from
    transformers say 1e-12: ~5e-7 relative)."""
    if cfg.representation_size:
        raise CheckpointError(f"{uri}: timm's VisionTransformer has no pre-logits "
                              f"(representation) layer, and this model has "
                              f"representation_size={cfg.representation_size}; export with "
                              f"format='hf' (it becomes the pooler) or fine-tune without it")
    mlp_ratio = cfg.mlp_dim / cfg.hidden_size
    if int(cfg.hidden_size * mlp_ratio) != cfg.mlp_dim:
        raise CheckpointError(f"{uri}: timm builds the MLP width as int(embed_dim * mlp_ratio), "
                              f"which does not give mlp_dim={cfg.mlp_dim} for hidden_size="
                              f"{cfg.hidden_size}; this model has no timm equivalent")
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
                  "num_heads": cfg.num_heads, "mlp_ratio": mlp_ratio,
                  "in_chans": cfg.num_channels, "num_classes": cfg.num_classes,
                  "class_token": not gap, "global_pool": "avg" if gap else "token",
                  "fc_norm": False}
    config = {
        "architecture": _architecture(cfg, uri), "num_classes": cfg.num_classes,
        "num_features": cfg.hidden_size, "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [cfg.num_channels, cfg.image_size, cfg.image_size],
            "fixed_input_size": True, "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": list(cfg.input_mean), "std": list(cfg.input_std),
            "num_classes": cfg.num_classes,
            "first_conv": ("patch_embed.backbone.stem.conv" if cfg.is_hybrid
                           else "patch_embed.proj"),
            "classifier": "head"},
    }
    return tensors, {"config.json": config}


def _architecture(cfg: ViTConfig, uri: str) -> str:
    """The timm entry point for `cfg`: its own name where timm registers this variant and
    pooling (at this image size if it has one: `vit_base_patch16_384`, else another:
    `vit_base_patch8_224` for B/8 at 32 px), else one of the right kind (see `export`)."""
    if cfg.is_hybrid:
        if cfg.resnet_width != 64:
            raise CheckpointError(f"{uri}: timm's hybrid ResNets have root width 64, this "
                                  f"model has resnet_width={cfg.resnet_width}; it has no timm "
                                  f"architecture")
        if cfg.resnet_layers not in _HYBRID_BASES:
            raise CheckpointError(
                f"{uri}: timm builds the hybrid ResNets with units per stage "
                f"{', '.join(str(list(k)) for k in _HYBRID_BASES)} only; this model has "
                f"resnet_layers={list(cfg.resnet_layers)}, which has no timm architecture")
    variant = cfg.variant
    named = sorted((pool != cfg.pool, img != cfg.image_size, img, name)
                   for name, (v, pool, img) in _NAMED.items() if v == variant)
    if named:
        return named[0][-1]
    return _HYBRID_BASES[cfg.resnet_layers] if cfg.is_hybrid else _PLAIN_BASE


def load_recipe(folder: str, config: dict) -> str:
    """The Python a timm user runs to load the export in local `folder` (`vit-export` prints
    it, the README shows it, the interop tests run it as printed): timm's own local-folder
    loader, which reads config.json as its Hub loader does (`architecture`, `model_args`,
    `pretrained_cfg`) and the weights beside it."""
    return (f"import timm\n"
            f"model = timm.create_model({'local-dir:' + folder!r}, pretrained=True).eval()")


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
