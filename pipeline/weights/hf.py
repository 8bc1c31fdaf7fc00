"""Hugging Face transformers' ViT (`ViTModel` / `ViTForImageClassification`), both ways.

Import: a directory with `config.json` (model_type "vit") and `model.safetensors` or
`pytorch_model.bin`, plus `preprocessor_config.json` for the input normalisation, or a bare
state dict; in the names of transformers 4.x (`encoder.layer.N.attention.attention.query`, as
the checkpoints on the Hub) or 5.x (`layers.N.attention.q_proj`). q, k and v are separate
there and fused (`attn.qkv`) in ours.

Export: the 4.x names, which transformers 5.x also loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.model import ViTConfig
from pipeline.weights.build import Loaded
from pipeline.weights.errors import CheckpointError, short_keys
from pipeline.weights.files import weight_files

SOURCE = "Hugging Face"

_BLOCK = {
    # transformers 4.x (and the checkpoints on the Hub)
    r"encoder\.layer\.(\d+)\.layernorm_before\.": "blocks.{}.norm1.",
    r"encoder\.layer\.(\d+)\.layernorm_after\.": "blocks.{}.norm2.",
    r"encoder\.layer\.(\d+)\.attention\.output\.dense\.": "blocks.{}.attn.proj.",
    r"encoder\.layer\.(\d+)\.intermediate\.dense\.": "blocks.{}.mlp.fc1.",
    r"encoder\.layer\.(\d+)\.output\.dense\.": "blocks.{}.mlp.fc2.",
    r"encoder\.layer\.(\d+)\.attention\.attention\.query\.": "blocks.{}.attn.q.",
    r"encoder\.layer\.(\d+)\.attention\.attention\.key\.": "blocks.{}.attn.k.",
    r"encoder\.layer\.(\d+)\.attention\.attention\.value\.": "blocks.{}.attn.v.",
    # transformers 5.x
    r"layers\.(\d+)\.layernorm_before\.": "blocks.{}.norm1.",
    r"layers\.(\d+)\.layernorm_after\.": "blocks.{}.norm2.",
    r"layers\.(\d+)\.attention\.o_proj\.": "blocks.{}.attn.proj.",
    r"layers\.(\d+)\.mlp\.fc1\.": "blocks.{}.mlp.fc1.",
    r"layers\.(\d+)\.mlp\.fc2\.": "blocks.{}.mlp.fc2.",
    r"layers\.(\d+)\.attention\.q_proj\.": "blocks.{}.attn.q.",
    r"layers\.(\d+)\.attention\.k_proj\.": "blocks.{}.attn.k.",
    r"layers\.(\d+)\.attention\.v_proj\.": "blocks.{}.attn.v.",
}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.weight",   # ViTModel's pooler is the tanh pre-logits
    "pooler.dense.bias": "pre_logits.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Our block parameter names -> transformers 4.x's (under encoder.layer.N.), as on the Hub.
_BLOCK_OUT = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
              "attn.proj.": "attention.output.dense.", "mlp.fc1.": "intermediate.dense.",
              "mlp.fc2.": "output.dense."}


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def claims_dir(path: Path) -> bool:
    """Any other `config.json` directory is taken for transformers' (and refused by
    `read_dir` if it is not a ViT)."""
    return (path / "config.json").exists()


def read_dir(path: Path, uri: str, read_file) -> Loaded:
    """A `save_pretrained` directory; `read_file` reads its weights file (any names). The
    config is checked first, so that what our ViT cannot be is named by its field, not found
    later as keys that do not match."""
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") != "vit":
        raise CheckpointError(f"{uri} is not a ViT checkpoint: config.json has model_type="
                              f"{hf.get('model_type')!r}, expected 'vit'")
    fields = config_fields(hf, uri)
    weights = weight_files(path)
    if not weights:
        raise CheckpointError(f"{uri}: config.json found but no model.safetensors or "
                              f"pytorch_model.bin beside it")
    state = read_file(weights[0], uri).state
    if (path / "preprocessor_config.json").exists():
        pre = json.loads((path / "preprocessor_config.json").read_text())
        if pre.get("do_normalize", True) and "image_mean" in pre:
            fields.update(input_mean=pre["image_mean"], input_std=pre["image_std"])
        elif not pre.get("do_normalize", True):
            fields.update(input_mean=(0.0,) * 3, input_std=(1.0,) * 3)
    return Loaded(state, fields, SOURCE)


# The classes whose weights are a ViT and nothing else (ViTForMaskedImageModeling adds a
# decoder, which would have to be dropped).
_ARCHITECTURES = ("ViTModel", "ViTForImageClassification")


def config_fields(hf: dict, uri: str) -> dict:
    """ViTConfig fields a Hugging Face config.json states; every setting of transformers'
    `ViTConfig` that changes what the weights compute and that ours cannot represent is
    refused, in one line naming the field and its value. Settings that do not change the
    outputs (dropout rates, initializer_range, encoder_stride: the masked-image decoder's)
    are ignored."""
    def refuse(field: str, why: str):
        return CheckpointError(f"{uri}: config.json has {field}={hf[field]!r}: {why}")

    for arch in hf.get("architectures") or ():
        if arch not in _ARCHITECTURES:
            raise refuse("architectures", f"{arch} is not supported, only "
                                          f"{' and '.join(_ARCHITECTURES)}")
    if hf.get("qkv_bias", True) is not True:
        raise refuse("qkv_bias", "our ViT (the paper's) always has q, k and v biases")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_python"):
        raise refuse("hidden_act", "only the exact GELU ('gelu') is supported, as in the "
                                   "paper's models")
    if hf.get("pooler_act", "tanh") != "tanh":
        raise refuse("pooler_act", "the paper's pre-logits layer (the pooler here) uses tanh")
    for field in ("image_size", "patch_size"):
        value = hf.get(field)
        if isinstance(value, (list, tuple)) and len(set(value)) != 1:
            raise refuse(field, "only square images and patches are supported")
    if hf.get("pruned_heads"):
        raise refuse("pruned_heads", "attention heads removed per layer are not supported")
    patch = hf.get("patch_size", 16)
    return dict(num_heads=hf.get("num_attention_heads", 12),
                hidden_size=hf.get("hidden_size", 768),
                mlp_dim=hf.get("intermediate_size", 3072),
                depth=hf.get("num_hidden_layers", 12),
                patch_size=patch[0] if isinstance(patch, (list, tuple)) else patch,
                num_channels=hf.get("num_channels", 3),
                # HF's ViT configs say 1e-12 where the authors' flax models use 1e-6, also
                # for checkpoints converted from theirs. We keep what the source says, so
                # an import reproduces its outputs; with activations of variance ~1 the two
                # differ by ~5e-7 relative. `load_vit(..., norm_eps=1e-6)` overrides it.
                norm_eps=hf.get("layer_norm_eps", 1e-12))


def claims_keys(keys: set[str]) -> bool:
    return any("embeddings.patch_embeddings" in k for k in keys)


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `ViTModel` / `ViTForImageClassification` names -> ours (q, k, v fused)."""
    out, unmatched = {}, []
    for key, value in state.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key == "embeddings.mask_token":
            continue  # used only by ViTForMaskedImageModeling
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        for pattern, target in _BLOCK.items():
            if m := re.match(pattern, key):
                out[target.format(m.group(1)) + key[m.end():]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise CheckpointError(f"Hugging Face ViT state dict has unexpected keys "
                              f"{short_keys(sorted(unmatched))}")
    return _fuse_qkv(out)


def _fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """blocks.N.attn.{q,k,v}.{weight,bias} -> blocks.N.attn.qkv.{weight,bias}."""
    out = {k: v for k, v in state.items() if not re.search(r"\.attn\.[qkv]\.", k)}
    blocks = {m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.attn\.[qkv]\.", k))}
    for b in sorted(blocks, key=int):
        for kind in ("weight", "bias"):
            parts = [state.get(f"blocks.{b}.attn.{x}.{kind}") for x in "qkv"]
            if any(p is None for p in parts):
                missing = [f"blocks.{b}.attn.{x}.{kind}"
                           for x, p in zip("qkv", parts, strict=True) if p is None]
                raise CheckpointError(f"missing keys {short_keys(missing)}")
            out[f"blocks.{b}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export(cfg: ViTConfig, state: dict, uri: str) -> tuple[dict, dict]:
    """-> (tensors in transformers' names, {file name: JSON document}). A model with a
    classifier and no pre-logits layer becomes a `ViTForImageClassification`; one with the
    pre-logits layer a `ViTModel` whose pooler is that layer (see `export_vit`)."""
    if cfg.is_hybrid:
        raise CheckpointError(f"{uri}: transformers 5 has no ViT hybrid (ViTHybrid was "
                              f"removed); export with format='timm' (vit_*_r50_s16_* etc.)")
    if cfg.pool != "token":
        raise CheckpointError(f"{uri}: a global-average-pool ViT has no Hugging Face "
                              f"ViTModel equivalent (it always has a class token); export "
                              f"with format='timm'")
    body = _theirs(state, cfg.hidden_size, uri)
    classify = cfg.num_classes > 0 and not cfg.representation_size
    if classify:
        tensors = {(k if k.startswith("classifier.") else f"vit.{k}"): v for k, v in body.items()}
        arch = "ViTForImageClassification"
    else:
        tensors = {k: v for k, v in body.items() if not k.startswith("classifier.")}
        arch = "ViTModel"
    config = {
        "architectures": [arch], "model_type": "vit",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": "gelu", "layer_norm_eps": cfg.norm_eps,
        "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels, "qkv_bias": True, "encoder_stride": cfg.patch_size,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "torch_dtype": "float32",
    }
    if cfg.representation_size:
        config.update(pooler_output_size=cfg.representation_size, pooler_act="tanh")
    if classify:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    preprocessor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(cfg.input_mean), "image_std": list(cfg.input_std),
    }
    return tensors, {"config.json": config, "preprocessor_config.json": preprocessor}


def load_recipe(folder: str, config: dict) -> str:
    """The Python a transformers user runs to load the export in local `folder` (`vit-export`
    prints it, the interop tests run it as printed): the class config.json names."""
    arch = config["architectures"][0]
    return (f"from transformers import {arch}\n"
            f"model = {arch}.from_pretrained({folder!r}).eval()")


def _theirs(state: dict, width: int, uri: str) -> dict:
    """Our state dict in transformers 4.x's `ViTModel` names (qkv split into q, k, v)."""
    body = {}
    for key, value in state.items():
        if m := re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            for part, name in zip(value.split(width, 0), ("query", "key", "value"), strict=True):
                body[f"encoder.layer.{m.group(1)}.attention.attention.{name}.{m.group(2)}"] = \
                    part.contiguous()
            continue
        if m := re.match(r"blocks\.(\d+)\.(\w+\.\w+\.|norm[12]\.)(weight|bias)$", key):
            name = _BLOCK_OUT[m.group(2)]
            body[f"encoder.layer.{m.group(1)}.{name}{m.group(3)}"] = value
            continue
        hf_key = next((k for k, v in _TOP.items() if v == key), None)
        if hf_key is None:
            raise CheckpointError(f"{uri}: no Hugging Face name for {key}")
        body[hf_key] = value
    return body
