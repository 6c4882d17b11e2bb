"""KID, FID and Gaussian-kernel MMD on feature vectors, and the `*_domain` metrics built on them.

The `*_domain` metrics use features of the pipeline's own domain network
(`pipeline/metrics/features.py`: a small CNN trained on this dataset's real training images),
NOT Inception features. Their values are only comparable between runs that use the same
feature network (same data, seed and epochs), never with published FID/KID numbers.

Formulas (features x: (m, d), y: (n, d)):
  KID  (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel k(a, b) = (a.b / d + 1)^3,
       averaged over random subsets of equal size.
       MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
                 - 2 sum_{i,j} k(x_i, y_j) / (mn)
  FID  (Heusel et al. 2017): ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2}) of Gaussian fits.
       Tr (S_x S_y)^{1/2} is computed as Tr (S_x^{1/2} S_y S_x^{1/2})^{1/2}, a symmetric PSD matrix
       with the same eigenvalues, via eigendecomposition (stable, no complex round-off).
       FID is biased upwards for small sets: compare models on equal set sizes.
  MMD  unbiased MMD^2 with a Gaussian kernel exp(-||a-b||^2 / (2 s^2)); s = median pairwise
       distance of the pooled sample (median heuristic).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.registry import MetricContext, register_metric


# --------------------------------------------------------------------------- kernel MMD / KID

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """(x @ y.T / d + coef0) ** degree, the KID kernel."""
    d = x.shape[1]
    return (x @ y.T / d + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from the three kernel matrices (diagonals of k_xx, k_yy excluded)."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    if m < 2 or n < 2:
        return math.nan
    s_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    s_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    s_xy = k_xy.sum() / (m * n)
    return float(s_xx + s_yy - 2.0 * s_xy)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased cubic-kernel MMD^2 over `subsets` random equal-size subsets."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        values.append(polynomial_mmd2(xs, ys))
    return float(np.mean(values)), float(np.std(values))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def gaussian_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> tuple[float, float]:
    """(unbiased MMD^2, bandwidth s) with k = exp(-||a-b||^2 / (2 s^2)); s by median heuristic."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan, math.nan
    if bandwidth is None:
        z = np.concatenate([x, y])
        d2 = _sq_dists(z, z)[np.triu_indices(len(z), k=1)]
        bandwidth = float(np.sqrt(np.median(d2)))
        if bandwidth <= 0:
            bandwidth = 1.0       # all points equal: any bandwidth gives MMD 0
    gamma = 1.0 / (2.0 * bandwidth ** 2)
    k = lambda a, b: np.exp(-gamma * _sq_dists(a, b))  # noqa: E731
    return mmd2_unbiased(k(x, x), k(y, y), k(x, y)), bandwidth


# --------------------------------------------------------------------------- Frechet distance

def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^{1/2}) for PSD covariances."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    root1 = _sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def fid_from_features(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or len(y) < 2:
        return math.nan
    return frechet_distance(*gaussian_fit(x), *gaussian_fit(y))


# --------------------------------------------------------------------------- registered metrics

@register_metric("kid_domain", needs=("domain",),
                 description="KID (cubic-kernel unbiased MMD^2) on domain-CNN features, not Inception")
def kid_domain(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """KID on the domain network's penultimate features; `kid_domain_std` over subsets."""
    fr, ff = ctx.require_features()
    mean, std = kid(fr, ff, ctx.params.kid_subsets, ctx.params.kid_subset_size, ctx.seed)
    ctx.detail("std", std)
    return mean


@register_metric("fid_domain", needs=("domain",),
                 description="Frechet distance of Gaussian fits to domain-CNN features, not Inception")
def fid_domain(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """FID on the domain network's penultimate features (biased for small sets)."""
    fr, ff = ctx.require_features()
    return fid_from_features(fr, ff)


@register_metric("mmd_domain", needs=("domain",),
                 description="Gaussian-kernel MMD^2 (median-heuristic bandwidth) on domain-CNN features")
def mmd_domain(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Unbiased Gaussian-kernel MMD^2 on domain features; `mmd_domain_bandwidth` is s."""
    fr, ff = ctx.require_features()
    value, bandwidth = gaussian_mmd2(fr, ff)
    ctx.detail("bandwidth", bandwidth)
    return value
