"""The weight formats, and `load_vit` / `export_vit`, which dispatch through them.

`FORMATS` is the one list of what this pipeline reads and writes. `load_vit` detects the
format from the files, in three ways, each asking the formats in table order and taking the
first that claims the input:
  - a directory: by its files (`vit.json`: ours; a `config.json` with `architecture`: timm's
    hub layout; any other `config.json`: Hugging Face's, refused there if not a ViT); a
    directory no format claims is read as its `model.safetensors` / `pytorch_model.bin`;
  - a single file: by its suffix (`.npz`: the authors'), else a state dict (.safetensors or a
    `torch.save` file) ...
  - ... whose format is told by its tensor names (ours `patch_embed.weight`, timm's
    `patch_embed.proj.weight`, transformers' `embeddings.patch_embeddings`).
Every reader converts to our names, and `build` loads the result strictly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import storage
from pipeline.model import ViT, ViTConfig
from pipeline.weights import files, hf, jax, ours, timm
from pipeline.weights.build import (
    Loaded,
    apply_overrides,
    build,
    expected_structure,
    structure,
)
from pipeline.weights.errors import CheckpointError, short_keys
from pipeline.weights.hub import HUB_SCHEME, hub_snapshot

ReadFile = Callable[[Path, str], Loaded]


@dataclass(frozen=True)
class Format:
    """One weight format: its hooks, each None where the format has no such form."""

    name: str                   # what `export_vit(format=...)` and `vit-export --format` take
    label: str                  # the source in messages
    # A directory in this format: claimed by its files; read with the registry's file
    # reader for the weights file inside.
    claims_dir: Callable[[Path], bool] | None = None
    read_dir: Callable[[Path, str, ReadFile], Loaded] | None = None
    # A single file of this format, by suffix.
    suffixes: tuple[str, ...] = ()
    read_file: ReadFile | None = None
    # A bare state dict in this format's names: claimed by its keys, renamed to ours.
    claims_keys: Callable[[set[str]], bool] | None = None
    to_ours: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # (config, our state dict, uri) -> (tensors in its names, {file name: JSON document})
    export: Callable[[ViTConfig, dict, str], tuple[dict, dict]] | None = None
    # (local folder of an export, its config.json) -> the Python its library's users run
    recipe: Callable[[str, dict], str] | None = None


# Order matters where claims overlap: timm's hub directory also has a config.json.
FORMATS = (
    Format(ours.FORMAT, ours.FORMAT, claims_dir=ours.claims_dir, read_dir=ours.read_dir,
           claims_keys=ours.claims_keys, to_ours=ours.to_ours),
    Format("timm", timm.SOURCE, claims_dir=timm.claims_dir, read_dir=timm.read_dir,
           claims_keys=timm.claims_keys, to_ours=timm.to_ours, export=timm.export,
           recipe=timm.load_recipe),
    Format("hf", hf.SOURCE, claims_dir=hf.claims_dir, read_dir=hf.read_dir,
           claims_keys=hf.claims_keys, to_ours=hf.to_ours, export=hf.export,
           recipe=hf.load_recipe),
    Format("jax", f"{jax.VIT_JAX} / {jax.BIG_VISION}", suffixes=(".npz",),
           read_file=jax.read_file),
)
EXPORT_FORMATS = tuple(sorted(f.name for f in FORMATS if f.export))


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
    expected = expected_structure(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = hub_snapshot(uri) if uri.startswith(HUB_SCHEME) else storage.fetch(uri, tmp)
        except storage.NotFound:
            raise CheckpointError(f"checkpoint not found: {uri}") from None
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {uri}")
        loaded = read(path, uri)
    return apply_overrides(build(loaded, uri, expected), overrides)


def read(path: Path, uri: str) -> Loaded:
    """The checkpoint at local `path` (a directory or a file) in our names."""
    try:
        return _read_dir(path, uri) if path.is_dir() else read_file(path, uri)
    except (CheckpointError, storage.StorageError):
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse is one clear line
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{uri}: cannot read checkpoint file (corrupt or truncated?): "
                              f"{msg[:200]}") from None


def _read_dir(path: Path, uri: str, reader: ReadFile | None = None) -> Loaded:
    """`reader`: how the weights file is read (`read_file`; `_shapes` for `peek`)."""
    reader = reader or read_file
    for fmt in FORMATS:
        if fmt.claims_dir is not None and fmt.claims_dir(path):
            return fmt.read_dir(path, uri, reader)
    weights = files.weight_files(path)
    if weights:
        return reader(weights[0], uri)
    names = sorted(p.name for p in path.iterdir())
    if not names:
        raise CheckpointError(f"checkpoint not found: {uri} is an empty directory")
    raise CheckpointError(f"{uri} is not a ViT checkpoint: no {ours.CONFIG_FILE}, config.json, "
                          f"model.safetensors or pytorch_model.bin in {short_keys(names, 5)}")


def peek(uri: str | os.PathLike, **expected) -> dict:
    """What `load_vit(uri, **expected)` checks before it needs the weights, for a start-up
    check (`vit-pretrain --init`, before Ray starts): the checkpoint is there, a format reads
    it, and the architecture it has matches the structural fields `expected`. A .safetensors
    file is read as its header (names and shapes, no tensor data); a torch file, an .npz, a
    single s3:// object and hf://... are only found (their contents are known by loading
    them, which `load_vit` does). -> the ViTConfig fields known; CheckpointError as
    `load_vit` would raise it."""
    uri = str(uri)
    expected = expected_structure(dict(expected))
    if uri.startswith(HUB_SCHEME):
        return {}
    if storage.is_s3(uri):
        return _peek_s3(uri, expected)
    path = Path(uri)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {uri}")
    try:
        if path.is_dir() and ours.claims_dir(path):
            doc = ours.read_doc(path, uri)
            loaded = Loaded(_shapes(path / ours.WEIGHTS_FILE, uri).state,
                            dict(doc["config"]), ours.FORMAT)
        else:
            loaded = _read_dir(path, uri, _shapes) if path.is_dir() else _shapes(path, uri)
    except (CheckpointError, storage.StorageError):
        raise
    except Exception as err:  # noqa: BLE001 - as `read`: one clear line
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{uri}: cannot read checkpoint file (corrupt or truncated?): "
                              f"{msg[:200]}") from None
    return structure(loaded, uri, expected)


def _shapes(path: Path, uri: str) -> Loaded:
    """`read_file` without the tensor data: a .safetensors file's shapes (meta tensors) in
    our names; nothing for the files whose contents only loading tells."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return from_state_dict(files.safetensors_shapes(path), uri)
    if suffix not in files.STATE_DICT_SUFFIXES and not any(suffix in f.suffixes
                                                           for f in FORMATS):
        raise CheckpointError(_unknown_type(uri, suffix))
    return Loaded({}, {}, "")


def _peek_s3(uri: str, expected: dict) -> dict:
    """An s3:// checkpoint is there (one listing, or a HEAD for a single object); our
    format's `vit.json` is read for its architecture (one small GET)."""
    names = [k for k in storage.list_objects(uri) if k and not k.endswith("/")]
    if not names:
        if storage.object_metadata(uri) is None:
            raise CheckpointError(f"checkpoint not found: {uri}")
        return {}
    if ours.CONFIG_FILE not in names:
        return {}
    try:
        doc = json.loads(storage.read_bytes(storage.join(uri, ours.CONFIG_FILE)))
    except ValueError:
        raise CheckpointError(f"{uri}: {ours.CONFIG_FILE} is not valid JSON") from None
    if doc.get("format") != ours.FORMAT:
        raise CheckpointError(f"{uri}: {ours.CONFIG_FILE} is not a {ours.FORMAT} config")
    return structure(Loaded({}, dict(doc.get("config", {})), ours.FORMAT), uri, expected)


def _unknown_type(uri: str, suffix: str) -> str:
    return (f"{uri}: unknown checkpoint file type {suffix!r}; expected a directory, "
            f".safetensors, .bin/.pt/.pth or .npz")


def read_file(path: Path, uri: str) -> Loaded:
    """A single file: one a format reads by its suffix, else a state dict in any format's
    names."""
    suffix = path.suffix.lower()
    for fmt in FORMATS:
        if suffix in fmt.suffixes:
            return fmt.read_file(path, uri)
    if suffix not in files.STATE_DICT_SUFFIXES:
        raise CheckpointError(_unknown_type(uri, suffix))
    return from_state_dict(files.read_state_dict(path, uri), uri)


def from_state_dict(state: dict[str, torch.Tensor], uri: str = "<state dict>") -> Loaded:
    """Detect the format of a bare state dict by its key names and convert to our names."""
    state = {_strip_wrappers(k): v for k, v in state.items()}
    keys = set(state)
    for fmt in FORMATS:
        if fmt.claims_keys is not None and fmt.claims_keys(keys):
            return Loaded(fmt.to_ours(state), {}, fmt.label)
    raise CheckpointError(f"{uri} is not a ViT checkpoint: no ViT keys among "
                          f"{short_keys(sorted(keys), 5)}")


def _strip_wrappers(key: str) -> str:
    """Names as DDP (`module.`), torch.compile (`_orig_mod.`), FSDP-1
    (`_fsdp_wrapped_module.`) or a wrapper's `model.` attribute save them -> the bare
    model's."""
    for prefix in ("module.", "_orig_mod.", "model."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")


# ---------------------------------------------------------------------------------------------
# Export: our weights in the layouts of Hugging Face transformers and timm
# ---------------------------------------------------------------------------------------------
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
      `pretrained_cfg` with mean / std and our class count), so
      `timm.create_model("local-dir:OUT", pretrained=True)` (or "hf-hub:org/name") builds
      it with our logits; `timm.export` says how for shapes timm has no name for. GAP
      models get `global_pool="avg", class_token=False, fc_norm=False` (the final norm
      before pooling, as big_vision). timm has no pre-logits layer: an error for such models.

    The input normalisation (`ViTConfig.input_mean` / `input_std`) goes into the
    preprocessor config (hf) or the pretrained config (timm)."""
    fmt = next((f for f in FORMATS if f.name == format and f.export), None)
    if fmt is None:
        raise CheckpointError(f"unknown export format {format!r}; use one of "
                              f"{', '.join(EXPORT_FORMATS)}")
    model = load_vit(uri)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors, docs = fmt.export(model.cfg, state, str(uri))
    out = str(out)
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, doc in docs.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(doc, f, indent=2)
        if storage.is_s3(out):
            storage.upload_dir(tmp, out, last=("config.json",))
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            for name in ["model.safetensors", *docs]:
                shutil.copyfile(os.path.join(tmp, name), Path(out) / name)
    return out


def export_recipe(out: str | os.PathLike, format: str) -> str:
    """The Python that loads the export at `out` (written by `export_vit(..., out, format)`)
    in the other library, as its users load weights; `vit-export` prints it. An s3:// export
    is loaded from a local copy: the first line, a comment, says how to make it."""
    fmt = next(f for f in FORMATS if f.name == format and f.recipe)
    out = str(out)
    config = json.loads(storage.read_bytes(storage.join(out, "config.json")))
    if not storage.is_s3(out):
        return fmt.recipe(str(Path(out).resolve()), config)
    folder = out.rstrip("/").rsplit("/", 1)[-1]
    return (f"# copy it to a local folder first: aws s3 cp --recursive {out} {folder}\n"
            + fmt.recipe(folder, config))
