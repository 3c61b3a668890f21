"""Confidence intervals for scores measured on a few hundred examples.

    lo, hi = wilson_interval(successes=41, n=60)             # binary outcomes
    lo, hi = bootstrap_interval(scores)                      # mean of scores in [0, 1]
    d, lo, hi = paired_difference(scores_a, scores_b)        # same examples, a - b
    r, lo, hi = paired_ratio(num_a, num_b, den_a, den_b)     # (a1 - b1) / (a2 - b2)

Every interval is 95 % by default. Bootstrap resampling is seeded, so a report is
reproducible to the digit. The paired variants resample *examples* (the same index in
every array), which is what makes a difference between two configurations measured on the
same test items much tighter than two independent intervals.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054          # two-sided 95 % normal quantile
BOOTSTRAP_RESAMPLES = 2000       # enough for stable 2.5/97.5 percentiles at 3 decimals
BOOTSTRAP_SEED = 0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (sane at 0/n and n/n)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _resample_index(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))   # (R, n) example indices


def bootstrap_interval(scores, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return (0.0, 1.0)
    means = x[_resample_index(x.size, resamples, seed)].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def paired_difference(scores_a, scores_b, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a - b) over the same examples, with a paired percentile bootstrap interval."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.shape} and {b.shape}")
    diff = a - b
    if diff.size == 0:
        return (0.0, -1.0, 1.0)
    lo, hi = bootstrap_interval(diff, resamples, seed, level)
    return (float(diff.mean()), lo, hi)


def paired_ratio(num_a, num_b, den_a, den_b, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(num_a) - mean(num_b)) / (mean(den_a) - mean(den_b)) on the same examples.

    E.g. the share of the full fine-tuning gain a value network recovers:
    num = (base+value, base), den = (full FT, base). Resamples whose denominator is 0 are
    dropped; the point estimate is nan when the measured denominator is 0.
    """
    arrays = [np.asarray(x, np.float64) for x in (num_a, num_b, den_a, den_b)]
    if len({x.shape for x in arrays}) != 1:
        raise ValueError("paired scores need equal lengths")
    n = arrays[0].size
    if n == 0:
        return (math.nan, math.nan, math.nan)
    num = arrays[0] - arrays[1]
    den = arrays[2] - arrays[3]
    point = num.mean() / den.mean() if den.mean() != 0 else math.nan
    idx = _resample_index(n, resamples, seed)
    num_r, den_r = num[idx].mean(axis=1), den[idx].mean(axis=1)
    ok = den_r != 0
    if not ok.any():
        return (float(point), math.nan, math.nan)
    ratios = num_r[ok] / den_r[ok]
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return (float(point), float(lo), float(hi))
