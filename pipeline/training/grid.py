"""Image grids as PNG (no torchvision): rows of (B, C, H, W) tensors in [-1, 1] or [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.fsutil import atomic_file


def to_uint8_hwc(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(B, C, H, W) float -> (B, H, W, 3) uint8; 1-channel images become gray RGB."""
    lo, hi = value_range
    x = images.detach().float().cpu().clamp(lo, hi).sub(lo).div(hi - lo).mul(255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).numpy()


def grid_image(rows: dict[str, torch.Tensor], max_cols: int = 8, pad: int = 2) -> Image.Image:
    """One row per entry. Entries named like 'mask*' are taken as [0, 1], the rest as [-1, 1]."""
    arrays = []
    for name, tensor in rows.items():
        rng = (0.0, 1.0) if name.startswith("mask") else (-1.0, 1.0)
        arrays.append(to_uint8_hwc(tensor[:max_cols], rng))
    cols = max(a.shape[0] for a in arrays)
    h = max(a.shape[1] for a in arrays)
    w = max(a.shape[2] for a in arrays)
    canvas = np.full((len(arrays) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r, arr in enumerate(arrays):
        for c in range(arr.shape[0]):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + arr.shape[1], x:x + arr.shape[2]] = arr[c]
    img = Image.fromarray(canvas)
    if h < 96:  # tiny training resolutions: enlarge so people can see them
        scale = max(1, 96 // h)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(rows: dict[str, torch.Tensor], path: Path, max_cols: int = 8) -> Path:
    with atomic_file(path, "wb") as fh:
        grid_image(rows, max_cols).save(fh, format="PNG")
    return Path(path)
