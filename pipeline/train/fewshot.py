"""Few-shot linear probe (paper §4.1): frozen representations of k labelled images per class,
a closed-form regularised least-squares map to {-1, 1}^K targets, accuracy on held-out images.
Cheap enough to run during pretraining as a progress signal (big_vision's `fewshot_lsr`)."""

from __future__ import annotations

import torch


def fewshot_split(labels: torch.Tensor, shots: int, seed: int = 0):
    """Indices of `shots` examples per class (train) and all the others (test); classes with
    fewer than shots + 1 examples are left out."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= shots:
            continue
        idx = idx[torch.randperm(len(idx), generator=g)]
        train.append(idx[:shots])
        test.append(idx[shots:])
    if not train:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(train), torch.cat(test)


def lsr_accuracy(features: torch.Tensor, labels: torch.Tensor, shots: int,
                 l2: float = 1.0, seed: int = 0) -> float:
    """Top-1 of the closed-form probe W = (X^T X + l2 I)^-1 X^T Y on centred, L2-normalised
    features, trained on `shots` per class and scored on the rest. NaN if too few images."""
    train, test = fewshot_split(labels, shots, seed)
    if len(train) == 0 or len(test) == 0:
        return float("nan")
    x = features.double()
    x = torch.nn.functional.normalize(x - x[train].mean(0), dim=-1)
    classes = labels[train].unique()
    y = -torch.ones(len(train), len(classes), dtype=torch.float64)
    y[torch.arange(len(train)), torch.searchsorted(classes, labels[train])] = 1.0
    xt = torch.cat([x[train], torch.ones(len(train), 1, dtype=x.dtype)], 1)   # with bias
    reg = l2 * torch.eye(xt.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0.0
    w = torch.linalg.solve(xt.T @ xt + reg, xt.T @ y)
    xs = torch.cat([x[test], torch.ones(len(test), 1, dtype=x.dtype)], 1)
    pred = classes[(xs @ w).argmax(1)]
    return (pred == labels[test]).double().mean().item()
