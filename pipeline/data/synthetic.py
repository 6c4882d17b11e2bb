"""Procedural industrial surfaces with exactly-masked defects (the embedded default source).

Two presets (`prepare.synthetic.preset`):

* `classic` (default): colourful surfaces and bold defects, easy to tell apart at 32 px.
* `production`: what an inspection camera sees. Grey surfaces (brushed steel, cast/blasted
  matte, machined with faint tool marks) with sensor noise and mild illumination gradients;
  faint defects a few pixels wide: thin cracks (1-2 px random-walk lines), small pits (2-5 px
  dark dots with a slight bright rim), stains (soft low-contrast blotches); strong class
  imbalance (hundreds of normals, tens of images per defect class, set per class). Sizes are
  given in pixels at 64 px and scale with the resolution; crack width stays 1-2 px.

Classic surfaces: brushed metal (anisotropic streaks), woven fabric (plain weave), speckled/granular
(multi-scale grain with dark and bright specks), each under random lighting (gain, linear
gradient, vignette). Defects: scratch (thin curved bright or dark line), spot/stain (soft-edged
blob), crack (branching dark random walk), pit/dent (shaded circular depression).

A defect is an alpha map that is exactly zero outside its mask, composited with
`np.where(mask, blend, surface)`: a pixel differs from the clean surface only inside the mask,
so the mask is exact (the paired set proves it: A and B are equal outside the mask).

Every image gets its own generator seeded by (seed, kind, class, index), so the output is
byte-identical for a seed and adding images to one class never changes another class.
Everything is numpy, vectorised within an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

_KIND_NORMAL, _KIND_DEFECT, _KIND_PAIR = 0, 1, 2


@dataclass
class SyntheticImage:
    kind: str            # "normal" | "defect" | "pair"
    label: str           # "normal" or the defect class
    index: int           # index within (kind, label)
    texture: str
    image: np.ndarray    # HxWxC uint8 (for pairs: the defective B image)
    mask: np.ndarray     # HxW uint8 0/1
    clean: np.ndarray | None = None   # pairs only: the same surface without the defect (A)


# --------------------------------------------------------------------------- helpers

def _grid(r: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:r, 0:r].astype(np.float32)
    return y, x


def _blur_fft(noise: np.ndarray, sigma_y: float, sigma_x: float, angle: float = 0.0) -> np.ndarray:
    """Periodic anisotropic Gaussian blur of a 2-D array via FFT; `angle` (radians) rotates the
    blur's axes (0: sigma_y along rows, sigma_x along columns)."""
    h, w = noise.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    if angle:
        fy, fx = fy * np.cos(angle) + fx * np.sin(angle), fx * np.cos(angle) - fy * np.sin(angle)
    transfer = np.exp(-2.0 * np.pi ** 2 * ((sigma_y * fy) ** 2 + (sigma_x * fx) ** 2))
    return np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=(h, w)).astype(np.float32)


def _unit(a: np.ndarray) -> np.ndarray:
    s = float(a.std())
    return (a - a.mean()) / (s if s > 1e-8 else 1.0)


def _hsv_colour(rng: np.random.Generator, h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


# --------------------------------------------------------------------------- surfaces

def _brushed_metal(rng: np.random.Generator, r: int) -> np.ndarray:
    s = r / 32.0
    streaks = _unit(_blur_fft(rng.standard_normal((r, r)), 0.35 * s, rng.uniform(4, 10) * s))
    grain = _unit(_blur_fft(rng.standard_normal((r, r)), 0.6 * s, 0.6 * s))
    v = rng.uniform(0.45, 0.72) + rng.uniform(0.04, 0.09) * streaks + 0.02 * grain
    if rng.random() < 0.5:
        v = v.T
    tint = np.array([0.97, 1.0, 1.04], np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    return v[:, :, None] * tint


def _woven_fabric(rng: np.random.Generator, r: int) -> np.ndarray:
    y, x = _grid(r)
    theta = rng.uniform(-0.3, 0.3)
    u = (x * np.cos(theta) + y * np.sin(theta)) / (r * rng.uniform(0.09, 0.16)) + rng.random()
    v = (-x * np.sin(theta) + y * np.cos(theta)) / (r * rng.uniform(0.09, 0.16)) + rng.random()
    fu, fv = u - np.floor(u), v - np.floor(v)
    warp_on_top = ((np.floor(u) + np.floor(v)) % 2) == 0
    across = np.where(warp_on_top, fu, fv)          # position across the visible thread
    along = np.where(warp_on_top, fv, fu)
    thread = 1.0 - 1.6 * (across - 0.5) ** 2 - 0.25 * (along - 0.5) ** 2
    fibre = _unit(_blur_fft(rng.standard_normal((r, r)), 0.5, 0.5))
    shade = 0.55 + 0.4 * thread + 0.04 * fibre
    colour = _hsv_colour(rng, rng.random(), rng.uniform(0.15, 0.55), rng.uniform(0.55, 0.85))
    return shade[:, :, None] * colour


def _speckled(rng: np.random.Generator, r: int) -> np.ndarray:
    s = r / 32.0
    coarse = _unit(_blur_fft(rng.standard_normal((r, r)), 2.5 * s, 2.5 * s))
    fine = _unit(_blur_fft(rng.standard_normal((r, r)), 0.5 * s, 0.5 * s))
    u = rng.random((r, r))
    density = rng.uniform(0.02, 0.06)
    specks = np.where(u < density / 2, -1.0, np.where(u > 1 - density / 2, 1.0, 0.0)).astype(np.float32)
    if s > 1.5:
        specks = _blur_fft(specks, 0.4 * s, 0.4 * s) * (0.4 * s) ** 2 * 2
    v = rng.uniform(0.45, 0.65) + 0.05 * coarse + 0.05 * fine + 0.22 * specks
    colour = _hsv_colour(rng, rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.3), 1.0)
    return v[:, :, None] * colour


TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "brushed_metal": _brushed_metal,
    "woven_fabric": _woven_fabric,
    "speckled": _speckled,
    "granular": _speckled,
}


def _light_field(rng: np.random.Generator, r: int, gain: tuple[float, float], gradient: tuple[float, float],
                 vignette: tuple[float, float]) -> tuple[np.ndarray, float]:
    """Multiplicative light (HxW): gain x linear gradient along the light's azimuth x vignette,
    each strength drawn from its (low, high) range; and the azimuth (used to shade pits)."""
    y, x = _grid(r)
    yn, xn = y / (r - 1) - 0.5, x / (r - 1) - 0.5
    phi = rng.uniform(0, 2 * np.pi)
    light = (rng.uniform(*gain)
             * (1 + rng.uniform(*gradient) * (xn * np.cos(phi) + yn * np.sin(phi)))
             * (1 - rng.uniform(*vignette) * (xn ** 2 + yn ** 2)))
    return light.astype(np.float32), float(phi)


def _lighting(rng: np.random.Generator, r: int) -> tuple[np.ndarray, float]:
    """Classic: strong, varied light (HxWx1, multiplies the colour surface)."""
    light, phi = _light_field(rng, r, gain=(0.8, 1.2), gradient=(0.0, 0.4), vignette=(0.0, 0.6))
    return light[:, :, None], phi


# --------------------------------------------------------------------------- defects

def _stamp_distance(points: np.ndarray, widths: np.ndarray, r: int) -> np.ndarray:
    """Min over points of |pixel - point| / width, evaluated only near each point."""
    nd = np.full(r * r, np.inf, np.float32)
    reach = int(np.ceil(widths.max())) + 1
    off = np.arange(-reach, reach + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    cy = np.rint(points[:, 0])[:, None] + oy[None, :]
    cx = np.rint(points[:, 1])[:, None] + ox[None, :]
    d = np.hypot(cy - points[:, 0:1], cx - points[:, 1:2]) / widths[:, None]
    ok = (cy >= 0) & (cy < r) & (cx >= 0) & (cx < r) & (d <= 1.0)
    np.minimum.at(nd, (cy[ok] * r + cx[ok]).astype(np.int64), d[ok].astype(np.float32))
    return nd.reshape(r, r)


def _wobble(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, strength: float) -> np.ndarray:
    """Radius factor of an irregular blob outline: 1 + three random low harmonics of the angle."""
    ang = np.arctan2(dy, dx)
    return 1 + sum(rng.uniform(0, strength) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))


def _blend(surface: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = alpha > 0
    a = alpha[:, :, None]
    out = np.where(mask[:, :, None], surface * (1 - a) + colour * a, surface)
    return out, mask


def _scratch(rng, surface, r, phi):
    length = rng.uniform(0.35, 0.85) * r
    p0 = rng.uniform(0.1, 0.9, 2) * r
    ang = rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.sin(ang), np.cos(ang)])
    normal = np.array([np.cos(ang), -np.sin(ang)])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, max(8, int(length / 0.3)))[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    width = max(0.75, r / 64.0) * rng.uniform(1.0, 1.5)
    nd = _stamp_distance(pts, np.full(len(pts), width), r)
    alpha = np.where(nd <= 1, np.clip(1.25 - 0.75 * nd, 0.3, 1.0), 0.0).astype(np.float32)
    bright = rng.random() < 0.5
    colour = np.float32(rng.uniform(0.88, 1.0) if bright else rng.uniform(0.05, 0.2))
    return _blend(surface, alpha, colour)


def _crack(rng, surface, r, phi):
    s = r / 32.0
    step = 0.4

    def walk(start, angle, n):
        turns = np.cumsum(rng.normal(0, 0.25 / np.sqrt(max(s, 1.0)), n)) + angle
        steps = np.stack([np.sin(turns), np.cos(turns)], 1) * step
        return start + np.cumsum(steps, 0)

    main = walk(rng.uniform(0.15, 0.85, 2) * r, rng.uniform(0, 2 * np.pi), int(rng.uniform(0.4, 0.85) * r / step))
    w_main = max(0.75, 0.6 * s) * rng.uniform(1.0, 1.3)
    pts, widths = [main], [np.linspace(w_main, 0.8 * w_main, len(main))]
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(main) // 5, len(main))
        d = main[min(i + 1, len(main) - 1)] - main[max(i - 1, 0)]
        base = float(np.arctan2(d[0], d[1]))
        branch = walk(main[i], base + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1),
                      max(4, int(len(main) * rng.uniform(0.2, 0.5))))
        pts.append(branch)
        widths.append(np.linspace(0.8 * w_main, max(0.72, 0.55 * w_main), len(branch)))
    nd = _stamp_distance(np.concatenate(pts), np.concatenate(widths), r)
    alpha = np.where(nd <= 1, np.clip(1.3 - 0.6 * nd, 0.5, 1.0), 0.0).astype(np.float32)
    return _blend(surface, alpha, np.float32(rng.uniform(0.02, 0.12)))


def _spot(rng, surface, r, phi):
    y, x = _grid(r)
    c = rng.uniform(0.2, 0.8, 2) * r
    r0 = max(2.2, rng.uniform(0.08, 0.2) * r)
    dy, dx = y - c[0], x - c[1]
    wobble = _wobble(rng, dy, dx, 0.15)
    aspect = rng.uniform(0.7, 1.0)
    nd = np.hypot(dy, dx * aspect) / (r0 * wobble)
    soft = 1 - np.clip((nd - 0.3) / 0.7, 0, 1) ** 2 * (3 - 2 * np.clip((nd - 0.3) / 0.7, 0, 1))
    amp = rng.uniform(0.55, 0.85)
    alpha = np.where(nd < 1, amp * (0.25 + 0.75 * soft), 0.0).astype(np.float32)
    if rng.random() < 0.7:   # dark stain (oil, rust, dirt)
        colour = _hsv_colour(rng, rng.uniform(0.02, 0.12), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3))
    else:                    # light residue
        colour = _hsv_colour(rng, rng.uniform(0.1, 0.2), rng.uniform(0.0, 0.2), rng.uniform(0.85, 1.0))
    return _blend(surface, alpha, colour)


def _pit(rng, surface, r, phi):
    y, x = _grid(r)
    c = rng.uniform(0.2, 0.8, 2) * r
    rad = max(1.9, rng.uniform(0.07, 0.15) * r)
    dy, dx = (y - c[0]) / rad, (x - c[1]) / rad
    d2 = dx ** 2 + dy ** 2
    inside = d2 < 1
    z = np.sqrt(np.clip(1 - d2, 0, 1))
    light = np.array([np.sin(phi) * 0.6, np.cos(phi) * 0.6, 0.8])
    # Normal of a bowl: tilted towards the centre; the side facing the light is dark, the other lit.
    shade = (-dy * light[0] - dx * light[1] + z * light[2]) / np.sqrt(d2 + z ** 2 + 1e-6)
    factor = (0.35 + 0.9 * np.clip(shade, 0, 1)) * (0.8 + 0.2 * z) - 0.15 * (d2 > 0.7)
    inner = np.clip(surface * factor[:, :, None] + 0.25 * np.clip(shade - 0.85, 0, 1)[:, :, None], 0, 1)
    return np.where(inside[:, :, None], inner, surface), inside


DEFECTS = {"scratch": _scratch, "spot": _spot, "stain": _spot, "crack": _crack, "pit": _pit, "dent": _pit}


# --------------------------------------------------------------------------- production preset
# Grey level in [0, 1], HxW. Sizes are in pixels at 64 px; `s = r / 64` scales them. Contrasts
# are small on purpose: a crack darkens its pixels by 12-28 %, a pit core by 20-38 %, a stain
# by 12-22 %, against surface texture of 1.5-3 % and sensor noise of 0.4-1 % of full scale.

def _brushed_steel(rng: np.random.Generator, r: int) -> np.ndarray:
    s = r / 64.0
    along = rng.uniform(0, np.pi)          # brushing direction
    streaks = _unit(_blur_fft(rng.standard_normal((r, r)), 0.5 * s, rng.uniform(8, 16) * s, angle=along))
    grain = _unit(_blur_fft(rng.standard_normal((r, r)), 0.7 * s, 0.7 * s))
    return rng.uniform(0.38, 0.62) + rng.uniform(0.015, 0.03) * streaks + 0.008 * grain


def _cast_matte(rng: np.random.Generator, r: int) -> np.ndarray:
    """Cast or blasted surface: isotropic grain at three scales."""
    s = r / 64.0

    def layer(sigma: float) -> np.ndarray:
        return _unit(_blur_fft(rng.standard_normal((r, r)), sigma * s, sigma * s))

    return rng.uniform(0.35, 0.6) + 0.012 * layer(8.0) + 0.012 * layer(1.5) + rng.uniform(0.008, 0.016) * layer(0.5)


def _machined(rng: np.random.Generator, r: int) -> np.ndarray:
    """Turned or milled surface: faint parallel tool marks, 3-6 px apart, slightly wavy."""
    s = r / 64.0
    y, x = _grid(r)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 6.0) * s
    wobble = 1.5 * _unit(_blur_fft(rng.standard_normal((r, r)), 6 * s, 6 * s))
    marks = np.sin((x * np.cos(theta) + y * np.sin(theta)) * (2 * np.pi / period) + wobble + rng.uniform(0, 2 * np.pi))
    grain = _unit(_blur_fft(rng.standard_normal((r, r)), 0.6 * s, 0.6 * s))
    return rng.uniform(0.4, 0.62) + rng.uniform(0.01, 0.02) * marks + 0.008 * grain


PRODUCTION_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "brushed_steel": _brushed_steel,
    "cast_matte": _cast_matte,
    "machined": _machined,
}


def _mild_lighting(rng: np.random.Generator, r: int) -> tuple[np.ndarray, float]:
    """Production: gain +-10 %, gradient 3-12 % across the image, vignette at most 6 % in the corners."""
    return _light_field(rng, r, gain=(0.9, 1.1), gradient=(0.03, 0.12), vignette=(0.0, 0.12))


def _sensor_noise(rng: np.random.Generator, r: int) -> np.ndarray:
    """Per-pixel camera noise, the same draw on the clean and the defective image."""
    return rng.normal(0.0, rng.uniform(0.004, 0.01), (r, r)).astype(np.float32)


def _thin_crack(rng, surface, r, phi):
    """A dark random-walk line 1-2 px wide (any resolution), sometimes with one short branch."""
    step = 0.5

    def walk(start, angle, n):
        turns = angle + np.cumsum(rng.normal(0, 0.08, n))
        kinks = rng.random(n) < 0.03                        # cracks change direction abruptly now and then
        turns = turns + np.cumsum(np.where(kinks, rng.normal(0, 0.6, n), 0.0))
        return start + np.cumsum(np.stack([np.sin(turns), np.cos(turns)], 1) * step, 0)

    main = walk(rng.uniform(0.15, 0.85, 2) * r, rng.uniform(0, 2 * np.pi), int(rng.uniform(0.25, 0.7) * r / step))
    # Half-width in px: >= 0.6 keeps the line connected at every angle, <= 0.95 keeps it <= 2 px wide.
    half = rng.uniform(0.6, 0.95)
    pts, widths = [main], [np.linspace(half, max(0.6, 0.8 * half), len(main))]
    if rng.random() < 0.35:
        i = int(rng.integers(len(main) // 4, len(main)))
        d = main[min(i + 1, len(main) - 1)] - main[max(i - 1, 0)]
        base = float(np.arctan2(d[0], d[1]))
        branch = walk(main[i], base + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0),
                      max(6, int(len(main) * rng.uniform(0.2, 0.4))))
        pts.append(branch)
        widths.append(np.full(len(branch), 0.6))
    nd = _stamp_distance(np.concatenate(pts), np.concatenate(widths), r)
    support = nd <= 1
    depth = rng.uniform(0.12, 0.28)
    darken = depth * (1 - 0.4 * np.where(support, nd, 1.0))     # darkest on the centre line
    return np.where(support, surface * (1 - darken), surface), support


def _small_pit(rng, surface, r, phi):
    """A dark dot 2-5 px across with a 1 px lighter rim (the raised lip catches light)."""
    s = r / 64.0
    y, x = _grid(r)
    c = rng.uniform(0.1, 0.9, 2) * r
    core_radius = max(1.0, rng.uniform(1.0, 2.5) * s)
    rim_width = max(1.0, s)
    dist = np.hypot(y - c[0], x - c[1])
    core = dist < core_radius
    rim = ~core & (dist < core_radius + rim_width)
    depth = rng.uniform(0.2, 0.38)
    lift = rng.uniform(0.03, 0.07)
    factor = np.where(core, 1 - depth * (1 - 0.5 * (dist / core_radius) ** 2),
                      1 + lift * (1 - (dist - core_radius) / rim_width))
    support = core | rim
    return np.where(support, surface * factor, surface), support


def _soft_stain(rng, surface, r, phi):
    """A soft irregular blotch 6-14 px across, mostly darker (oil, dirt), sometimes lighter (residue)."""
    s = r / 64.0
    y, x = _grid(r)
    c = rng.uniform(0.2, 0.8, 2) * r
    radius = max(2.0, rng.uniform(3.0, 7.0) * s)
    dy, dx = y - c[0], x - c[1]
    wobble = _wobble(rng, dy, dx, 0.2)
    rot, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    u = dy * np.cos(rot) + dx * np.sin(rot)
    v = dx * np.cos(rot) - dy * np.sin(rot)
    nd = np.hypot(u, v / aspect) / (radius * wobble)
    t = np.clip((nd - 0.4) / 0.6, 0, 1)
    soft = 1 - t * t * (3 - 2 * t)                               # 1 in the middle, 0 at the edge
    mottle = np.clip(1 + 0.25 * _unit(_blur_fft(rng.standard_normal((r, r)), 1.2 * s, 1.2 * s)), 0.5, 1.5)
    amp = rng.uniform(0.12, 0.22) * (1.0 if rng.random() < 0.75 else -0.7)
    support = nd < 1
    alpha = amp * (0.2 + 0.8 * soft) * mottle
    return np.where(support, surface * (1 - alpha), surface), support


PRODUCTION_DEFECTS = {"crack": _thin_crack, "pit": _small_pit, "stain": _soft_stain}


# --------------------------------------------------------------------------- presets

def _no_sensor_noise(rng: np.random.Generator, r: int) -> np.float32:
    return np.float32(0.0)            # draws nothing: classic images stay byte-identical


def _classic_min_pixels(r: int) -> int:
    return max(3, r * r // 400)


def _production_min_pixels(r: int) -> int:
    return 3                          # a 2 px pit is a real defect


@dataclass(frozen=True)
class Preset:
    textures: dict[str, Callable]
    defects: dict[str, Callable]
    lighting: Callable                # (rng, r) -> (multiplicative light field, light azimuth)
    sensor_noise: Callable            # (rng, r) -> additive noise shared by clean and defective image
    min_pixels: Callable[[int], int]  # fewer changed pixels: the defect was clipped by the border; redraw


PRESETS: dict[str, Preset] = {
    "classic": Preset(TEXTURES, DEFECTS, _lighting, _no_sensor_noise, _classic_min_pixels),
    "production": Preset(PRODUCTION_TEXTURES, PRODUCTION_DEFECTS, _mild_lighting, _sensor_noise,
                         _production_min_pixels),
}


# --------------------------------------------------------------------------- images

def _quantise(img: np.ndarray, channels: int) -> np.ndarray:
    """Float image in [0, 1] -> uint8 HxWxC. HxW (grey) input is repeated to `channels`;
    HxWx3 input is converted to luma when `channels` is 1."""
    img = np.clip(img, 0.0, 1.0)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], channels, axis=2)
    elif channels == 1:
        img = img @ np.array([0.299, 0.587, 0.114], np.float32)
        img = img[:, :, None]
    return np.rint(img * 255.0).astype(np.uint8)


def _render(preset: Preset, seed: int, kind: int, class_idx: int, index: int, texture: str,
            defect: str | None, resolution: int, channels: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(clean uint8, mask 0/1, defective uint8 or None)."""
    rng = np.random.default_rng([seed, kind, class_idx, index])
    surface = np.clip(preset.textures[texture](rng, resolution), 0, 1).astype(np.float32)
    light, phi = preset.lighting(rng, resolution)
    noise = preset.sensor_noise(rng, resolution)
    clean = _quantise(surface * light + noise, channels)
    if defect is None:
        return clean, np.zeros((resolution, resolution), np.uint8), None
    min_pixels = preset.min_pixels(resolution)
    for _ in range(50):   # rare: a defect clipped almost entirely by the border; draw again
        out, mask = preset.defects[defect](rng, surface, resolution, phi)
        # Outside the support `out` equals the surface, but a defect computed in float64 can
        # round differently from the float32 clean image there; take the clean pixels as they are.
        bad = np.where(mask[:, :, None], _quantise(out * light + noise, channels), clean)
        changed = (bad != clean).any(axis=2)
        if int(changed.sum()) >= min_pixels:
            # Exactness: pixels whose quantised value did not change are not part of the defect.
            return clean, (mask & changed).astype(np.uint8), bad
    raise RuntimeError(f"could not draw a visible {defect} at {resolution} px")  # pragma: no cover


class SyntheticSpec(NamedTuple):
    kind: str                 # "normal" | "defect" | "pair"
    label: str
    index: int
    texture: str
    seed: int
    kind_code: int
    class_idx: int
    defect: str | None
    preset: str = "classic"


def specs(params, seed: int) -> list[SyntheticSpec]:
    """What to render, in a fixed order: normals, defects per class, then pairs.

    `params` is `prepare.synthetic`; its `layout()` gives the selected preset's class counts,
    textures and set sizes.
    """
    layout = params.layout()
    classes = list(layout.class_counts)
    textures = list(layout.textures)
    t_count = len(textures)
    spec = lambda *a: SyntheticSpec(*a, preset=params.preset)  # noqa: E731
    out: list[SyntheticSpec] = []
    for i in range(layout.normal):
        out.append(spec("normal", "normal", i, textures[i % t_count], seed, _KIND_NORMAL, 0, None))
    for k, cls in enumerate(classes, start=1):
        for i in range(layout.class_counts[cls]):
            out.append(spec("defect", cls, i, textures[(i + k) % t_count], seed, _KIND_DEFECT, k, cls))
    for i in range(layout.paired):
        k = i % len(classes)
        cls = classes[k]
        out.append(spec("pair", cls, i, textures[(i // len(classes)) % t_count], seed, _KIND_PAIR, k + 1, cls))
    return out


def render_spec(spec: SyntheticSpec, resolution: int, channels: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(clean HxWxC uint8, mask HxW 0/1, defective HxWxC uint8 or None for normals)."""
    return _render(PRESETS[spec.preset], spec.seed, spec.kind_code, spec.class_idx, spec.index, spec.texture,
                   spec.defect, resolution, channels)


def iter_synthetic(params, resolution: int, channels: int, seed: int) -> Iterator[SyntheticImage]:
    """Render every spec (convenience for notebooks and the bench)."""
    for spec in specs(params, seed):
        kind, label, index, texture = spec[:4]
        clean, mask, bad = render_spec(spec, resolution, channels)
        if kind == "normal":
            yield SyntheticImage(kind, label, index, texture, clean, mask)
        elif kind == "defect":
            yield SyntheticImage(kind, label, index, texture, bad, mask)
        else:
            yield SyntheticImage(kind, label, index, texture, bad, mask, clean=clean)


def count(params) -> int:
    layout = params.layout()
    return layout.normal + sum(layout.class_counts.values()) + layout.paired
