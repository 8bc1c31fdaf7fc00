"""A state dict in our names -> a ViT: the config from the shapes, a strict load, overrides.

Every format's reader ends here (`Loaded`), so there is one place that decides the
architecture and one strict load: a key that is missing or left over is an error, never a
silently half-loaded model.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch

from pipeline.model import VARIANTS, ViT, ViTConfig
from pipeline.weights.errors import CheckpointError, short_keys

# Fields that fix the shapes of the weights: an override must agree with the checkpoint.
STRUCTURAL = ("resnet_layers", "resnet_width", "patch_size", "hidden_size", "depth", "num_heads",
              "mlp_dim", "num_channels", "pool")
# Words for the mismatch errors.
_FIELD_WORDS = {"patch_size": "patch size", "hidden_size": "width", "depth": "depth",
                "num_heads": "number of heads", "mlp_dim": "MLP width",
                "num_channels": "input channels", "pool": "pooling",
                "resnet_layers": "ResNet stages (hybrid)", "resnet_width": "ResNet width"}
# Overrides that change no shape: set on the loaded model's config.
_RUNTIME = ("dropout", "attention_dropout", "drop_path", "norm_eps", "input_mean", "input_std")


class Loaded(NamedTuple):
    """What a format's reader hands over."""

    state: dict[str, torch.Tensor]     # in our names (pipeline.model.ViT's state dict)
    fields: dict                       # the ViTConfig fields the files state
    source: str                        # the format, for messages ("Hugging Face", "vit_jax")


def expected_structure(overrides: dict) -> dict:
    """Pop `variant` and the structural fields from `overrides` -> {field: value asked for}."""
    expected = {}
    variant = overrides.pop("variant", None)
    if variant is not None:
        vcfg = ViTConfig.from_variant(variant)
        expected.update({k: getattr(vcfg, k) for k in STRUCTURAL if k != "pool"})
    for key in STRUCTURAL:
        if key in overrides:
            expected[key] = overrides.pop(key)
    return expected


def apply_overrides(model: ViT, overrides: dict) -> ViT:
    """The non-structural overrides of `load_vit`: runtime fields, resolution, a new head."""
    num_classes = overrides.pop("num_classes", None)
    image_size = overrides.pop("image_size", None)
    runtime = {k: overrides.pop(k) for k in _RUNTIME if k in overrides}
    if overrides:
        raise TypeError(f"load_vit got unknown overrides {sorted(overrides)}")
    if runtime:
        cfg = model.cfg.replace(**runtime)
        state = model.state_dict()
        model = ViT(cfg)
        model.load_state_dict(state, strict=True)
    if image_size is not None:
        if image_size < model.cfg.effective_patch_size:
            raise CheckpointError(
                f"image_size={image_size} is smaller than the checkpoint's patch size "
                f"{model.cfg.effective_patch_size}; choose at least one patch")
        model.set_image_size(image_size)
    if num_classes is not None:
        model.reset_head(num_classes)
    return model


def structure(loaded: Loaded, uri: str, expected: dict) -> dict:
    """The ViTConfig fields of a checkpoint: inferred from the shapes, checked against what
    the files say and what the caller `expected`. A `loaded.state` of shapes only (tensors on
    the meta device) serves as well: no weight is read. An empty one (shapes not known
    without loading) checks only the fields the files state."""
    state, source = loaded.state, loaded.source
    inferred = infer_config(state, uri, source) if state else {}
    cfg_fields = {k: tuple(v) if isinstance(v, list) else v                # JSON lists
                  for k, v in loaded.fields.items()}
    for key, value in cfg_fields.items():
        if key in inferred and key != "num_heads" and inferred[key] != value:
            raise CheckpointError(
                f"{uri}: {source} config says {key}={value} but the weights have "
                f"{key}={inferred[key]}; the config and weights do not belong together")
    fields = {**inferred, **cfg_fields}
    if "num_heads" not in fields:
        if "num_heads" in expected:
            fields["num_heads"] = expected["num_heads"]
        elif "hidden_size" in fields:
            fields["num_heads"] = _heads_for_width(fields["hidden_size"], uri)
    for key, want in expected.items():
        if (state or key in fields) and fields.get(key) != want:
            raise CheckpointError(
                f"{uri}: {_FIELD_WORDS[key]} mismatch: the checkpoint has {key}="
                f"{fields.get(key)}, but {key}={want} was asked for")
    return fields


def build(loaded: Loaded, uri: str, expected: dict) -> ViT:
    """Infer the config from the shapes (checked against what the files say and what the
    caller `expected`: `structure`), build, load strictly."""
    fields = structure(loaded, uri, expected)
    try:
        cfg = ViTConfig.from_dict(fields)
    except ValueError as err:
        raise CheckpointError(f"{uri}: invalid ViT config: {err}") from None
    model = ViT(cfg)
    _load_strict(model, loaded.state, uri, loaded.source)
    return model


def _load_strict(model: ViT, state: dict[str, torch.Tensor], uri: str, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {short_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {short_keys(unexpected)}")
        raise CheckpointError(f"{uri} ({source}): " + "; ".join(parts))
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{uri} ({source}): shape mismatch for {key}: checkpoint "
                f"{tuple(state[key].shape)}, model {tuple(value.shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _heads_for_width(width: int, uri: str) -> int:
    """A bare state dict does not say how the width splits into heads: the paper's variant of
    that width does."""
    for _, width_, _, heads in VARIANTS.values():
        if width_ == width:
            return heads
    raise CheckpointError(
        f"{uri}: the number of attention heads cannot be read from a bare state dict of width "
        f"{width}; pass num_heads=... to load_vit")


def infer_config(state: dict[str, torch.Tensor], uri: str, source: str) -> dict:
    """ViTConfig fields from the shapes of a state dict in our names."""
    if "patch_embed.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(
            f"{uri} is not a ViT checkpoint ({source}): no patch embedding / position "
            f"embedding among its keys {short_keys(sorted(state), 5)}")
    D, C, P, P2 = state["patch_embed.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in state
                     if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"{uri} is not a ViT checkpoint ({source}): no encoder blocks")
    prefix = 1 if "cls_token" in state else 0
    n = state["pos_embed"].shape[1] - prefix
    grid = math.isqrt(n)
    if grid * grid != n or P != P2:
        raise CheckpointError(f"{uri} ({source}): non-square patch grid ({n} positions, "
                              f"{P}x{P2} patches) is not supported")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError(f"{uri} ({source}): missing keys [blocks.0.mlp.fc1.weight]")
    rep = state.get("pre_logits.weight")
    head = state.get("head.weight")
    fields = dict(patch_size=int(P), hidden_size=int(D), depth=depth, mlp_dim=int(fc1.shape[0]),
                  image_size=int(grid * P), num_channels=int(C),
                  num_classes=int(head.shape[0]) if head is not None else 0,
                  representation_size=int(rep.shape[0]) if rep is not None else None,
                  pool="token" if prefix else "gap")
    if any(k.startswith("resnet.") for k in state):
        fields.update(_infer_resnet(state, uri, source))
        fields["image_size"] = int(grid * P) * ViTConfig(**{
            k: fields[k] for k in ("resnet_layers", "resnet_width")}).resnet_stride
    return fields


def _infer_resnet(state: dict[str, torch.Tensor], uri: str, source: str) -> dict:
    """A hybrid's ResNet fields from the shapes: root width and channels, units per stage."""
    root = state.get("resnet.conv_root.weight")
    if root is None:
        raise CheckpointError(f"{uri} ({source}): missing keys [resnet.conv_root.weight]")
    units: dict[int, int] = {}
    for key in state:
        if m := re.match(r"resnet\.stages\.(\d+)\.(\d+)\.", key):
            stage, unit = int(m.group(1)), int(m.group(2))
            units[stage] = max(units.get(stage, 0), unit + 1)
    if sorted(units) != list(range(len(units))):
        raise CheckpointError(f"{uri} ({source}): ResNet stages {sorted(units)} are not "
                              f"numbered from 0 without gaps")
    return dict(resnet_layers=tuple(units[i] for i in range(len(units))),
                resnet_width=int(root.shape[0]), num_channels=int(root.shape[1]))
