"""Helpers shared by the tests/test_data_*.py files (no tests here).

Tiny images only (16-32 px, tens of images): the machine is shared.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.config import PrepareParams, from_dict


def prepare_params(**overrides) -> PrepareParams:
    """PrepareParams validated like params.yaml; nested dicts for sub-sections."""
    base = {"resolution": 16, "channels": 3,
            "synthetic": {"per_class": 6, "normal": 12, "paired": 8}}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return from_dict(PrepareParams, base, "prepare")


def write_params(path: Path, prepare: dict) -> Path:
    path.write_text(yaml.safe_dump({"prepare": prepare}))
    return path


def save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, **kw)
    return path


def rand_image(rng: np.random.Generator, size=(20, 20), channels=3) -> np.ndarray:
    shape = (size[1], size[0], channels) if channels == 3 else (size[1], size[0])
    return rng.integers(0, 256, shape, dtype=np.uint8)


def square_mask(size=(20, 20), box=(5, 5, 12, 12)) -> np.ndarray:
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


def read_rows(out: Path, name: str = "images.parquet") -> list[dict]:
    return pq.read_table(out / name).to_pylist()


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img).copy()


def png_mode(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as img:
        return img.mode


def make_folder_dataset(root: Path, n_normal=4, n_scratch=4, n_spot=4, size=(20, 20), seed=0) -> Path:
    """root/normal/*.png, root/scratch/*.png (+ *_mask.png), root/spot/*.jpg (no masks)."""
    rng = np.random.default_rng(seed)
    for i in range(n_normal):
        save(root / "normal" / f"n{i}.png", rand_image(rng, size))
    for i in range(n_scratch):
        save(root / "scratch" / f"s{i}.png", rand_image(rng, size))
        save(root / "scratch" / f"s{i}_mask.png", square_mask(size))
    for i in range(n_spot):
        save(root / "spot" / f"p{i}.jpg", rand_image(rng, size))
    return root
