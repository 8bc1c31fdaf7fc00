"""Learning-rate schedule: linear warmup, then linear or cosine decay (vit_jax `utils.py`).
Shared by pretraining (pipeline/train/loop.py) and VTAB fine-tuning (eval/finetune.py)."""

from __future__ import annotations

import math


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_steps: int,
                  decay: str = "linear", end_lr: float = 0.0) -> float:
    """lr at `step` (0-based: the lr used for the update that makes step+1).

    Warmup multiplies by min(1, step/warmup); after it, progress p in [0, 1] over the
    remaining steps gives base - (base - end) * p (linear) or base * (1 + cos(pi p)) / 2.
    As vit_jax's `create_learning_rate_schedule`, which optax evaluates at its update count
    (0 for the first update): the first update has lr 0 and lr reaches base at `warmup`.
    """
    warm = min(1.0, step / warmup_steps) if warmup_steps else 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if decay == "linear":
        lr = base_lr - (base_lr - end_lr) * progress
    elif decay == "cosine":
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay {decay!r}; use linear or cosine")
    return lr * warm
