"""DRAEM-style synthetic anomalies: a thresholded Perlin-noise mask filled with a foreign texture.

Zavrtanik, Kristan and Skočaj, "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection", ICCV 2021, Sec. 3.3: a Perlin noise image is thresholded into an
anomaly mask M, an anomaly source image A is augmented, and the anomaly is blended in as

    I_a = (1 - M) ⊙ I + (1 - β)(M ⊙ A) + β(M ⊙ I),

with the opacity β drawn uniformly in [0.1, 1.0] (the paper; its public code, VitjanZ/DRAEM
data_loader.py, draws β = 0.8 * U[0, 1) instead). Pixels outside M are exactly the normal image.
Choices of that code kept here: a lattice of 2**k cells per axis, k drawn per axis (k in 0..5),
the noise rotated by U(-90, 90) degrees, and three photometric augmentations of A drawn without
replacement from a list (here the six of the code's ten that are plain array operations: gamma
contrast (0.5, 2.0) per channel, brightness x U(0.8, 1.2) + U(-30, 30), solarize above U(32, 128),
posterize to 1-7 bits, invert, per-channel autocontrast; sharpness, hue/saturation, equalize and
rotation are left out).

Adapted to this project:
  * nothing is downloaded: DRAEM draws A from the DTD texture set; here A is another normal
    image of the training subset, moved by a random rot90 / flip / circular shift
    (`texture="normals"`: the same material out of place, as a misplaced or foreign patch), or a
    coloured fractal Perlin texture (`texture="procedural"`);
  * the mask is not a fixed threshold at 0.5 (which at 32-64 px is often empty or huge) but the
    top quantile of the noise, with an area drawn uniformly in `area_range`, so every image has
    a defect of a controlled size; the finest lattice cell is capped at 4 px so a 32 px image
    still gets smooth blobs (DRAEM's finest is 8 px at 256 px);
  * every image is an anomaly (DRAEM returns the unchanged image half the time: its training
    batches mix normals in; here the caller mixes them).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import numpy as np

Scale = Union[int, Sequence[int]]

MIN_CELL_PX = 4     # finest Perlin lattice cell, in pixels
MAX_LEVEL = 5       # lattice of at most 2**5 cells per axis (DRAEM's code draws k in 0..5)


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)          # 6t^5 - 15t^4 + 10t^3 (Perlin 2002)


def perlin_noise(h: int, w: int, scale: Scale, rng: np.random.Generator, angle: float = 0.0) -> np.ndarray:
    """Gradient (Perlin) noise, float64 (h, w), values within about [-0.71, 0.71].

    scale: lattice cells per side, an int or (cells along y, cells along x); a random unit
    gradient sits at every lattice corner and each pixel interpolates the four corners' ramps
    with the quintic fade. angle (degrees) rotates the pattern about the image centre.
    """
    sy, sx = (scale, scale) if isinstance(scale, (int, np.integer)) else tuple(scale)
    if int(sy) < 1 or int(sx) < 1:
        raise ValueError(f"scale must be >= 1 cell per side; got {scale}")
    if h < 1 or w < 1:
        raise ValueError(f"h and w must be >= 1; got {h}x{w}")
    py, px = np.meshgrid(np.arange(h) + 0.5 - h / 2, np.arange(w) + 0.5 - w / 2, indexing="ij")
    if angle:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        py, px = c * py - s * px, s * py + c * px
    # Pixel -> lattice coordinates; an integer shift keeps them >= 0 without moving the pattern.
    y, x = (py + h / 2) * (sy / h), (px + w / 2) * (sx / w)
    y, x = y - math.floor(y.min()), x - math.floor(x.min())
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - iy, x - ix
    theta = 2 * math.pi * rng.random((int(iy.max()) + 2, int(ix.max()) + 2))
    gy, gx = np.sin(theta), np.cos(theta)

    def ramp(dy: int, dx: int) -> np.ndarray:        # corner gradient . offset from that corner
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    u, v = _fade(fx), _fade(fy)
    top = ramp(0, 0) + u * (ramp(0, 1) - ramp(0, 0))
    bottom = ramp(1, 0) + u * (ramp(1, 1) - ramp(1, 0))
    return top + v * (bottom - top)


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must be (low, high) with {low} <= low <= high <= {high}; got {tuple(value)}")
    return lo, hi


def perlin_mask(h: int, w: int, rng: np.random.Generator,
                area_range: tuple[float, float] = (0.005, 0.2)) -> np.ndarray:
    """A DRAEM anomaly mask, uint8 (h, w) 0/1: the round(a * h * w) (at least 1) highest pixels of
    rotated Perlin noise, a ~ U(area_range), a lattice of 2**k cells per axis (k drawn per axis,
    cells of at least MIN_CELL_PX pixels, k <= MAX_LEVEL). Deterministic for the rng's state."""
    lo, hi = _check_range("area_range", area_range, 0.0, 1.0)
    if hi <= 0:
        raise ValueError(f"area_range must allow a non-empty mask; got {tuple(area_range)}")
    top = int(np.clip(math.floor(math.log2(max(min(h, w) / MIN_CELL_PX, 1))), 0, MAX_LEVEL))
    scale = 2 ** rng.integers(0, top + 1, size=2)
    noise = perlin_noise(h, w, (int(scale[0]), int(scale[1])), rng, angle=float(rng.uniform(-90.0, 90.0)))
    count = int(np.clip(round(rng.uniform(lo, hi) * h * w), 1, h * w))
    mask = np.zeros(h * w, np.uint8)
    # A quantile threshold by rank: exactly `count` pixels even where noise values repeat.
    mask[np.argsort(-noise, axis=None, kind="stable")[:count]] = 1
    return mask.reshape(h, w)


# --------------------------------------------------------------------------- the anomaly source A

def _gamma(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0, size=(len(a), 1, 1))                # per channel
    return 255.0 * (a / 255.0) ** gamma


def _brightness(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return a * rng.uniform(0.8, 1.2) + rng.uniform(-30.0, 30.0)


def _solarize(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where(a >= rng.uniform(32.0, 128.0), 255.0 - a, a)


def _posterize(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    step = 2.0 ** (8 - int(rng.integers(1, 8)))                      # keep 1..7 bits
    return np.floor(a / step) * step


def _invert(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - a


def _autocontrast(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    return np.where(hi > lo, (a - lo) * 255.0 / np.maximum(hi - lo, 1e-9), a)


PHOTOMETRIC = (_gamma, _brightness, _solarize, _posterize, _invert, _autocontrast)


def _photometric(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three of PHOTOMETRIC, drawn without replacement, in the drawn order; float (C, H, W) 0..255."""
    for k in rng.choice(len(PHOTOMETRIC), 3, replace=False):
        a = np.clip(PHOTOMETRIC[k](a, rng), 0.0, 255.0)
    return a


def _moved(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (C, H, W) -> float: a random rot90 (a half turn only if not square), flips and a
    circular shift, so the texture is out of place relative to the image it lands on."""
    _, h, w = image.shape
    a = np.rot90(image, int(rng.integers(0, 4)) if h == w else 2 * int(rng.integers(0, 2)), axes=(1, 2))
    if rng.random() < 0.5:
        a = a[:, :, ::-1]
    if rng.random() < 0.5:
        a = a[:, ::-1, :]
    a = np.roll(a, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(1, 2))
    return a.astype(np.float64)


def _procedural(channels: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured fractal Perlin texture, float (C, H, W) 0..255: per channel three octaves
    (amplitude halving, cells doubling from a random 1-4 per side), stretched to full range."""
    out = np.empty((channels, h, w))
    for c in range(channels):
        base = int(rng.integers(1, 5))
        layer = sum(0.5 ** o * perlin_noise(h, w, base * 2 ** o, rng) for o in range(3))
        out[c] = (layer - layer.min()) / max(float(np.ptp(layer)), 1e-9) * 255.0
    return out


def draem_anomalies(normals: np.ndarray, count: int, seed: int,
                    texture: Literal["normals", "procedural"] = "normals",
                    area_range: tuple[float, float] = (0.005, 0.2),
                    beta_range: tuple[float, float] = (0.1, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """`count` DRAEM anomalies on normal images (module docstring).

    normals uint8 (N, C, H, W), N >= 1 (C = 1 or 3, any H, W). Each output takes a random
    normal I, a perlin_mask M, a texture A (another normal, moved, or procedural; with one
    normal, that image itself moved), three photometric augmentations of A, β ~ U[beta_range)
    (half-open, so the paper's default β < 1 always changes the masked pixels), and blends
    them. Returns (images uint8 (count, C, H, W), masks uint8 (count, 1, H, W) 0/1, never
    empty). Deterministic for a seed.
    """
    normals = np.asarray(normals)
    if normals.ndim != 4 or normals.dtype != np.uint8:
        raise ValueError(f"normals must be uint8 (N, C, H, W); got {normals.dtype} {normals.shape}")
    if len(normals) == 0:
        raise ValueError("normals is empty: draem_anomalies needs at least one normal image to paint on")
    if count < 0:
        raise ValueError(f"count must be >= 0; got {count}")
    if texture not in ("normals", "procedural"):
        raise ValueError(f"texture must be 'normals' or 'procedural'; got {texture!r}")
    b_lo, b_hi = _check_range("beta_range", beta_range, 0.0, 1.0)
    n, c, h, w = normals.shape
    rng = np.random.default_rng([seed, 0xD4AE])
    images = np.empty((count, c, h, w), np.uint8)
    masks = np.empty((count, 1, h, w), np.uint8)
    for t in range(count):
        i = int(rng.integers(n))
        mask = perlin_mask(h, w, rng, area_range)
        if texture == "normals":
            j = i
            if n > 1:
                j = int(rng.integers(n - 1))
                j += j >= i                                             # any normal but I itself
            source = _moved(normals[j], rng)
        else:
            source = _procedural(c, h, w, rng)
        source = _photometric(source, rng)
        beta = rng.uniform(b_lo, b_hi)
        base = normals[i].astype(np.float64)
        blended = np.clip(np.rint((1 - beta) * source + beta * base), 0, 255).astype(np.uint8)
        images[t] = np.where(mask.astype(bool), blended, normals[i])    # outside M: I exactly
        masks[t, 0] = mask
    return images, masks
