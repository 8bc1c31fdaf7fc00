"""Reading tensor files without running what they hold.

Every weight file goes through here: safetensors (tensors and a JSON header, nothing to run),
`torch.load(weights_only=True)` (torch's restricted unpickler: tensors and plain containers)
and `np.load(allow_pickle=False)` (an object array is refused). A pickle's `__reduce__` can
run any command on load, and checkpoints come from other people: nothing here ever unpickles
arbitrary objects (tests/security/test_hostile_files.py plants such payloads).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from pipeline.weights.errors import CheckpointError

# The suffixes `torch.save` files go by; the state dict may sit under one of `_NESTED`.
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
STATE_DICT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_NESTED = ("state_dict", "model", "module")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file as shapes only (on the meta device), from its
    header: no tensor data is read."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: torch.empty(f.get_slice(k).get_shape(), dtype=torch.float32, device="meta")
                for k in f.keys()}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz; an object array (a pickle inside) is refused by numpy."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def read_state_dict(path: Path, uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or `torch.save` file (suffix in STATE_DICT_SUFFIXES), in
    the names the file has."""
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    obj = torch_load(path, uri)
    for key in _NESTED:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri} is not a ViT checkpoint: it holds a "
                              f"{type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def torch_load(path: Path, uri: str):
    """`torch.load(weights_only=True)`, with its refusal as one line of ours: torch's own
    message suggests `weights_only=False`, which would run whatever the file holds."""
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


# The weights file of a Hugging Face / timm directory, in the order they are preferred.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> list[Path]:
    """The files of WEIGHT_FILES that `directory` has, preferred first."""
    return [directory / n for n in WEIGHT_FILES if (directory / n).exists()]
