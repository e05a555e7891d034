"""Paired statistics for the benchmark: is method A more accurate than method B on the same test images?

Both methods are scored on the same test images with the same seeds, so their difference is paired: each
image is right or wrong for both. The interval comes from a bootstrap that resamples test images (and, with
several seeds, seeds), the two sources of variation a reader cares about; McNemar's exact test per seed
says whether the disagreements lean one way.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> a = rng.random((3, 2000)) < 0.90          # 3 seeds x 2000 test images, 90% right
>>> b = a & (rng.random((3, 2000)) < 0.97)     # the same, with about 3% more wrong
>>> d = paired_difference(a, b, seed=0)
>>> d["significant"], d["low"] > 0
(True, True)
"""
from __future__ import annotations

from math import comb

import numpy as np

__all__ = ["mcnemar_p", "paired_difference"]


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, *, resamples: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict[str, float | bool | int]:
    """Mean accuracy of A minus B, in points, with a paired bootstrap interval.

    `correct_a`, `correct_b`: booleans of shape (seeds, images), one row per seed, the same images in the
    same order for both. Each resample draws images with replacement (the same images for A and B, and
    for every seed) and seeds with replacement; the interval is the percentile interval of the resampled
    mean differences. `significant` is True when the interval excludes 0."""
    a, b = np.atleast_2d(np.asarray(correct_a, dtype=bool)), np.atleast_2d(np.asarray(correct_b, dtype=bool))
    if a.shape != b.shape:
        raise ValueError(f"correct_a has shape {a.shape} and correct_b {b.shape}: they must score the same seeds and images")
    seeds, n = a.shape
    if n == 0:
        raise ValueError("no test images to compare")
    diff = a.astype(np.int8) - b.astype(np.int8)  # +1 A right only, -1 B right only
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for r in range(resamples):
        rows = rng.integers(0, seeds, seeds) if seeds > 1 else np.zeros(1, dtype=int)
        cols = rng.integers(0, n, n)
        means[r] = diff[np.ix_(rows, cols)].mean()
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {
        "diff_points": 100 * float(diff.mean()),
        "low": 100 * float(low),
        "high": 100 * float(high),
        "level": level,
        "seeds": seeds,
        "images": n,
        "significant": bool(low > 0 or high < 0),
        "mcnemar_p": [mcnemar_p(a[s], b[s]) for s in range(seeds)],
    }


def mcnemar_p(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided exact McNemar test on one seed's paired results: the p-value that the images only A gets
    right and those only B gets right split as unevenly as they do by chance (a binomial with p = 1/2).

    >>> mcnemar_p(np.array([True] * 30 + [False] * 10), np.array([True] * 20 + [False] * 20))
    0.001953125
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)
