"""The fine-tuning recipe of a VTAB-1k evaluation as numbers (`FinetuneConfig`, ViT App. B.1.1)
and vit_jax's dropout for a checkpoint; no torch here, so that `vit-vtab` and `vit-pretrain`
read and check their configurations without loading it. The fine-tuning itself is
`eval/finetune.py`, which re-exports these."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.architecture import ViTConfig


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe every trial of an evaluation follows (ViT App. B.1.1, Table 4;
    the `finetune` section of `vit-vtab`'s config). The learning rate and the seed are the
    trial's own (the sweep's grid), not part of the recipe."""

    resolution: int = 384                 # the paper's, for every task
    steps: int = 2500
    warmup_steps: int | None = None       # None: min(500, steps // 5), vit_jax's 500 of 2500
    batch_size: int = 512
    micro_batch_size: int | None = None   # None: the whole batch on GPU (halved on OOM), 32 on CPU
    dropout: float | None = None          # None: vit_jax's for the checkpoint (finetune_dropout)
    momentum: float = 0.9
    grad_clip: float = 1.0                # global norm

    def __post_init__(self):
        # The flag each key has in `vit-vtab` is named too: most users set it that way.
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"--steps and --batch-size (finetune.steps, finetune.batch_size) "
                             f"must be positive, got {self.steps} and {self.batch_size}")
        if self.resolution < 1:
            raise ValueError(f"--resolution (finetune.resolution) must be positive, got "
                             f"{self.resolution}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup-steps (finetune.warmup_steps) must be in [0, "
                             f"{self.steps}), got {self.warmup_steps}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout (finetune.dropout) must be in [0, 1), got "
                             f"{self.dropout}")

    @property
    def warmup(self) -> int:
        """The warmup steps this recipe runs (`warmup_steps`, or its default)."""
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.steps // 5)


# vit_jax's fine-tuning dropout (the attention dropout is 0 for all models). The ViT paper's
# checkpoints fine-tune with `configs/vit.py`, which keeps `configs/models.py`'s `dropout_rate`:
# 0.1 for L/16 (`get_l16_config`), H/14 and R50+B/16 (`get_r50_b16_config`), 0 for the others
# (`get_l32_config` sets L/32's back to 0). AugReg checkpoints (Steiner et al., 2021) fine-tune
# with `configs/augreg.py`, which sets `config.model.transformer.dropout_rate = 0  # No AugReg
# during fine-tuning.` for every model. The models vit_jax ships only as AugReg checkpoints
# (R50+L/32, whose models.py entry inherits L/16's 0.1; the R26 and R+Ti hybrids; Ti, S, B/8)
# are therefore fine-tuned without dropout whatever their file is called.
PAPER_FINETUNE_DROPOUT = {"L/16": 0.1, "H/14": 0.1, "R50+B/16": 0.1}

# How an AugReg checkpoint is named: vit_jax's files (`L_16-i21k-300ep-lr_0.001-aug_strong1-
# wd_0.1-do_0.0-sd_0.0.npz`, under gs://vit_models/augreg), timm's tags
# (`vit_large_patch16_224.augreg_in21k`), our AugReg presets' runs (`vit-l16-i21k-augreg`).
AUGREG_NAME = re.compile(r"augreg|-i(?:1|21)k-\d+ep-lr_", re.IGNORECASE)


def is_augreg(*names: str) -> bool:
    """Whether any of `names` (the checkpoint's URI, Hub id or pretraining run name) is an
    AugReg checkpoint's (`AUGREG_NAME`)."""
    return any(AUGREG_NAME.search(n or "") for n in names)


def finetune_dropout(cfg: ViTConfig, augreg: bool = False) -> float:
    """The dropout vit_jax fine-tunes this checkpoint with: 0 for an AugReg checkpoint
    (`configs/augreg.py`), else `configs/models.py`'s value for the size (0 for sizes it does
    not name, and for free sizes)."""
    return 0.0 if augreg else PAPER_FINETUNE_DROPOUT.get(cfg.variant or "", 0.0)
