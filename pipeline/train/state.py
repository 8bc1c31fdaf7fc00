"""Training checkpoints: everything needed to continue a run exactly.

A training checkpoint is a directory that is also a model checkpoint in our format, so
`load_vit` and `eval/vtab.py --checkpoint` take it as it is:

    model.safetensors   ViT weights             (pipeline.checkpoint format)
    vit.json            ViT config + metadata   (step, run name, MLflow run id)
    trainer.pt          optimizer state, objective head (MPP), torch RNG    (tensors only:
                        loads with torch.load(weights_only=True))
    train_state.json    step, samples seen, data position, Python / NumPy RNG, resolved config

Resume order (see `restore`): this run's own latest checkpoint (after a worker failure or a
resubmitted job) > `--resume CHECKPOINT` (another run's training checkpoint) > `--init
WEIGHTS` (any format `load_vit` reads; heads re-initialised) > scratch.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import CheckpointError, load_vit, write_weights
from pipeline.model import ViT, ViTConfig

TRAINER_FILE = "trainer.pt"
STATE_FILE = "train_state.json"
# Config fields that may differ between a checkpoint and the run resuming from it.
RUNTIME_FIELDS = ("dropout", "attention_dropout")


@dataclass
class Position:
    step: int = 0
    samples_seen: int = 0
    source: str = "scratch"        # which rule of the resume order applied


def rng_state() -> dict:
    return {"python": _jsonable(random.getstate()),
            "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2])}


def set_rng_state(state: dict) -> None:
    random.setstate(_tupled(state["python"]))
    keys = np.asarray(state["numpy"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def write(directory: str | os.PathLike, *, vit_state: dict, vit_cfg: ViTConfig,
          optimizer_state: dict, objective_state: dict | None, step: int, samples_seen: int,
          data_position: tuple[int, int], config: dict, run_name: str,
          run_id: str | None = None) -> None:
    """Write a training checkpoint into a local directory (rank 0)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The MLflow run id lets an evaluation link back to the pretraining run.
    write_weights(vit_state, vit_cfg, directory,
                  {"step": step, "run_name": run_name, "mlflow_run_id": run_id or ""})
    torch.save({"optimizer": optimizer_state, "objective": objective_state or {},
                "torch_rng": torch.get_rng_state()}, directory / TRAINER_FILE)
    doc = {"step": step, "samples_seen": samples_seen, "data_position": list(data_position),
           "rng": rng_state(), "config": config, "run_name": run_name}
    (directory / STATE_FILE).write_text(json.dumps(doc))


def read(directory: str | os.PathLike) -> tuple[dict, dict]:
    """-> (train_state.json contents, trainer.pt contents), with clear errors."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists() or not (directory / TRAINER_FILE).exists():
        raise CheckpointError(f"{directory} is not a training checkpoint (no {STATE_FILE} / "
                              f"{TRAINER_FILE}); to start from its weights use --init")
    doc = json.loads((directory / STATE_FILE).read_text())
    trainer = torch.load(directory / TRAINER_FILE, map_location="cpu", weights_only=True)
    return doc, trainer


def check_architecture(ckpt_cfg: dict, run_cfg: ViTConfig, where: str) -> None:
    """A resumed run must have the checkpoint's architecture (runtime fields may differ)."""
    theirs = {k: v for k, v in ckpt_cfg.items() if k not in RUNTIME_FIELDS}
    ours = {k: v for k, v in run_cfg.to_dict().items() if k not in RUNTIME_FIELDS}
    diff = sorted(k for k in ours if theirs.get(k) != ours[k])
    if diff:
        pairs = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {ours[k]!r}" for k in diff)
        raise CheckpointError(f"{where}: the checkpoint's model does not match this run's "
                              f"({pairs}); use --init to start from its weights instead")


def init_weights(model: ViT, uri: str) -> None:
    """--init: weights of any format `load_vit` reads; the body is loaded, the heads are
    this run's fresh ones (the checkpoint's may have another number of classes), and the
    position embedding is resampled to this run's resolution."""
    cfg = model.cfg
    src = load_vit(uri, image_size=cfg.image_size, patch_size=cfg.patch_size,
                   hidden_size=cfg.hidden_size, depth=cfg.depth, mlp_dim=cfg.mlp_dim,
                   num_heads=cfg.num_heads)
    body = {k: v for k, v in src.state_dict().items()
            if not k.startswith(("head.", "pre_logits."))}
    own = model.state_dict()
    missing = [k for k in own if not k.startswith(("head.", "pre_logits.")) and k not in body]
    if missing:
        raise CheckpointError(f"{uri}: cannot initialise from it, missing {missing[:5]}")
    own.update(body)
    model.load_state_dict(own, strict=True)
