"""preview.png: a grid with one row per class (mask overlaid in red) and a row of pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.images import decode_png

RED = np.array([255, 0, 0], np.float32)


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def overlay(image: np.ndarray, mask01: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 image with mask pixels blended towards red."""
    out = _rgb(image).astype(np.float32)
    m = np.asarray(mask01) > 0
    out[m] = (1 - alpha) * out[m] + alpha * RED
    return np.rint(out).astype(np.uint8)


def _tile(a: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(_rgb(a))
    return np.asarray(img.resize((size, size), Image.NEAREST))


def make_preview(images: Sequence[dict], pairs: Sequence[dict], classes: Sequence[str], path: Path,
                 per_class: int = 8, tile: int | None = None) -> None:
    """Write the grid. `images`/`pairs` are rows as written to the Parquet tables."""
    res = None
    rows: list[tuple[str, list[np.ndarray]]] = []
    for idx, name in enumerate(classes):
        picked = [r for r in images if r["label_idx"] == idx][:per_class]
        tiles = []
        for r in picked:
            img = decode_png(r["image_png"])
            mask = decode_png(r["mask_png"]) if r.get("mask_png") else np.zeros(img.shape[:2], np.uint8)
            res = res or img.shape[0]
            tiles.append(overlay(img, mask > 127))
        rows.append((f"{name} ({sum(1 for r in images if r['label_idx'] == idx)})", tiles))
    if pairs:
        tiles = []
        for r in pairs[: max(1, per_class // 2)]:
            a, b = decode_png(r["a_png"]), decode_png(r["b_png"])
            mask = decode_png(r["mask_png"]) if r.get("mask_png") else np.zeros(a.shape[:2], np.uint8)
            res = res or a.shape[0]
            tiles += [_rgb(a), overlay(b, mask > 127)]
        rows.append((f"pairs A|B ({len(pairs)})", tiles))
    res = res or 32
    size = tile or max(64, res)
    label_w, pad = 120, 2
    cols = max([len(t) for _, t in rows] + [1])
    canvas = Image.new("RGB", (label_w + cols * (size + pad), max(1, len(rows)) * (size + pad)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for y, (name, tiles) in enumerate(rows):
        top = y * (size + pad)
        draw.text((4, top + size // 2 - 6), name, fill=(230, 230, 230), font=font)
        for x, t in enumerate(tiles):
            canvas.paste(Image.fromarray(_tile(t, size)), (label_w + x * (size + pad), top))
    canvas.save(path, format="PNG", compress_level=3)
