"""Few-shot linear probe (ViT paper §4.1), ported from big_vision's `fewshot_lsr` evaluator
(`big_vision/evaluators/fewshot_lsr.py`, with `configs/common_fewshot.py`'s settings): the
pre-logits of frozen images, k labelled images per class of a downstream set drawn with a
seed, a closed-form L2-regularised least-squares map to {-1, 1}^K targets, top-1 on the set's
test split, the mean over seeds. Cheap enough to run during pretraining as a progress signal.

As big_vision does it:
- features: the pre-logits (the tanh representation layer's output where the model has one,
  else the pooled token), `Pretrainer.forward(images)`;
- each dimension standardised with the mean and std of the k-shot training images (std + 1e-5),
  the test images with the same statistics;
- a constant feature of 100 appended as the bias (so large it is almost unregularised);
- targets 2 * one_hot(label, K) - 1 over all K classes of the set; l2 = 2^10;
- per seed, each class's images permuted by `np.random.default_rng(seed)` and its first k
  taken (a class with fewer gives what it has); 3 seeds, reported as their mean.
We solve the normal equations (primal or dual, whichever is smaller) in float64 where
big_vision goes through an eigendecomposition; the test compares the two.
"""

from __future__ import annotations

import numpy as np
import torch

BIAS_CONSTANT = 100.0
L2_REG = 2.0**10
SEEDS = 3


def lsr_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                num_classes: int, l2: float = L2_REG) -> torch.Tensor:
    """Class predictions for `x_test` from the least-squares probe fit on (x_train, y_train)."""
    x = x_train.double()
    mean = x.mean(0, keepdim=True)
    std = x.std(0, unbiased=False, keepdim=True) + 1e-5

    def prepare(f: torch.Tensor) -> torch.Tensor:
        f = (f.double() - mean) / std
        return torch.cat([f, torch.full((len(f), 1), BIAS_CONSTANT, dtype=f.dtype)], 1)

    x, xt = prepare(x_train), prepare(x_test)
    y = 2.0 * torch.nn.functional.one_hot(y_train.long(), num_classes).double() - 1.0
    n, d = x.shape
    if n >= d:      # (x^T x + l2 I)^-1 x^T y
        w = torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ y)
    else:           # x^T (x x^T + l2 I)^-1 y: the same map, through the smaller system
        w = x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(n, dtype=x.dtype), y)
    return (xt @ w).argmax(1)


def shot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """big_vision's draw: per class, a permutation by `default_rng(seed)` (drawn for every
    class in order, so the draw of one class does not depend on `shots`), its first `shots`."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    return np.concatenate([idx[:shots] for idx in per_class]).astype(np.int64)


def fewshot_accuracy(train_feats: torch.Tensor, train_labels: np.ndarray,
                     test_feats: torch.Tensor, test_labels: np.ndarray, num_classes: int,
                     shots: int, seeds: int = SEEDS, l2: float = L2_REG) -> float:
    """Mean top-1 over `seeds` draws of `shots` training images per class. NaN when the
    training pool or the test set is empty."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if not len(train_labels) or not len(test_labels):
        return float("nan")
    return float(np.mean([seed_accuracy(train_feats, train_labels, test_feats, test_labels,
                                        num_classes, shots, seed, l2)
                          for seed in range(seeds)]))


def seed_accuracy(train_feats: torch.Tensor, train_labels: np.ndarray, test_feats: torch.Tensor,
                  test_labels: np.ndarray, num_classes: int, shots: int, seed: int,
                  l2: float = L2_REG) -> float:
    """Top-1 of one draw (`shot_indices` with `seed`)."""
    idx = shot_indices(np.asarray(train_labels), num_classes, shots, seed)
    pred = lsr_predict(train_feats[idx], torch.from_numpy(np.asarray(train_labels)[idx]),
                       test_feats, num_classes, l2)
    return float((pred.numpy() == np.asarray(test_labels)).mean())
