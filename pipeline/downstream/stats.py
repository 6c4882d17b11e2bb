"""Seed statistics for the downstream comparison.

Every condition of one (shots, seed) is trained on the same capped real subset from the same
initial weights, so conditions are compared as paired per-seed differences
d_s = score(condition, s) - score(real_only, s). The interval is Student's t on those
differences (the paired t-test's interval): mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n).
With few seeds (5 by default) a bootstrap of the mean under-covers; the t interval is the
standard choice there. A condition "helped" only when the whole interval is above 0.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def _finite(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values), np.float64)
    return a[np.isfinite(a)]


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0.0 for one value) over the finite values; NaNs if none."""
    a = _finite(values)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def paired_t_interval(differences: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired differences; low/high are NaN with fewer than 2 values."""
    from scipy import stats   # installed with albumentations (pinned in constraints.txt)

    d = _finite(differences)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """'helped' / 'hurt' only when the interval excludes 0; otherwise 'no detectable difference'."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval (one seed)"
    if low > 0:
        return "helped"
    if high < 0:
        return "hurt"
    return "no detectable difference"
