"""ViT weights: our checkpoint format, and one loader for ours and the formats people have.

Our format is a directory (local or `s3://`):

    model.safetensors   the state dict of `pipeline.model.ViT`
    vit.json            {"format": "vit-pipeline", "format_version": 1,
                         "config": ViTConfig fields, "metadata": {...}}

`vit.json` is written last, so a directory that has it is complete.

`load_vit(uri, **overrides)` detects from the files what it was given:
  - ours (a directory with `vit.json`);
  - Hugging Face transformers ViT (`ViTModel` / `ViTForImageClassification`): a directory with
    `config.json` and `model.safetensors` or `pytorch_model.bin`, or a bare state dict, in the
    names of transformers 4.x (`encoder.layer.N.attention.attention.query`) or 5.x
    (`layers.N.attention.q_proj`);
  - timm `vit_*` state dicts (`blocks.N.attn.qkv`);
  - the authors' `.npz` (vit_jax `Transformer/encoderblock_N/...`; big_vision `params/img/...`,
    scanned or not).
Conversion is a pure function over a state dict; the result is loaded with `strict=True`, so a
key that is missing or left over is an error, never a silently half-loaded model. Nothing is
unpickled: safetensors, `torch.load(weights_only=True)` and `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.model import VARIANTS, ViT, ViTConfig

FORMAT = "vit-pipeline"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "vit.json"

# Fields that fix the shapes of the weights: an override must agree with the checkpoint.
STRUCTURAL = ("resnet_layers", "resnet_width", "patch_size", "hidden_size", "depth", "num_heads",
              "mlp_dim", "num_channels", "pool")
# Words for the mismatch errors.
_FIELD_WORDS = {"patch_size": "patch size", "hidden_size": "width", "depth": "depth",
                "num_heads": "number of heads", "mlp_dim": "MLP width",
                "num_channels": "input channels", "pool": "pooling",
                "resnet_layers": "ResNet stages (hybrid)", "resnet_width": "ResNet width"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with one line naming the problem."""


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save_vit(model: ViT, uri: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write `model` in our format to a directory (local path or s3:// prefix); returns uri."""
    model = _unwrap(model)
    uri = str(uri)
    with tempfile.TemporaryDirectory() as tmp:
        write_weights(model.state_dict(), model.cfg, tmp, metadata)
        if storage.is_s3(uri):
            storage.upload_dir(tmp, uri, last=(CONFIG_FILE,))
        else:
            out = Path(uri)
            out.mkdir(parents=True, exist_ok=True)
            # Replace files atomically, the config last: a reader never sees half a checkpoint.
            (out / CONFIG_FILE).unlink(missing_ok=True)
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                shutil.copyfile(os.path.join(tmp, name), out / f".{name}.tmp")
                os.replace(out / f".{name}.tmp", out / name)
    return uri


def write_weights(state: dict[str, torch.Tensor], cfg: ViTConfig, directory: str | os.PathLike,
                  metadata: dict | None = None) -> None:
    """Write a ViT state dict and its config in our format into a local directory."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
           "metadata": metadata or {}}
    save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def _unwrap(model: torch.nn.Module) -> ViT:
    """Strip DDP / FSDP-1 / torch.compile wrappers."""
    while not isinstance(model, ViT):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a pipeline.model.ViT, got {type(model).__name__}")
        model = inner
    return model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_vit(uri: str | os.PathLike, **overrides) -> ViT:
    """Load a ViT from our format or an import format (detected from the files).

    Overrides:
      - `num_classes=K`: remove the whole head and attach a zero-initialised K-way linear head
        (the fine-tuning head, §3.2);
      - `image_size=S`: resample the position embedding to S (bilinear, as vit_jax);
      - `dropout`, `attention_dropout`, `drop_path`: set for training;
      - `input_mean`, `input_std`: the input normalisation, where the files do not state it
        (a bare state dict; the default is [-1, 1], the authors' and timm's `vit_*`);
      - `variant="B/16"` or structural fields (`patch_size`, `hidden_size`, `depth`,
        `num_heads`, `mlp_dim`, ...): must agree with the checkpoint (an error otherwise);
        `num_heads` also fills in what a bare state dict cannot tell.
    """
    uri = str(uri)
    expected = _expected_structure(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = hub_snapshot(uri) if uri.startswith(HUB_SCHEME) else storage.fetch(uri, tmp)
        except storage.StorageError as err:
            if "no such object" in str(err) or "nothing found" in str(err):
                raise CheckpointError(f"checkpoint not found: {uri}") from None
            raise
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {uri}")
        state, cfg_fields, source = _read_any(path, uri, expected.get("num_heads"))
    model = _build(state, cfg_fields, uri, source, expected)
    return _apply_overrides(model, overrides)


HUB_SCHEME = "hf://"


def hub_snapshot(uri: str) -> Path:
    """`hf://org/name[@revision]` -> the local directory of that Hugging Face Hub repository,
    through `huggingface_hub`'s cache (HF_HOME / HF_HUB_CACHE): downloaded once, then read
    from the cache; with HF_HUB_OFFLINE=1 only the cache is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    name, _, revision = uri[len(HUB_SCHEME):].partition("@")
    try:
        return Path(snapshot_download(name, revision=revision or None, allow_patterns=[
            "*.json", "*.safetensors", "pytorch_model.bin"]))
    except HFValidationError as err:
        raise CheckpointError(f"{uri}: not a Hugging Face Hub name (org/name[@revision]): "
                              f"{str(err).splitlines()[0]}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{uri}: not in the Hugging Face cache and the Hub cannot be "
                              f"reached (HF_HUB_OFFLINE or no network); download it where "
                              f"there is network, or point HF_HUB_CACHE at a filled cache"
                              ) from None
    except Exception as err:  # noqa: BLE001 - repository not found, auth, network: one line
        raise CheckpointError(f"{uri}: cannot fetch from the Hugging Face Hub: "
                              f"{str(err).splitlines()[0][:200]}") from None


def read_metadata(uri: str | os.PathLike) -> dict:
    """The metadata our format keeps in `vit.json` (step, run name, MLflow run id); {} for
    a checkpoint in another format or one that cannot be read."""
    try:
        doc = json.loads(storage.read_bytes(storage.join(str(uri), CONFIG_FILE)))
    except (storage.StorageError, OSError, ValueError):
        return {}
    return doc.get("metadata", {}) if doc.get("format") == FORMAT else {}


def _expected_structure(overrides: dict) -> dict:
    expected = {}
    variant = overrides.pop("variant", None)
    if variant is not None:
        vcfg = ViTConfig.from_variant(variant)
        expected.update({k: getattr(vcfg, k) for k in STRUCTURAL if k != "pool"})
    for key in STRUCTURAL:
        if key in overrides:
            expected[key] = overrides.pop(key)
    return expected


def _apply_overrides(model: ViT, overrides: dict) -> ViT:
    num_classes = overrides.pop("num_classes", None)
    image_size = overrides.pop("image_size", None)
    runtime = {k: overrides.pop(k) for k in (
        "dropout", "attention_dropout", "drop_path", "norm_eps", "input_mean", "input_std")
        if k in overrides}
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


def _build(state: dict[str, torch.Tensor], cfg_fields: dict, uri: str, source: str,
           expected: dict) -> ViT:
    """Infer the config from the shapes (checked against what the files say), build, load."""
    inferred = _infer_config(state, uri, source)
    cfg_fields = {k: tuple(v) if isinstance(v, list) else v                # JSON lists
                  for k, v in cfg_fields.items()}
    for key, value in cfg_fields.items():
        if key in inferred and key != "num_heads" and inferred[key] != value:
            raise CheckpointError(
                f"{uri}: {source} config says {key}={value} but the weights have "
                f"{key}={inferred[key]}; the config and weights do not belong together")
    fields = {**inferred, **cfg_fields}
    if "num_heads" not in fields:
        if "num_heads" in expected:
            fields["num_heads"] = expected["num_heads"]
        else:
            fields["num_heads"] = _heads_for_width(fields["hidden_size"], uri)
    for key, want in expected.items():
        if fields.get(key) != want:
            raise CheckpointError(
                f"{uri}: {_FIELD_WORDS[key]} mismatch: the checkpoint has {key}="
                f"{fields.get(key)}, but {key}={want} was asked for")
    try:
        cfg = ViTConfig.from_dict(fields)
    except ValueError as err:
        raise CheckpointError(f"{uri}: invalid ViT config: {err}") from None
    model = ViT(cfg)
    _load_strict(model, state, uri, source)
    return model


def _load_strict(model: ViT, state: dict[str, torch.Tensor], uri: str, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise CheckpointError(f"{uri} ({source}): " + "; ".join(parts))
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{uri} ({source}): shape mismatch for {key}: checkpoint "
                f"{tuple(state[key].shape)}, model {tuple(value.shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def _short(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return f"[{shown}{more}]"


def _heads_for_width(width: int, uri: str) -> int:
    for _, width_, _, heads in VARIANTS.values():
        if width_ == width:
            return heads
    raise CheckpointError(
        f"{uri}: the number of attention heads cannot be read from a bare state dict of width "
        f"{width}; pass num_heads=... to load_vit")


def _infer_config(state: dict[str, torch.Tensor], uri: str, source: str) -> dict:
    """ViTConfig fields from the shapes of a state dict in our names."""
    if "patch_embed.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(
            f"{uri} is not a ViT checkpoint ({source}): no patch embedding / position "
            f"embedding among its keys {_short(sorted(state), 5)}")
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


# ---------------------------------------------------------------------------------------------
# Reading files and detecting the format
# ---------------------------------------------------------------------------------------------
def _read_any(path: Path, uri: str, num_heads: int | None):
    """-> (state dict in our names, config fields the files state, source name)."""
    try:
        if path.is_dir():
            return _read_dir(path, uri, num_heads)
        return _read_file(path, uri, num_heads)
    except (CheckpointError, storage.StorageError):
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse is one clear line
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{uri}: cannot read checkpoint file (corrupt or truncated?): "
                              f"{msg[:200]}") from None


def _read_dir(path: Path, uri: str, num_heads: int | None):
    if (path / CONFIG_FILE).exists():
        doc = json.loads((path / CONFIG_FILE).read_text())
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{uri}: {CONFIG_FILE} is not a {FORMAT} config")
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{uri}: checkpoint format version {doc['format_version']} "
                                  f"is newer than this code ({FORMAT_VERSION}); upgrade")
        if not (path / WEIGHTS_FILE).exists():
            raise CheckpointError(f"{uri}: {WEIGHTS_FILE} is missing next to {CONFIG_FILE}")
        state = _read_tensors(path / WEIGHTS_FILE)
        return state, dict(doc["config"]), "vit-pipeline"
    weights = [path / n for n in ("model.safetensors", "pytorch_model.bin")
               if (path / n).exists()]
    if (path / "config.json").exists():
        hf = json.loads((path / "config.json").read_text())
        if "architecture" in hf and "model_type" not in hf:       # timm's hub layout
            return _read_timm_dir(path, hf, uri, num_heads)
        if hf.get("model_type") != "vit":
            raise CheckpointError(f"{uri} is not a ViT checkpoint: config.json has model_type="
                                  f"{hf.get('model_type')!r}, expected 'vit'")
        if not weights:
            raise CheckpointError(f"{uri}: config.json found but no model.safetensors or "
                                  f"pytorch_model.bin beside it")
        state, _, source = _read_file(weights[0], uri, num_heads)
        fields = _hf_config_fields(hf)
        if (path / "preprocessor_config.json").exists():
            pre = json.loads((path / "preprocessor_config.json").read_text())
            if pre.get("do_normalize", True) and "image_mean" in pre:
                fields.update(input_mean=pre["image_mean"], input_std=pre["image_std"])
            elif not pre.get("do_normalize", True):
                fields.update(input_mean=(0.0,) * 3, input_std=(1.0,) * 3)
        return state, fields, "Hugging Face"
    if weights:
        return _read_file(weights[0], uri, num_heads)
    files = sorted(p.name for p in path.iterdir())
    if not files:
        raise CheckpointError(f"checkpoint not found: {uri} is an empty directory")
    raise CheckpointError(f"{uri} is not a ViT checkpoint: no {CONFIG_FILE}, config.json, "
                          f"model.safetensors or pytorch_model.bin in {_short(files, 5)}")


def _read_timm_dir(path: Path, doc: dict, uri: str, num_heads: int | None):
    """A directory as timm's `save_for_hf` / the Hub writes it: config.json with
    `architecture`, `model_args` and `pretrained_cfg` (mean / std), and the weights."""
    if not str(doc["architecture"]).startswith("vit_"):
        raise CheckpointError(f"{uri} is not a ViT checkpoint: timm architecture "
                              f"{doc['architecture']!r}")
    weights = [path / n for n in ("model.safetensors", "pytorch_model.bin")
               if (path / n).exists()]
    if not weights:
        raise CheckpointError(f"{uri}: config.json found but no model.safetensors or "
                              f"pytorch_model.bin beside it")
    state, fields, _ = _read_file(weights[0], uri, num_heads)
    args, pre = doc.get("model_args", {}), doc.get("pretrained_cfg", {})
    if "num_heads" in args:
        fields["num_heads"] = args["num_heads"]
    # timm's vit_* default (IMAGENET_INCEPTION_MEAN / STD) when the config does not say
    fields.update(input_mean=pre.get("mean", (0.5,) * 3), input_std=pre.get("std", (0.5,) * 3))
    return state, fields, "timm"


def _read_file(path: Path, uri: str, num_heads: int | None):
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return from_jax(arrays, uri)
    if suffix == ".safetensors":
        state = _read_tensors(path)
    elif suffix in (".bin", ".pt", ".pth", ".ckpt"):
        obj = _torch_load(path, uri)
        for key in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{uri} is not a ViT checkpoint: it holds a "
                                  f"{type(obj).__name__}, not a state dict")
        state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise CheckpointError(f"{uri}: unknown checkpoint file type {suffix!r}; expected a "
                              f"directory, .safetensors, .bin/.pt/.pth or .npz")
    return from_state_dict(state, uri)


def _torch_load(path: Path, uri: str):
    """`torch.load(weights_only=True)`, with its refusal as one line of ours: torch's own
    message suggests `weights_only=False`, which would run whatever the file holds."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip() and not
                 ln.startswith(("Check the documentation", "Please file an issue"))]
        why = " ".join(lines).removeprefix("WeightsUnpickler error:").strip()
        raise CheckpointError(
            f"{uri}: refused: not a file of tensors ({why[:160] or 'not a torch file'}); it "
            f"is damaged, or holds Python objects that loading would run, which this "
            f"pipeline never does; re-save it as safetensors or a plain state dict") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _hf_config_fields(hf: dict) -> dict:
    """ViTConfig fields a Hugging Face config.json states."""
    if hf.get("qkv_bias", True) is False:
        raise CheckpointError("Hugging Face ViT without qkv bias is not the paper's model")
    fields = dict(num_heads=hf.get("num_attention_heads", 12),
                  hidden_size=hf.get("hidden_size", 768),
                  mlp_dim=hf.get("intermediate_size", 3072),
                  depth=hf.get("num_hidden_layers", 12),
                  patch_size=hf.get("patch_size", 16),
                  num_channels=hf.get("num_channels", 3),
                  # HF's ViT configs say 1e-12 where the authors' flax models use 1e-6, also
                  # for checkpoints converted from theirs. We keep what the source says, so
                  # an import reproduces its outputs; with activations of variance ~1 the two
                  # differ by ~5e-7 relative. `load_vit(..., norm_eps=1e-6)` overrides it.
                  norm_eps=hf.get("layer_norm_eps", 1e-12))
    if hf.get("pooler_act", "tanh") != "tanh":
        raise CheckpointError(f"Hugging Face ViT with pooler_act={hf['pooler_act']!r} is not "
                              f"supported (the paper's pre-logits use tanh)")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_python"):
        raise CheckpointError(f"Hugging Face ViT with hidden_act={act!r} is not supported "
                              f"(exact GELU only)")
    return fields


# ---------------------------------------------------------------------------------------------
# Conversions: pure functions from a foreign state dict to ours
# ---------------------------------------------------------------------------------------------
def from_state_dict(state: dict[str, torch.Tensor], uri: str = "<state dict>"):
    """Detect ours / Hugging Face / timm by key names and convert to our names."""
    state = {_strip_wrappers(k): v for k, v in state.items()}
    keys = set(state)
    if "patch_embed.proj.weight" in keys:
        return from_timm(state), {}, "timm"
    if "patch_embed.weight" in keys:
        return state, {}, "vit-pipeline"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return from_hf(state), {}, "Hugging Face"
    raise CheckpointError(f"{uri} is not a ViT checkpoint: no ViT keys among "
                          f"{_short(sorted(keys), 5)}")


def _strip_wrappers(key: str) -> str:
    for prefix in ("module.", "_orig_mod.", "model."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")


# timm's hybrid backbone (`patch_embed.backbone.`, a `ResNetV2` with preact=False, or its stem
# alone) -> our `resnet.` names.
_TIMM_RESNET = [
    (r"stem\.conv\.", "conv_root."), (r"stem\.norm\.", "gn_root."),
    (r"conv\.", "conv_root."), (r"norm\.", "gn_root."),                    # stem-only backbone
    (r"stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.", "stages.{}.{}.conv_proj."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.downsample\.norm\.", "stages.{}.{}.gn_proj."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv([123])\.", "stages.{}.{}.conv{}."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.norm([123])\.", "stages.{}.{}.gn{}."),
]


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
            for pattern, target in _TIMM_RESNET:
                if m := re.match(pattern, rest):
                    key = "resnet." + target.format(*m.groups()) + rest[m.end():]
                    break
            out[key] = value          # an unknown name stays and fails the strict load
            continue
        key = key.replace("patch_embed.proj.", "patch_embed.")
        key = key.replace("pre_logits.fc.", "pre_logits.")
        out[key] = value
    return out


_HF_BLOCK = {
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
_HF_TOP = {
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


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `ViTModel` / `ViTForImageClassification` names -> ours (q, k, v fused)."""
    out, unmatched = {}, []
    for key, value in state.items():
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key == "embeddings.mask_token":
            continue  # used only by ViTForMaskedImageModeling
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        for pattern, target in _HF_BLOCK.items():
            if m := re.match(pattern, key):
                out[target.format(m.group(1)) + key[m.end():]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise CheckpointError(f"Hugging Face ViT state dict has unexpected keys "
                              f"{_short(sorted(unmatched))}")
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
                raise CheckpointError(f"missing keys {_short(missing)}")
            out[f"blocks.{b}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def from_jax(arrays: dict[str, np.ndarray], uri: str = "<npz>"):
    """The authors' .npz (vit_jax or big_vision names) -> (our state dict, config, source)."""
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
                              f"{_short(sorted(params), 5)}")
    params = _unstack_scanned(params)
    source = "vit_jax" if "Transformer/posembed_input/pos_embedding" in params else "big_vision"
    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.float32)))  # noqa: E731
    used, out = set(), {}

    def take(key):
        if key not in params:
            raise CheckpointError(f"{uri} ({source}): missing keys [{key}]")
        used.add(key)
        return params[key]

    out["patch_embed.weight"] = t(take("embedding/kernel").transpose(3, 2, 0, 1))  # HWIO -> OIHW
    out["patch_embed.bias"] = t(take("embedding/bias"))
    if "conv_root/kernel" in params:                     # a hybrid: the ResNet's root, stages
        out["resnet.conv_root.weight"] = t(take("conv_root/kernel").transpose(3, 2, 0, 1))
        out["resnet.gn_root.weight"] = t(take("gn_root/scale"))
        out["resnet.gn_root.bias"] = t(take("gn_root/bias"))
        for key in sorted(params):
            if m := re.fullmatch(r"block(\d+)/unit(\d+)/(conv[123]|conv_proj)/kernel", key):
                ours = f"resnet.stages.{int(m.group(1)) - 1}.{int(m.group(2)) - 1}.{m.group(3)}"
                out[ours + ".weight"] = t(take(key).transpose(3, 2, 0, 1))
            elif m := re.fullmatch(r"block(\d+)/unit(\d+)/(gn[123]|gn_proj)/(scale|bias)",
                                   key):
                ours = f"resnet.stages.{int(m.group(1)) - 1}.{int(m.group(2)) - 1}.{m.group(3)}"
                out[f"{ours}.{'weight' if m.group(4) == 'scale' else 'bias'}"] = t(take(key))
    has_cls = "cls" in params
    if has_cls:
        out["cls_token"] = t(take("cls"))
    if source == "vit_jax":
        out["pos_embed"] = t(take("Transformer/posembed_input/pos_embedding"))
    else:
        if "pos_embedding" not in params:
            raise CheckpointError(f"{uri} (big_vision): no learned pos_embedding (sincos "
                                  f"position embeddings are not supported)")
        pos = t(take("pos_embedding"))                                   # (1, N, D)
        if has_cls:  # big_vision adds no position embedding to the class token
            pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)  # (1, N+1, D)
        out["pos_embed"] = pos
    blocks = sorted({int(m.group(1)) for k in params
                     if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    heads = None
    for b in blocks:
        pre = f"Transformer/encoderblock_{b}/"
        names = {k[len(pre):].split("/")[0] for k in params if k.startswith(pre)}
        ln = sorted(n for n in names if n.startswith("LayerNorm_"))
        attn = next((n for n in names if n.startswith("MultiHeadDotProductAttention_")), None)
        mlp = next((n for n in names if n.startswith("MlpBlock_")), None)
        if len(ln) != 2 or attn is None or mlp is None:
            raise CheckpointError(f"{uri} ({source}): block {b} has parts {sorted(names)}, "
                                  f"expected two LayerNorms, attention and an MLP block")
        for ours, theirs in (("norm1", ln[0]), ("norm2", ln[1])):
            out[f"blocks.{b}.{ours}.weight"] = t(take(pre + theirs + "/scale"))
            out[f"blocks.{b}.{ours}.bias"] = t(take(pre + theirs + "/bias"))
        qkv_w, qkv_b = [], []
        for x in ("query", "key", "value"):
            w = take(f"{pre}{attn}/{x}/kernel")                   # (D, H, d)
            heads = w.shape[1]
            qkv_w.append(t(w.reshape(w.shape[0], -1).T))          # (H*d, D)
            qkv_b.append(t(take(f"{pre}{attn}/{x}/bias").reshape(-1)))
        out[f"blocks.{b}.attn.qkv.weight"] = torch.cat(qkv_w)
        out[f"blocks.{b}.attn.qkv.bias"] = torch.cat(qkv_b)
        w = take(f"{pre}{attn}/out/kernel")                       # (H, d, D)
        out[f"blocks.{b}.attn.proj.weight"] = t(w.reshape(-1, w.shape[-1]).T)
        out[f"blocks.{b}.attn.proj.bias"] = t(take(f"{pre}{attn}/out/bias"))
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"blocks.{b}.mlp.{ours}.weight"] = t(take(f"{pre}{mlp}/{theirs}/kernel").T)
            out[f"blocks.{b}.mlp.{ours}.bias"] = t(take(f"{pre}{mlp}/{theirs}/bias"))
    out["norm.weight"] = t(take("Transformer/encoder_norm/scale"))
    out["norm.bias"] = t(take("Transformer/encoder_norm/bias"))
    for ours, theirs in (("pre_logits", "pre_logits"), ("head", "head")):
        if f"{theirs}/kernel" in params:
            out[f"{ours}.weight"] = t(take(f"{theirs}/kernel").T)
            out[f"{ours}.bias"] = t(take(f"{theirs}/bias"))
    left = sorted(set(params) - used)
    if left:
        raise CheckpointError(f"{uri} ({source}): unexpected keys {_short(left)}")
    fields = {"num_heads": int(heads)} if heads else {}
    return out, fields, source


def _unstack_scanned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision `scan=True` stores one `Transformer/encoderblock/...` with a leading depth
    axis; split it into `encoderblock_N`."""
    pre = "Transformer/encoderblock/"
    stacked = {k: v for k, v in params.items() if k.startswith(pre)}
    if not stacked:
        return params
    out = {k: v for k, v in params.items() if not k.startswith(pre)}
    for key, value in stacked.items():
        for i in range(value.shape[0]):
            out[f"Transformer/encoderblock_{i}/{key[len(pre):]}"] = value[i]
    return out


# ---------------------------------------------------------------------------------------------
# Export: our weights in the layouts of Hugging Face transformers and timm
# ---------------------------------------------------------------------------------------------
EXPORT_FORMATS = ("hf", "timm")
_TIMM_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


def export_vit(uri: str | os.PathLike, out: str | os.PathLike, format: str = "hf") -> str:
    """Write the ViT at `uri` (any format `load_vit` reads) as a directory another library
    loads as it is; -> out.

    - `hf`: `config.json`, `model.safetensors` and `preprocessor_config.json` for
      `transformers`. A model with a classifier and no pre-logits layer becomes a
      `ViTForImageClassification` (same logits); one with the tanh pre-logits layer becomes a
      `ViTModel` whose pooler is that layer (`pooler_output` = our pre-logits): transformers'
      classifier reads the class token, not the pooler, so our head on top of the pre-logits
      has no place there and is left out (the `timm` export cannot hold it either; our format
      keeps it). Weights use the names of the checkpoints on the Hub (transformers 4.x), which
      transformers 5.x also loads. GAP models have no Hugging Face ViT equivalent: an error.
    - `timm`: `model.safetensors` with the state-dict names of timm's `VisionTransformer`
      and `config.json` as timm's `save_for_hf` writes it (`architecture`, `model_args`,
      `pretrained_cfg` with mean / std), so `timm.create_model("hf-hub:...")` or
      `create_model(arch, pretrained_cfg_overlay=dict(file=...), **model_args)` builds it.
      GAP models get `global_pool="avg", class_token=False, fc_norm=False` (the final norm
      before pooling, as big_vision). timm has no pre-logits layer: an error for such models.

    The input normalisation (`ViTConfig.input_mean` / `input_std`) goes into the
    preprocessor config (hf) or the pretrained config (timm)."""
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {format!r}; use one of "
                              f"{', '.join(EXPORT_FORMATS)}")
    model = load_vit(uri)
    cfg, state = model.cfg, {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if format == "hf":
        tensors, files = _hf_export(cfg, state, str(uri))
    else:
        tensors, files = _timm_export(cfg, state, str(uri))
    out = str(out)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, doc in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(doc, f, indent=2)
        if storage.is_s3(out):
            storage.upload_dir(tmp, out, last=("config.json",))
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            for name in ["model.safetensors", *files]:
                shutil.copyfile(os.path.join(tmp, name), Path(out) / name)
    return out


# Our block parameter names -> transformers 4.x's (under encoder.layer.N.), as on the Hub.
_HF_BLOCK_OUT = {"norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
                 "attn.proj.": "attention.output.dense.", "mlp.fc1.": "intermediate.dense.",
                 "mlp.fc2.": "output.dense."}


def _hf_export(cfg: ViTConfig, state: dict, uri: str):
    if cfg.is_hybrid:
        raise CheckpointError(f"{uri}: transformers 5 has no ViT hybrid (ViTHybrid was "
                              f"removed); export with format='timm' (vit_*_r50_s16_* etc.)")
    if cfg.pool != "token":
        raise CheckpointError(f"{uri}: a global-average-pool ViT has no Hugging Face "
                              f"ViTModel equivalent (it always has a class token); export "
                              f"with format='timm'")
    D = cfg.hidden_size
    body = {}
    for key, value in state.items():
        if m := re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key):
            for part, name in zip(value.split(D, 0), ("query", "key", "value"), strict=True):
                body[f"encoder.layer.{m.group(1)}.attention.attention.{name}.{m.group(2)}"] = \
                    part.contiguous()
            continue
        if m := re.match(r"blocks\.(\d+)\.(\w+\.\w+\.|norm[12]\.)(weight|bias)$", key):
            name = _HF_BLOCK_OUT[m.group(2)]
            body[f"encoder.layer.{m.group(1)}.{name}{m.group(3)}"] = value
            continue
        hf_key = next((k for k, v in _HF_TOP.items() if v == key), None)
        if hf_key is None:
            raise CheckpointError(f"{uri}: no Hugging Face name for {key}")
        body[hf_key] = value
    classify = cfg.num_classes > 0 and not cfg.representation_size
    if classify:
        tensors = {(k if k.startswith("classifier.") else f"vit.{k}"): v for k, v in body.items()}
        arch = "ViTForImageClassification"
    else:
        tensors = {k: v for k, v in body.items() if not k.startswith("classifier.")}
        arch = "ViTModel"
    config = {
        "architectures": [arch], "model_type": "vit",
        "hidden_size": D, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
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


def _timm_resnet_name(key: str) -> str:
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


def _timm_export(cfg: ViTConfig, state: dict, uri: str):
    if cfg.representation_size:
        raise CheckpointError(f"{uri}: timm's VisionTransformer has no pre-logits "
                              f"(representation) layer; export with format='hf' (it becomes "
                              f"the pooler) or fine-tune without it")
    tensors = {}
    for key, value in state.items():
        key = key.replace("patch_embed.", "patch_embed.proj.", 1) if key.startswith(
            "patch_embed.") else key
        if key.startswith("resnet."):
            key = _timm_resnet_name(key)
        tensors[key] = value
    variant = cfg.variant
    if cfg.is_hybrid:
        if variant is None:
            raise CheckpointError(f"{uri}: timm builds the hybrids R50+B/16, R50+L/32, "
                                  f"R26+S/32 and R26+B/32 only; this one "
                                  f"(resnet_layers={list(cfg.resnet_layers)}) has no timm "
                                  f"architecture")
        resnet, vit = variant.split("+")
        size = _TIMM_SIZES[vit.split("/")[0]]
        arch = f"vit_{size}_{resnet.lower()}_s{cfg.effective_patch_size}_{cfg.image_size}"
    else:
        size = _TIMM_SIZES[variant.split("/")[0]] if variant else "base"
        arch = f"vit_{size}_patch{cfg.patch_size}_{cfg.image_size}"
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
        "architecture": arch, "num_classes": cfg.num_classes,
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
