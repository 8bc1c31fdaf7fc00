"""The closed-form linear probe's solve, shared by the few-shot probe during pretraining
(pipeline/train/fewshot.py) and VTAB-1k's `linear` protocol (eval/linear.py): big_vision's
few-shot evaluator (`big_vision/evaluators/fewshot_lsr.py`, `_precompute_cache` and
`_eig_fewshot_acc_fn`). Features standardised with the training images' statistics, a
constant bias feature, an L2-regularised least-squares map to {-1, 1}^K targets.
"""

from __future__ import annotations

import numpy as np
import torch

# big_vision's few-shot evaluators: a constant feature of 100 as the bias (so large that it is
# almost unregularised) and {-1, 1}^K targets.
BIAS_CONSTANT = 100.0


class Ridge:
    """The least-squares map of (x, labels) for any L2, from one eigendecomposition (as
    big_vision solves it): the Gram matrix of the smaller side, x^T x (d x d) or x x^T
    (n x n), in float64, so that each further L2 of a sweep costs a matrix product."""

    def __init__(self, x: torch.Tensor, labels, num_classes: int):
        x = torch.as_tensor(x).double()
        self.mean = x.mean(0, keepdim=True)
        self.std = x.std(0, unbiased=False, keepdim=True) + 1e-5
        x = self._prepare(x)
        y = 2.0 * torch.nn.functional.one_hot(torch.as_tensor(np.asarray(labels)).long(),
                                               num_classes).double() - 1.0
        self.primal = x.shape[0] >= x.shape[1]
        gram = x.T @ x if self.primal else x @ x.T
        self.eig, self.vecs = torch.linalg.eigh(gram)
        self.x, self.proj = x, self.vecs.T @ (x.T @ y if self.primal else y)

    def _prepare(self, f: torch.Tensor) -> torch.Tensor:
        f = (torch.as_tensor(f).double() - self.mean) / self.std
        return torch.cat([f, torch.full((len(f), 1), BIAS_CONSTANT, dtype=f.dtype)], 1)

    def weights(self, l2: float) -> torch.Tensor:
        """(x^T x + l2 I)^-1 x^T y, or x^T (x x^T + l2 I)^-1 y: the same map."""
        w = self.vecs @ (self.proj / (self.eig.clamp(min=0) + l2)[:, None])
        return w if self.primal else self.x.T @ w

    def predict(self, x: torch.Tensor, l2: float) -> torch.Tensor:
        """Class indices of `x` under the map at `l2`."""
        return (self._prepare(x) @ self.weights(l2)).argmax(1)
