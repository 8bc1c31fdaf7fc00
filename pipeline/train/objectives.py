"""Pretraining objectives: supervised softmax / sigmoid cross-entropy, and masked patch
prediction (App. B.1.2). Plain PyTorch; each returns the mean loss of a micro-batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.labels import multi_hot
from pipeline.model import ViT


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices; a multi-label sample's target is spread evenly
    over its classes (each label equally likely), so the loss stays on the usual scale."""
    if labels.ndim == 1 and not labels.is_floating_point():
        return F.cross_entropy(logits.float(), labels)
    target = multi_hot(labels, logits.shape[-1])
    target = target / target.sum(-1, keepdim=True).clamp(min=1)
    return -(target * F.log_softmax(logits.float(), -1)).sum(-1).mean()


def sigmoid_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label loss (JFT): per-class binary cross-entropy, summed over classes and
    averaged over the batch (big_vision `sigmoid_xent`). `labels` are class indices (one
    positive each), -1-padded index lists, or a multi-hot (B, K) matrix."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, multi_hot(labels, logits.shape[-1]),
                                              reduction="none").sum(-1).mean()


def mean_colour_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The 3-bit mean colour of every patch, one of 512 classes: (B, N) int64.

    `images` are (B, 3, H, W) in [-1, 1]; each channel's patch mean is quantised to 8 levels
    and the three levels form r * 64 + g * 8 + b.
    """
    mean = F.avg_pool2d((images.float() + 1) / 2, patch_size)        # (B, 3, H/P, W/P)
    levels = (mean * 8).floor().clamp_(0, 7).long()                    # (B, 3, h, w)
    cls = levels[:, 0] * 64 + levels[:, 1] * 8 + levels[:, 2]          # (B, h, w)
    return cls.flatten(1)                                              # (B, N)


class MaskedPatchPrediction(nn.Module):
    """Corrupt 50% of the patch embeddings (80% -> learnable [mask], 10% -> another random
    patch embedding, 10% kept) and predict the 3-bit mean colour of each corrupted patch from
    its output token with a linear 512-way head."""

    def __init__(self, dim: int, corrupt: float = 0.5, mask: float = 0.8, swap: float = 0.1):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(dim, 512)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.corrupt, self.mask, self.swap = corrupt, mask, swap

    def corrupt_patches(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x (B, N, D) -> (corrupted x, bool (B, N) of the corrupted positions)."""
        B, N, D = x.shape
        u = torch.rand(B, N, device=x.device, generator=generator)
        chosen = u < self.corrupt                                          # (B, N)
        # Within the chosen ones: [0, mask) -> mask token, [mask, mask+swap) -> other patch.
        v = torch.rand(B, N, device=x.device, generator=generator)
        to_mask = chosen & (v < self.mask)
        to_swap = chosen & (v >= self.mask) & (v < self.mask + self.swap)
        # A random other patch of the same image (never itself).
        offset = torch.randint(1, N, (B, N), device=x.device, generator=generator)
        src = (torch.arange(N, device=x.device) + offset) % N              # (B, N)
        swapped = torch.gather(x, 1, src.unsqueeze(-1).expand(B, N, D))
        x = torch.where(to_swap.unsqueeze(-1), swapped, x)
        x = torch.where(to_mask.unsqueeze(-1), self.mask_token.to(x.dtype).expand(B, N, D), x)
        return x, chosen

    def forward(self, model: ViT, images: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        patches = model.patch_tokens(images)                               # (B, N, D)
        corrupted, chosen = self.corrupt_patches(patches, generator)
        tokens = model.encode(model.add_pos_embed(corrupted))              # (B, 1+N, D)
        out = tokens[:, model.cfg.num_prefix_tokens:]                     # (B, N, D)
        logits = self.head(out[chosen])                                    # (M, 512)
        # A hybrid's token covers effective_patch_size pixels a side (16 for R50+B/16).
        targets = mean_colour_targets(images, model.cfg.effective_patch_size)[chosen]
        return F.cross_entropy(logits.float(), targets)
