"""Our weight format: a directory (local or `s3://`) that `save_vit` writes.

    model.safetensors   the state dict of `pipeline.model.ViT`
    vit.json            {"format": "vit-pipeline", "format_version": 1,
                         "config": ViTConfig fields, "metadata": {...}}

`vit.json` is written last, so a directory that has it is complete. Every training checkpoint
holds these two files beside its training state (pipeline/train/checkpoints.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from pipeline import storage
from pipeline.model import ViT, ViTConfig
from pipeline.weights.build import Loaded
from pipeline.weights.errors import CheckpointError
from pipeline.weights.files import read_safetensors

FORMAT = "vit-pipeline"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "vit.json"


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


def read_metadata(uri: str | os.PathLike) -> dict:
    """The metadata our format keeps in `vit.json` (step, run name, MLflow run id); {} for
    a checkpoint in another format or one that cannot be read."""
    try:
        doc = json.loads(storage.read_bytes(storage.join(str(uri), CONFIG_FILE)))
    except (storage.StorageError, OSError, ValueError):
        return {}
    return doc.get("metadata", {}) if doc.get("format") == FORMAT else {}


# ---------------------------------------------------------------------------------------------
# The registry's hooks
# ---------------------------------------------------------------------------------------------
def claims_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).exists()


def read_dir(path: Path, uri: str, read_file) -> Loaded:
    """Our directory: the weights as they are, the config `vit.json` states."""
    doc = read_doc(path, uri)
    return Loaded(read_safetensors(path / WEIGHTS_FILE), dict(doc["config"]), FORMAT)


def read_doc(path: Path, uri: str) -> dict:
    """`vit.json` of our directory at `path`, checked, and its weights file there."""
    doc = json.loads((path / CONFIG_FILE).read_text())
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{uri}: {CONFIG_FILE} is not a {FORMAT} config")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{uri}: checkpoint format version {doc['format_version']} "
                              f"is newer than this code ({FORMAT_VERSION}); upgrade")
    if not (path / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{uri}: {WEIGHTS_FILE} is missing next to {CONFIG_FILE}")
    return doc


def claims_keys(keys: set[str]) -> bool:
    return "patch_embed.weight" in keys


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state
