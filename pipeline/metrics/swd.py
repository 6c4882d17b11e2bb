"""Sliced Wasserstein distance on Laplacian-pyramid patches (ProGAN, Karras et al. 2018).

Code (vs. ProGAN's `metrics/sliced_wasserstein.py`):
  laplacian_pyramid  ~ generate_laplacian_pyramid (5x5 binomial filter, mirror padding)
  patch_descriptors  ~ get_descriptors_for_minibatch (7x7 neighbourhoods, 128 per image)
  _normalise         ~ finalize_descriptors (per-channel mean/std), see the note below
  sliced_wasserstein ~ sliced_wasserstein (4 repeats x 128 random unit directions = 512,
                       sorted 1-D projections, mean absolute difference)

One deviation, on purpose: ProGAN normalises the real and the fake descriptors each by their
own per-channel statistics, which makes the distance blind to a global brightness or contrast
change. By default both sets are normalised with the REAL set's statistics, so such shifts
count (`normalise="each"` gives ProGAN's behaviour). ProGAN's sets are large (128 patches x
thousands of images); ours are often tens of images, so each image gives at least
MIN_DESCRIPTORS / N patches (every position when that covers them all: then identical sets
score exactly 0). The two sets are subsampled to the same number of descriptors so sorted
projections pair up one to one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.metrics.registry import MetricContext, register_metric

NHOOD = 7               # neighbourhood side
MIN_LEVEL_RES = 16      # coarsest pyramid level (ProGAN: 16 px)
MIN_DESCRIPTORS = 16384 # per level and set: small sets sample more patches per image (less noise)

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
_GAUSS = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0   # (5, 5), sums to 1


def _blur(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    w = _GAUSS.to(x.dtype).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), w, groups=c)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return (_blur(up) * 4.0)[:, :, :size[0], :size[1]]


def pyramid_resolutions(size: int) -> list[int]:
    """Level sides from `size` halving down to MIN_LEVEL_RES (one level if the image is smaller)."""
    res = [size]
    while res[-1] // 2 >= MIN_LEVEL_RES:
        res.append(res[-1] // 2)
    return res


def laplacian_pyramid(images: torch.Tensor, num_levels: int) -> list[torch.Tensor]:
    """(N, C, H, W) float -> [band-pass levels..., low-pass residual], finest first."""
    pyramid = [images]
    for _ in range(1, num_levels):
        pyramid.append(_pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1], pyramid[-2].shape[-2:])
    return pyramid


def patch_descriptors(level: torch.Tensor, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """7x7 neighbourhoods: (N * k, C, 7, 7). k = `per_image` random positions per image, or every
    position (dense, no randomness) when `per_image` covers them all."""
    n, _, h, w = level.shape
    if h < NHOOD or w < NHOOD:
        raise ValueError(f"pyramid level {h}x{w} is smaller than the {NHOOD}x{NHOOD} neighbourhood")
    patches = level.unfold(2, NHOOD, 1).unfold(3, NHOOD, 1)       # (N, C, H-6, W-6, 7, 7)
    ny, nx = h - NHOOD + 1, w - NHOOD + 1
    if per_image >= ny * nx:
        return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, level.shape[1], NHOOD, NHOOD).numpy()
    idx_n = np.repeat(np.arange(n), per_image)
    idx_y = rng.integers(0, ny, size=idx_n.size)
    idx_x = rng.integers(0, nx, size=idx_n.size)
    return patches[torch.from_numpy(idx_n), :, torch.from_numpy(idx_y),
                   torch.from_numpy(idx_x)].numpy()                # (K, C, 7, 7)


def _normalise(desc: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    desc = (desc - mean[None, :, None, None]) / std[None, :, None, None]
    return desc.reshape(desc.shape[0], -1)


def _channel_stats(desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = desc.mean(axis=(0, 2, 3))
    std = desc.std(axis=(0, 2, 3))
    return mean, np.where(std > 1e-8, std, 1.0)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, projections: int, rng: np.random.Generator,
                       dirs_per_repeat: int = 128) -> float:
    """Mean over random unit directions of W1 between the 1-D projections of `a` and `b` (K, D)."""
    assert a.shape == b.shape, "sliced_wasserstein pairs sorted projections: same count needed"
    results = []
    remaining = projections
    while remaining > 0:
        k = min(dirs_per_repeat, remaining)
        dirs = rng.standard_normal((a.shape[1], k)).astype(np.float32)
        dirs /= np.sqrt(np.sum(dirs ** 2, axis=0, keepdims=True))
        proj_a = np.sort(a @ dirs, axis=0)
        proj_b = np.sort(b @ dirs, axis=0)
        results.append(np.mean(np.abs(proj_a - proj_b)) * k)
        remaining -= k
    return float(np.sum(results) / projections)


def swd_per_level(real: np.ndarray, fake: np.ndarray, *, projections: int = 512, per_image: int = 128,
                  seed: int = 0, normalise: Literal["real", "each"] = "real") -> dict[int, float]:
    """SWD x 1e3 (ProGAN's reporting scale) per pyramid level, keyed by level side in px.

    real, fake: uint8 (N, C, H, W) with the same C, H, W.
    """
    rng = np.random.default_rng(seed)
    size = real.shape[-1]
    levels = pyramid_resolutions(size)
    pyr_r = laplacian_pyramid(torch.from_numpy(real).float(), len(levels))
    pyr_f = laplacian_pyramid(torch.from_numpy(fake).float(), len(levels))
    out: dict[int, float] = {}
    for res, lr, lf in zip(levels, pyr_r, pyr_f):
        d_r = patch_descriptors(lr, max(per_image, -(-MIN_DESCRIPTORS // len(real))), rng)
        d_f = patch_descriptors(lf, max(per_image, -(-MIN_DESCRIPTORS // len(fake))), rng)
        stats_r = _channel_stats(d_r)
        a = _normalise(d_r, *stats_r)
        b = _normalise(d_f, *(stats_r if normalise == "real" else _channel_stats(d_f)))
        k = min(len(a), len(b))                       # same count: subsample the larger set
        a = a[rng.choice(len(a), k, replace=False)] if len(a) > k else a
        b = b[rng.choice(len(b), k, replace=False)] if len(b) > k else b
        out[res] = sliced_wasserstein(a, b, projections, rng) * 1e3
    return out


@register_metric("swd", description="sliced Wasserstein distance x1e3 on Laplacian 7x7 patches (ProGAN)")
def swd_metric(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """SWD x 1e3, mean over pyramid levels; each level is reported as `swd_<side>px`.

    ProGAN multiplies by 1e3 for readability; we keep that scale so numbers read alike.
    """
    p = ctx.params
    levels = swd_per_level(real, fake, projections=p.swd_projections, per_image=p.swd_patches_per_image,
                           seed=ctx.seed)
    for res, value in levels.items():
        ctx.detail(f"{res}px", value)
    return float(np.mean(list(levels.values())))
