"""Diversity: catch mode collapse (the birthday-paradox idea of Arora & Zhang 2017, automated).

Arora & Zhang look at the closest pairs in a sample of generated images: if a batch of s
samples already contains near-duplicates, the support size is about s^2. Here the eye is
replaced by a threshold calibrated on the real set:

  duplicate_rate  fraction of generated images whose nearest OTHER generated image is closer
                  than the `duplicate_percentile`-th percentile of real-real nearest-neighbour
                  distances. Both sets are subsampled to the same size first, since
                  nearest-neighbour distances shrink as a set grows. A healthy generator scores
                  about the percentile itself (reported as `duplicate_rate_real`); a collapsed
                  one approaches 1.
  mean_pairwise_distance  mean distance between generated images (`_real`: the same on the
                  real set). Much lower than the real value means too little diversity.

With tens of images per class the rate is noisy: nearest-neighbour distances within one set are
strongly correlated (e.g. where the defects happen to sit), so read per-class values on small
sets next to `duplicate_rate_real` and `mean_pairwise_distance`.

Distances are RMS per-pixel differences in [0, 1] (L2 / sqrt(#values), so they read the same
at any resolution), or L2 on domain features with `evaluate.duplicate_space: features`.
No LPIPS: it needs downloaded weights.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.registry import MetricContext, register_metric

MAX_PAIRWISE = 2000      # sets are subsampled to this size before O(N^2) distance matrices


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C*H*W) float64 scaled so L2 is the RMS pixel difference in [0, 1]."""
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return x / math.sqrt(max(x.shape[1], 1))


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """(N, N) Euclidean distances between rows."""
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(np.maximum(d2, 0.0))


def nearest_neighbour_distances(x: np.ndarray) -> np.ndarray:
    """Distance from each row to its nearest other row (N,)."""
    d = pairwise_distances(x)
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def mean_pairwise(x: np.ndarray) -> float:
    if len(x) < 2:
        return math.nan
    d = pairwise_distances(x)
    return float(d[np.triu_indices(len(x), k=1)].mean())


def _subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x[rng.choice(len(x), n, replace=False)] if len(x) > n else x


def _vectors(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> tuple[np.ndarray, np.ndarray]:
    if ctx.params.duplicate_space == "features":
        return ctx.require_features("domain")
    return pixel_vectors(real), pixel_vectors(fake)


def duplicate_rate_of(real_vecs: np.ndarray, fake_vecs: np.ndarray, percentile: float = 1.0,
                      seed: int = 0) -> tuple[float, float, float]:
    """(fake duplicate rate, real rate at the same threshold, threshold)."""
    n = min(len(real_vecs), len(fake_vecs), MAX_PAIRWISE)
    if n < 2:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    real_nn = nearest_neighbour_distances(_subsample(real_vecs, n, rng))
    fake_nn = nearest_neighbour_distances(_subsample(fake_vecs, n, rng))
    threshold = float(np.percentile(real_nn, percentile))
    return float(np.mean(fake_nn <= threshold)), float(np.mean(real_nn <= threshold)), threshold


@register_metric("duplicate_rate", description="share of generated images with a near-duplicate "
                 "among generated images (threshold from real NN distances)")
def duplicate_rate(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Birthday-paradox style duplicate rate; `_real` and `_threshold` are reported beside it."""
    rate, real_rate, threshold = duplicate_rate_of(*_vectors(real, fake, ctx),
                                                   ctx.params.duplicate_percentile, ctx.seed)
    ctx.detail("real", real_rate)
    ctx.detail("threshold", threshold)
    return rate


@register_metric("mean_pairwise_distance", lower_is_better=False,
                 description="mean distance between generated images (compare with _real)")
def mean_pairwise_distance(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Mean pairwise distance among generated images; `_real` is the real set's value."""
    rv, fv = _vectors(real, fake, ctx)
    rng = np.random.default_rng(ctx.seed)
    ctx.detail("real", mean_pairwise(_subsample(rv, MAX_PAIRWISE, rng)))
    return mean_pairwise(_subsample(fv, MAX_PAIRWISE, rng))
