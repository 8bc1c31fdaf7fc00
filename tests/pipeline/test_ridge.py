"""The closed-form probe's solve (pipeline/ridge.py), shared by the few-shot probe during
pretraining and VTAB-1k's `linear` protocol."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.ridge import BIAS_CONSTANT, Ridge


def test_one_eigendecomposition_gives_the_direct_solve_at_every_l2():
    """The weights for each L2 from one eigendecomposition are those of solving the normal
    equations directly, (x^T x + l2 I) w = x^T y, on both sides of n = d (primal and dual)."""
    rng = np.random.default_rng(5)
    for n, d in ((60, 8), (20, 40)):
        feats, labels = torch.tensor(rng.normal(0, 2, (n, d))), rng.integers(0, 4, n)
        ridge = Ridge(feats, labels, 4)
        x = (feats - feats.mean(0)) / (feats.std(0, unbiased=False) + 1e-5)
        x = torch.cat([x, torch.full((n, 1), BIAS_CONSTANT, dtype=x.dtype)], 1)
        y = 2.0 * torch.nn.functional.one_hot(torch.tensor(labels), 4).double() - 1.0
        for l2 in (2.0 ** -4, 1.0, 2.0 ** 10):
            direct = torch.linalg.solve(x.T @ x + l2 * torch.eye(d + 1, dtype=x.dtype),
                                        x.T @ y)
            assert torch.allclose(ridge.weights(l2), direct, rtol=1e-6, atol=1e-8), (n, d, l2)
            test = torch.tensor(rng.normal(0, 2, (50, d)))
            assert torch.equal(ridge.predict(test, l2), (ridge._prepare(test) @ direct)
                               .argmax(1))
