"""preview.png: a grid with one row per class (mask overlaid in red) and a row of pairs; in patch
mode one row per class of patches spread over many source images (mask outlined), normal patches
from normal and from defect images apart, and a row of source images with their patches outlined."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.images import decode_png

RED = np.array([255, 0, 0], np.float32)
YELLOW, GREEN = (255, 220, 0), (0, 220, 0)     # outlines of defect / normal patches on a source image


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
    _draw(rows, tile or max(64, res), path)


def _draw(rows: list[tuple[str, list[np.ndarray]]], size: int, path: Path, label_w: int = 120) -> None:
    """One row of tiles (each resized to size x size, nearest) per (title, tiles), title at the left."""
    pad = 2
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


def _spread(rows: Sequence[dict], n: int) -> list[dict]:
    """n rows evenly spaced through `rows` (rows are sorted by id, so by source image)."""
    if len(rows) <= n:
        return list(rows)
    return [rows[int(i * len(rows) / n)] for i in range(n)]


def outlined(image: np.ndarray, mask01: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """RGB uint8 image with the pixels just outside the mask blended towards red: every defect
    pixel stays visible (a 1 px scratch too), its outline shows where the mask is."""
    m = np.asarray(mask01) > 0
    grown = np.pad(m, 1)
    ring = np.zeros_like(m)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            ring |= grown[dy:dy + m.shape[0], dx:dx + m.shape[1]]
    return overlay(image, ring & ~m, alpha)


def source_tile(image: np.ndarray, mask: np.ndarray, windows, size: int, tile: int) -> np.ndarray:
    """A source image (mask in red) fitted into tile x tile, with its kept patches outlined:
    defect patches yellow, normal patches green. In the padded frame when the image is smaller
    than a patch."""
    from pipeline.data.patches import pad_offsets, padded

    top, left = pad_offsets(*mask.shape, size)
    shown = overlay(padded(image, size), padded(mask, size) > 0, alpha=0.35)
    factor = tile / max(shown.shape[:2])
    width, height = max(1, round(shown.shape[1] * factor)), max(1, round(shown.shape[0] * factor))
    canvas = Image.new("RGB", (tile, tile), (24, 24, 24))
    ox, oy = (tile - width) // 2, (tile - height) // 2
    canvas.paste(Image.fromarray(shown).resize((width, height), Image.BICUBIC), (ox, oy))
    draw = ImageDraw.Draw(canvas)
    for w in windows:
        x0, y0 = ox + (w.x + left) * factor, oy + (w.y + top) * factor
        x1, y1 = x0 + size * factor - 1, y0 + size * factor - 1
        draw.rectangle((x0, y0, x1, y1), outline=GREEN if w.label == "normal" else YELLOW, width=2)
    return np.asarray(canvas)


def patch_tile(size: int) -> int:
    """Tile side of a patch preview: small patches shown enlarged, so a 1 px scratch is seen."""
    return 128 if size <= 64 else size


def make_patch_preview(rows: Sequence[dict], classes: Sequence[str], sources: Sequence[tuple], size: int,
                       path: Path, per_class: int = 8) -> None:
    """preview.png of a patch dataset (`rows` as written, with their private `_source_label`):
    per class, patches spread over the source images with the mask outlined in red (the defect
    pixels themselves stay visible), normal patches from normal and from defect images apart,
    and `sources`, tiles of a few source images with their patches (`source_tile`)."""
    grid: list[tuple[str, list[np.ndarray]]] = []

    def tiles(picked):
        return [outlined(decode_png(r["image_png"]), decode_png(r["mask_png"]) > 127) for r in picked]

    for idx, name in enumerate(classes):
        mine = [r for r in rows if r["label_idx"] == idx]
        if name == "normal":
            for origin, test in (("normal images", lambda r: r["_source_label"] == "normal"),
                                 ("defect images", lambda r: r["_source_label"] != "normal")):
                part = [r for r in mine if test(r)]
                if part:
                    grid.append((f"normal from\n{origin} ({len(part)})", tiles(_spread(part, per_class))))
            if not mine:
                grid.append(("normal (0)", []))
            continue
        grid.append((f"{name} ({len(mine)})", tiles(_spread(mine, per_class))))
    if sources:
        grid.append(("source images:\ndefect patches\nyellow, normal\ngreen", list(sources)))
    _draw(grid, patch_tile(size), path, label_w=150)
