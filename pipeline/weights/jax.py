"""The authors' `.npz` checkpoints: vit_jax (`Transformer/encoderblock_N/...`, the paper's
released weights) and big_vision (`params/img/...`, blocks scanned into one stacked array or
not), hybrids (a ResNet before the patch embedding) included.

flax names a module by its class and a counter (`LayerNorm_0`, `MlpBlock_3`) and lays out
parameters its own way: a Dense kernel is (in, out), a Conv kernel HWIO, a norm's gain is
`scale`, attention keeps the heads as an axis. The tables below map each of our parameters
to theirs and say how the array changes; every array of the checkpoint must be used (one left
over is an error, as a strict load would make it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.weights.build import Loaded
from pipeline.weights.errors import CheckpointError, short_keys
from pipeline.weights.files import read_npz

VIT_JAX, BIG_VISION = "vit_jax", "big_vision"


# How an array of theirs becomes ours.
def _same(a: np.ndarray) -> np.ndarray:
    return a


def _dense(a: np.ndarray) -> np.ndarray:
    return a.T                                    # (in, out) -> (out, in)


def _conv(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)                # HWIO -> OIHW


def _heads_in(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).T            # q/k/v kernel (D, H, d) -> (H*d, D)


def _heads_bias(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)                          # (H, d) -> (H*d,)


def _heads_out(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]).T           # out kernel (H, d, D) -> (D, H*d)


# (our name, their name or names (concatenated), layout); `{...}` are filled in per block.
Row = tuple[str, str | tuple[str, ...], Callable[[np.ndarray], np.ndarray]]
_EMBEDDING: list[Row] = [
    ("patch_embed.weight", "embedding/kernel", _conv),
    ("patch_embed.bias", "embedding/bias", _same),
]
_RESNET_ROOT: list[Row] = [
    ("resnet.conv_root.weight", "conv_root/kernel", _conv),
    ("resnet.gn_root.weight", "gn_root/scale", _same),
    ("resnet.gn_root.bias", "gn_root/bias", _same),
]
_QKV = ("query", "key", "value")
_BLOCK: list[Row] = [
    ("norm1.weight", "{norm1}/scale", _same),
    ("norm1.bias", "{norm1}/bias", _same),
    ("norm2.weight", "{norm2}/scale", _same),
    ("norm2.bias", "{norm2}/bias", _same),
    ("attn.qkv.weight", tuple(f"{{attn}}/{x}/kernel" for x in _QKV), _heads_in),
    ("attn.qkv.bias", tuple(f"{{attn}}/{x}/bias" for x in _QKV), _heads_bias),
    ("attn.proj.weight", "{attn}/out/kernel", _heads_out),
    ("attn.proj.bias", "{attn}/out/bias", _same),
    ("mlp.fc1.weight", "{mlp}/Dense_0/kernel", _dense),
    ("mlp.fc1.bias", "{mlp}/Dense_0/bias", _same),
    ("mlp.fc2.weight", "{mlp}/Dense_1/kernel", _dense),
    ("mlp.fc2.bias", "{mlp}/Dense_1/bias", _same),
]
_ENCODER_NORM: list[Row] = [
    ("norm.weight", "Transformer/encoder_norm/scale", _same),
    ("norm.bias", "Transformer/encoder_norm/bias", _same),
]
# Present in a checkpoint or not (a model pretrained without the pre-logits layer, or a
# backbone without its head): ours <- theirs, each a Dense layer.
_OPTIONAL_DENSE = (("pre_logits", "pre_logits"), ("head", "head"))
# A hybrid's ResNet units, `block<stage>/unit<unit>/...` counted from 1; ours from 0.
_UNIT_CONV = re.compile(r"block(\d+)/unit(\d+)/(conv[123]|conv_proj)/kernel")
_UNIT_NORM = re.compile(r"block(\d+)/unit(\d+)/(gn[123]|gn_proj)/(scale|bias)")
_BLOCK_PREFIX = re.compile(r"Transformer/encoderblock_(\d+)/")
_SCANNED = "Transformer/encoderblock/"


def read_file(path: Path, uri: str) -> Loaded:
    return from_jax(read_npz(path), uri)


def from_jax(arrays: dict[str, np.ndarray], uri: str = "<npz>") -> Loaded:
    """The authors' .npz (vit_jax or big_vision names) -> our state dict, the number of heads,
    and which of the two it was."""
    params = _unstack_scanned(_image_tower(arrays, uri))
    source = VIT_JAX if "Transformer/posembed_input/pos_embedding" in params else BIG_VISION
    p = _Params(params, uri, source)
    out = p.convert(_EMBEDDING)
    if "conv_root/kernel" in p:
        out |= _resnet(p)
    out |= _tokens(p)
    heads = None
    for b in sorted({int(m.group(1)) for k in params if (m := _BLOCK_PREFIX.match(k))}):
        parts = _block_parts(p, b)
        out |= p.convert(_BLOCK, prefix=f"blocks.{b}.", **parts)
        heads = params[parts["attn"] + "/query/kernel"].shape[1]     # (D, H, d)
    out |= p.convert(_ENCODER_NORM)
    for ours, theirs in _OPTIONAL_DENSE:
        if f"{theirs}/kernel" in p:
            out |= p.convert([(f"{ours}.weight", f"{theirs}/kernel", _dense),
                              (f"{ours}.bias", f"{theirs}/bias", _same)])
    if left := p.unused():
        raise p.error(f"unexpected keys {short_keys(left)}")
    return Loaded(out, {"num_heads": int(heads)} if heads else {}, source)


class _Params:
    """The checkpoint's arrays by name; `convert` marks each one it uses, so that what is
    left over can be named."""

    def __init__(self, params: dict[str, np.ndarray], uri: str, source: str):
        self.params, self.uri, self.source = params, uri, source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.uri} ({self.source}): {problem}")

    def take(self, key: str) -> np.ndarray:
        """Their array `key`, marked as used."""
        if key not in self.params:
            raise self.error(f"missing keys [{key}]")
        self.used.add(key)
        return self.params[key]

    def convert(self, rows: list[Row], prefix: str = "", **names: str
                ) -> dict[str, torch.Tensor]:
        """`rows` applied: {prefix + our name: their array(s) in our layout}; `names` fill
        in the `{...}` of their names."""
        out = {}
        for ours, theirs, layout in rows:
            keys = (theirs,) if isinstance(theirs, str) else theirs
            parts = [_tensor(layout(self.take(k.format(**names)))) for k in keys]
            out[prefix + ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out

    def unused(self) -> list[str]:
        return sorted(set(self.params) - self.used)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))


def _image_tower(arrays: dict[str, np.ndarray], uri: str) -> dict[str, np.ndarray]:
    """The image model's parameters by module path: big_vision's `params/` prefix (beside
    optimizer state, which is ignored) and a two-tower model's `img/` removed, its `txt/`
    tower dropped."""
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    if not params:
        params = dict(arrays)
    params = {(k[len("img/"):] if k.startswith("img/") else k): v for k, v in params.items()}
    params = {k: v for k, v in params.items() if not k.startswith("txt/")}
    if any(k.startswith("MAPHead") for k in params):
        raise CheckpointError(f"{uri}: big_vision 'map' pooling is not supported; use a "
                              f"checkpoint with 'token' or 'gap' pooling")
    if "embedding/kernel" not in params:
        raise CheckpointError(f"{uri} is not a ViT checkpoint: no embedding/kernel among "
                              f"{short_keys(sorted(params), 5)}")
    return params


def _unstack_scanned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision `scan=True` stores one `Transformer/encoderblock/...` with a leading depth
    axis; split it into `encoderblock_N`."""
    stacked = {k: v for k, v in params.items() if k.startswith(_SCANNED)}
    if not stacked:
        return params
    out = {k: v for k, v in params.items() if not k.startswith(_SCANNED)}
    for key, value in stacked.items():
        for i in range(value.shape[0]):
            out[f"Transformer/encoderblock_{i}/{key[len(_SCANNED):]}"] = value[i]
    return out


def _resnet(p: _Params) -> dict[str, torch.Tensor]:
    """A hybrid's ResNet: the root, then every unit's convolutions and GroupNorms."""
    out = p.convert(_RESNET_ROOT)
    for key in sorted(p.params):
        if m := _UNIT_CONV.fullmatch(key):
            out |= p.convert([(f"{_unit(m)}.{m.group(3)}.weight", key, _conv)])
        elif m := _UNIT_NORM.fullmatch(key):
            param = "weight" if m.group(4) == "scale" else "bias"
            out |= p.convert([(f"{_unit(m)}.{m.group(3)}.{param}", key, _same)])
    return out


def _unit(m: re.Match) -> str:
    return f"resnet.stages.{int(m.group(1)) - 1}.{int(m.group(2)) - 1}"


def _tokens(p: _Params) -> dict[str, torch.Tensor]:
    """The class token (if any) and the learned position embedding. big_vision adds no
    position embedding to the class token: its row in ours is zero."""
    out = p.convert([("cls_token", "cls", _same)]) if "cls" in p else {}
    if p.source == VIT_JAX:
        return out | p.convert([("pos_embed", "Transformer/posembed_input/pos_embedding",
                                 _same)])
    if "pos_embedding" not in p:
        raise CheckpointError(f"{p.uri} (big_vision): no learned pos_embedding (sincos "
                              f"position embeddings are not supported)")
    pos = p.convert([("pos_embed", "pos_embedding", _same)])["pos_embed"]     # (1, N, D)
    if "cls_token" in out:
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)        # (1, N+1, D)
    return out | {"pos_embed": pos}


def _block_parts(p: _Params, b: int) -> dict[str, str]:
    """The module paths of encoder block `b`'s parts. The counters differ: vit_jax has
    LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; big_vision
    LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0."""
    pre = f"Transformer/encoderblock_{b}/"
    names = {k[len(pre):].split("/")[0] for k in p.params if k.startswith(pre)}
    norms = sorted(n for n in names if n.startswith("LayerNorm_"))
    attn = next((n for n in names if n.startswith("MultiHeadDotProductAttention_")), None)
    mlp = next((n for n in names if n.startswith("MlpBlock_")), None)
    if len(norms) != 2 or attn is None or mlp is None:
        raise p.error(f"block {b} has parts {sorted(names)}, expected two LayerNorms, "
                      f"attention and an MLP block")
    return {"norm1": pre + norms[0], "norm2": pre + norms[1], "attn": pre + attn,
            "mlp": pre + mlp}
