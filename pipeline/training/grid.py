"""Image grids as PNG (no torchvision): rows of (B, C, H, W) tensors in [-1, 1] or [0, 1], with a
title, a label per row (what it shows: input, output, requested or generated mask) and per column
(the sample's class), so a grid explains itself without the code that drew it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.fsutil import atomic_file

# Row names the families' `sample()` and the generate preview use -> what a reader should see.
ROW_LABELS = {
    "normal": "input (normal)", "input": "input", "real": "input (real)", "real_defect": "input (real defect)",
    "target": "target (real)", "generated": "output (generated)", "fake": "output (generated)",
    "defaced": "output (defect added)", "translated": "output (translated)", "reconstructed": "reconstruction",
    "restored": "output (defect removed)", "placed_center": "output (defect placed)",
    "real_restored": "output (real defect removed)", "mask": "generated mask",
    "placed_mask": "generated mask (placed)", "real_restored_mask": "generated mask (real defect)",
    "mask_region": "requested mask", "region": "requested mask",
}


@dataclass
class GridLabels:
    """The text drawn on a grid (returned so tests and callers can read what a picture says)."""

    title: str = ""
    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return [t for t in (self.title, *self.rows, *self.columns) if t]


def row_label(name: str) -> str:
    return ROW_LABELS.get(name, name.replace("_", " "))


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


def sample_grid_text(family: str, nimg: int, batch: dict, classes: list[str]) -> tuple[str, list[str]]:
    """Title and column labels of a training sample grid: the family, the progress, and each
    column's class (the batch's defect label: `label_b` for unpaired defect batches, else `label`)."""
    title = f"{family}: EMA generator samples at {nimg / 1000:.2f} kimg (rows: what is shown; columns: class)"
    labels = batch.get("label_b", batch.get("label")) if isinstance(batch, dict) else None
    if labels is None:
        return title, []
    names = [classes[int(i)] if 0 <= int(i) < len(classes) else str(int(i)) for i in labels.flatten().tolist()]
    return title, names


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)     # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):                      # pragma: no cover - old Pillow / no FreeType
        return ImageFont.load_default()


def labelled_grid(rows: dict[str, torch.Tensor], max_cols: int = 8, title: str = "",
                  columns: Optional[list[str]] = None,
                  row_labels: Optional[dict[str, str]] = None) -> tuple[Image.Image, GridLabels]:
    """`grid_image` with `title` on top, a label per row on the left (ROW_LABELS, `row_labels`
    overriding) and `columns` (e.g. each sample's class) above the columns. Returns the image and
    the text drawn on it."""
    body = grid_image(rows, max_cols)
    n_cols = max(min(int(t.shape[0]), max_cols) for t in rows.values())
    labels = GridLabels(title=title, rows=[(row_labels or {}).get(k) or row_label(k) for k in rows],
                        columns=[str(c) for c in (columns or [])[:n_cols]])
    font, title_font = _font(12), _font(14)
    measure = ImageDraw.Draw(body)
    left = 8 + max(measure.textlength(t, font=font) for t in labels.rows)
    top = (24 if title else 4) + (18 if labels.columns else 0)
    width = max(int(left) + body.width + 4, int(measure.textlength(title, font=title_font)) + 16)
    canvas = Image.new("RGB", (width, top + body.height + 4), "white")
    canvas.paste(body, (int(left), top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill="black", font=title_font)
    cell_h, cell_w = body.height / len(labels.rows), body.width / n_cols
    for r, text in enumerate(labels.rows):
        draw.text((left - 6, top + (r + 0.5) * cell_h), text, fill="black", font=font, anchor="rm")
    for c, text in enumerate(labels.columns):
        draw.text((left + (c + 0.5) * cell_w, top - 3), text, fill="black", font=font, anchor="md")
    return canvas, labels


def save_grid(rows: dict[str, torch.Tensor], path: Path, max_cols: int = 8, title: str = "",
              columns: Optional[list[str]] = None, row_labels: Optional[dict[str, str]] = None) -> Path:
    """Write the labelled grid (`labelled_grid`) as PNG at `path`."""
    image, _ = labelled_grid(rows, max_cols, title, columns, row_labels)
    with atomic_file(path, "wb") as fh:
        image.save(fh, format="PNG")
    return Path(path)
