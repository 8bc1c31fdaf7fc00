"""Labels as the data stream carries them, and the targets the losses and Mixup need.

A single-label sample carries its class index; a multi-label sample (ImageNet-21k's several
synsets, JFT's label sets) carries its class indices padded with -1 to a fixed length (L),
since a batch of Arrow rows needs one shape. Plain PyTorch, no Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float (B, K) targets from class indices (B,), from integer index lists padded with -1
    (B, L) (what the data stream carries for a multi-label set), or a float (B, K) target."""
    if labels.is_floating_point():
        return labels
    if labels.ndim == 1:
        return F.one_hot(labels, num_classes).float()
    hot = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    hot.scatter_(1, torch.where(labels < 0, num_classes, labels), 1.0)   # -1 -> a spare column
    return hot[:, :num_classes]
