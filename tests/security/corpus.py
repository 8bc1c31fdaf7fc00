"""Hostile files: what someone who can write a run folder or a storage prefix could plant.

Every payload, if anything ever unpickled it, would run `touch MARKER`; the tests assert that
the marker never appears. The files are generated here (nothing binary is checked in), from
the real files the pipeline writes, so they have the names and sizes a reader expects.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

# The module DCP's own metadata names (so a prefix allow-list admitted it) and a name that
# pickle resolves by attribute lookup from there: the module imports `os`.
DCP_MODULE = "torch.distributed.checkpoint.filesystem"


class Payload:
    """Pickles as a call of os.system: unpickling it runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def touch(marker: Path) -> str:
    return f"touch {marker}"


def reduce_pickle(marker: Path) -> bytes:
    """A plain `__reduce__` payload (GLOBAL posix.system)."""
    return pickle.dumps(Payload(touch(marker)))


def dotted_pickle(marker: Path, module: str = DCP_MODULE, name: str = "os.system") -> bytes:
    """Protocol 4 STACK_GLOBAL (module, "os.system"): the admitted-prefix trick (86 bytes in
    the issue's report)."""
    def string(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw          # SHORT_BINUNICODE

    return (b"\x80\x04" + string(module) + string(name) + b"\x93"   # STACK_GLOBAL
            + string(touch(marker)) + b"\x85" + b"R" + b".")        # TUPLE1, REDUCE, STOP


def metadata_wrapped(marker: Path) -> bytes:
    """A real-looking DCP Metadata whose storage_data holds the payload: admitted classes
    around a refused one."""
    from torch.distributed.checkpoint.metadata import Metadata

    return pickle.dumps(Metadata(state_dict_metadata={}, storage_data={"x": Payload(
        touch(marker))}))


def evil_torch_file(path: Path, marker: Path) -> Path:
    """A .pth / .bin that `torch.load(weights_only=False)` would run."""
    torch.save({"patch_embed.weight": torch.zeros(1), "evil": Payload(touch(marker))}, path)
    return path


def object_npz(path: Path, marker: Path) -> Path:
    """An .npz with an object array: `np.load(allow_pickle=True)` would run it."""
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(touch(marker))
    np.savez(path, **{"Transformer/encoder_norm/scale": arr})
    return path


def write_good_checkpoint(directory: Path, step: int, total_steps: int = 20) -> Path:
    """A complete training checkpoint of the smoke preset, as training writes it."""
    from pipeline.model import ViT
    from pipeline.train import checkpoints
    from pipeline.train.config import apply_overrides, smoke
    from pipeline.train.step import Pretrainer, decay_names, make_optimizer

    cfg = apply_overrides(smoke(), [f"train.total_steps={total_steps}"])
    torch.manual_seed(0)
    model = Pretrainer(ViT(cfg.model), "softmax")
    opt = make_optimizer(model, decay_names(model), cfg, torch.device("cpu"))
    doc = checkpoints.new_state(step=step, samples_seen=0, data_position=None,
                                config=cfg.to_dict(), run_name=directory.parent.name,
                                run_id=None, world_size=1, strategy="ddp")
    checkpoints.write_local(directory, model, opt, cfg.model, doc)
    return directory


# A checkpoint folder with one file replaced: (what, relative path, how to make the bytes).
CHECKPOINT_PLANTS = {
    "metadata-dotted-name": ("state/.metadata", dotted_pickle),
    "metadata-reduce": ("state/.metadata", reduce_pickle),
    "metadata-wrapped": ("state/.metadata", metadata_wrapped),
    "train_state-pickle": ("train_state.json", reduce_pickle),
    "safetensors-pickle": ("model.safetensors", reduce_pickle),
    "vit_json-pickle": ("vit.json", reduce_pickle),
}


def plant(checkpoint: Path, kind: str, marker: Path) -> Path:
    """Replace one file of `checkpoint` with a hostile one; where train_state.json lists the
    file's size, list the new size, so that only its content gives it away."""
    rel, make = CHECKPOINT_PLANTS[kind]
    data = make(marker)
    (checkpoint / rel).write_bytes(data)
    state = checkpoint / "train_state.json"
    if rel != "train_state.json":
        doc = json.loads(state.read_text())
        if rel in doc.get("files", {}):
            doc["files"][rel] = len(data)
        state.write_text(json.dumps(doc))
    return checkpoint


def shard_with_pickles(path: Path, marker: Path, n: int = 4) -> Path:
    """A WebDataset tar whose samples carry `.pkl` and `.pyd` members beside a real image:
    webdataset's default decoders would unpickle them."""
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", b"1"),
                              ("pkl", reduce_pickle(marker)), ("pyd", reduce_pickle(marker))):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def plant_tune_state(experiment: Path, marker: Path) -> None:
    """What Ray Tune's restore reads from a VTAB phase folder: tuner.pkl (a pickle) and the
    experiment state (JSON whose trial entries are hex-encoded cloudpickles)."""
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "tuner.pkl").write_bytes(reduce_pickle(marker))
    hexed = reduce_pickle(marker).hex()
    (experiment / "experiment_state-2099-01-01_00-00-00.json").write_text(json.dumps(
        {"trial_data": [[json.dumps({"config": hexed}), json.dumps({})]],
         "runner_data": {"_iteration": hexed}}))
    (experiment / "basic-variant-state-2099-01-01_00-00-00.json").write_bytes(
        reduce_pickle(marker))
