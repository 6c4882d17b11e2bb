"""Writes a synthetic dataset folder, streaming (memory does not grow with the sample count).

Layout of <out_dir> (data/synthetic/<model>/ by default):
    samples.parquet             one row per kept sample: id, label, label_idx, image_png,
                                mask_png (0/255), region_png (0/255, null when no region),
                                model, seed, normal_id, mask_fraction
    images/<class>/<id>.png     ImageFolder tree a classifier reads directly; the pixel mask
    images/<class>/<id>_mask.png    of each image sits beside it
    manifest.json               model, checkpoint sha256, seed, params, counts, dropped, classes
    preview.png                 titled; rows "input (normal)" | "output (generated)" | "generated mask"
                                (| "requested mask"), a column per sample labelled with its class,
                                up to 8 columns spread over the classes

The writer only ever writes inside the folder it is given; `ray_generate` gives it the
temporary folder of `fsutil.atomic_dir`, so a failed run leaves no half-written output.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.generation.sampler import decode_png
from pipeline.training.grid import save_grid

SAMPLES_FILE = "samples.parquet"
MANIFEST_FILE = "manifest.json"
PREVIEW_FILE = "preview.png"
IMAGES_DIR = "images"
MASK_SUFFIX = "_mask"
MANIFEST_KIND = "synthetic-defect-dataset"   # marks a folder this stage may replace

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("label", pa.string()),
    ("label_idx", pa.int64()),
    ("image_png", pa.binary()),
    ("mask_png", pa.binary()),
    ("region_png", pa.binary()),
    ("model", pa.string()),
    ("seed", pa.int64()),
    ("normal_id", pa.string()),
    ("mask_fraction", pa.float64()),
])
PREVIEW_COLUMNS = 8


def sample_id(label: str, index: int) -> str:
    return f"{label}_{index:07d}"


def is_generation_output(folder: Path) -> bool:
    """True when `folder` holds a manifest written by this stage (safe to replace)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == MANIFEST_KIND


class SyntheticWriter:
    """Append kept samples with `add`, then `close(manifest)` once."""

    def __init__(self, root: Path, labels: list[str], channels: int, row_group: int = 512):
        self.root = Path(root)
        self.channels = channels
        self.row_group = row_group
        for label in labels:
            (self.root / IMAGES_DIR / label).mkdir(parents=True, exist_ok=True)
        self._parquet = pq.ParquetWriter(self.root / SAMPLES_FILE, SCHEMA)
        self._pending: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.counts: Counter[str] = Counter()
        per_class = max(1, PREVIEW_COLUMNS // max(1, len(labels)))
        self._preview_quota = {label: per_class for label in labels}
        self._preview: list[dict] = []

    def add(self, rows: dict[str, list], normal_png: Callable[[int], bytes]) -> None:
        """`rows`: columns named as SCHEMA, equal lengths; `normal_png(i)`: row i's input image
        as PNG (read only for the few preview samples)."""
        n = len(rows["id"])
        for i in range(n):
            label, sid = rows["label"][i], rows["id"][i]
            folder = self.root / IMAGES_DIR / label
            (folder / f"{sid}.png").write_bytes(rows["image_png"][i])
            (folder / f"{sid}{MASK_SUFFIX}.png").write_bytes(rows["mask_png"][i])
            self.counts[label] += 1
            if self._preview_quota.get(label, 0) > 0:
                self._preview_quota[label] -= 1
                self._preview.append({"label": label, "normal": normal_png(i), "image": rows["image_png"][i],
                                      "mask": rows["mask_png"][i], "region": rows["region_png"][i]})
        for name in SCHEMA.names:
            self._pending[name].extend(rows[name])
        if len(self._pending["id"]) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self._pending["id"]:
            self._parquet.write_table(pa.table(self._pending, schema=SCHEMA))
            self._pending = {name: [] for name in SCHEMA.names}

    def close(self, manifest: dict) -> None:
        self._flush()
        self._parquet.close()
        if self._preview:
            save_grid(self._preview_rows(), self.root / PREVIEW_FILE, max_cols=PREVIEW_COLUMNS,
                      **self.preview_text(manifest))
        manifest = {"kind": MANIFEST_KIND, **manifest}
        (self.root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def preview_text(self, manifest: dict) -> dict:
        """Title, column labels (each sample's class) and row labels of preview.png."""
        model = manifest.get("model", "?")
        return {"title": f"Synthetic {model} set: generated defects on normal images (a column per sample)",
                "columns": [p["label"] for p in self._preview],
                "row_labels": {"normal": "input (normal)", "generated": "output (generated)",
                               "mask": "generated mask", "mask_region": "requested mask"}}

    def _preview_rows(self) -> dict[str, torch.Tensor]:
        def stack(key: str, channels: int, unit: bool) -> torch.Tensor:
            arr = np.stack([decode_png(p[key], channels) for p in self._preview]).astype(np.float32) / 255.0
            t = torch.from_numpy(arr)
            return t if unit else t * 2 - 1

        rows = {"normal": stack("normal", self.channels, False),
                "generated": stack("image", self.channels, False),
                "mask": stack("mask", 1, True)}
        if all(p["region"] is not None for p in self._preview):
            rows["mask_region"] = stack("region", 1, True)   # 'mask*' rows are drawn as [0, 1]
        return rows
