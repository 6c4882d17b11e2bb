"""Torch views of a prepared dataset (images.parquet, paired.parquet, classes.json).

    read_classes(dir) -> {"classes": [...], "resolution": R, "channels": C, "schema_version": 1 or 2 (patches)}
    decode_images(dir, split="train", shard=(rank, world)) -> {"image": uint8 (N,C,H,W),
                                                              "mask": uint8 (N,1,H,W) 0/1, "label": int64 (N,)}
    decode_pairs(dir, split="train", shard=(0, 1)) -> {"a", "b": uint8 (N,C,H,W), "mask", "label"}
    unpaired_normal_mask(dir, split="train", shard=(0, 1)) -> bool (N,) rows of decode_images in the normal pool
    build_augment(AugmentParams, seed=None) -> albumentations.Compose
    decode_images(dir, split) -> {"image" (N,C,H,W) uint8, "mask" (N,1,H,W) uint8, "label" (N,), "has_mask" (N,) bool}
    LabelledDataset(dir, split, augment=None)[i] -> (image float (C,H,W) in [-1, 1], mask float (1,H,W) {0,1}, label int)
    PairedDataset(dir, split, augment=None)[i] -> {"a", "b", "mask", "label"}
    UnpairedDataset(dir, split, augment=None, seed=0)[i] -> {"a": normal image, "b": defect image, "label_b", "mask_b"}

`augment` is an albumentations Compose (or AugmentParams, built with build_augment).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import manifest as mf
from pipeline.data.images import decode_png
from pipeline.data.transforms import build_augment
from pipeline.errors import DataError

__all__ = ["read_classes", "decode_images", "decode_pairs", "unpaired_normal_mask", "build_augment", "LabelledDataset",
           "PairedDataset", "UnpairedDataset"]

read_classes = mf.read_classes


def _shard(n: int, shard: tuple[int, int]) -> np.ndarray:
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"bad shard {shard!r}: expected (rank, world) with 0 <= rank < world.")
    return np.arange(rank, n, world)


def _stack_images(pngs: list[bytes], channels: int, res: int) -> torch.Tensor:
    out = np.empty((len(pngs), channels, res, res), np.uint8)
    for i, data in enumerate(pngs):
        a = decode_png(data)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _stack_masks(pngs: list[Optional[bytes]], res: int) -> torch.Tensor:
    out = np.zeros((len(pngs), 1, res, res), np.uint8)
    for i, data in enumerate(pngs):
        if data:
            out[i, 0] = decode_png(data) > 127
    return torch.from_numpy(out)


def _read(prepared_dir, name: str, split: Optional[str], columns: list[str],
          shard: tuple[int, int]) -> tuple[dict[str, list], dict]:
    info = read_classes(prepared_dir)
    table = mf.read_table(prepared_dir, name, split=split, columns=columns)
    idx = _shard(table.num_rows, shard)
    table = table.take(idx) if len(idx) != table.num_rows else table
    return table.to_pydict(), info


def decode_images(prepared_dir, split: Optional[str] = "train", shard: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """All rows of images.parquet in `split` (None: all splits), rows rank::world of the file order."""
    cols, info = _read(prepared_dir, mf.IMAGES_FILE, split, ["image_png", "mask_png", "label_idx", "has_mask"], shard)
    res, ch = int(info["resolution"]), int(info["channels"])
    return {"image": _stack_images(cols["image_png"], ch, res),
            "mask": _stack_masks(cols["mask_png"], res),
            "label": torch.tensor(cols["label_idx"], dtype=torch.int64).reshape(-1),
            "has_mask": torch.tensor(cols["has_mask"], dtype=torch.bool).reshape(-1)}


def unpaired_normal_mask(prepared_dir, split: Optional[str] = "train", shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """bool (N,), aligned with `decode_images(prepared_dir, split, shard)`: the rows of the unpaired
    normal pool (normal images whose source has no defect image). Defect pool = label > 0."""
    cols, _ = _read(prepared_dir, mf.IMAGES_FILE, split, ["label_idx", "unpaired_pool"], shard)
    return torch.tensor([lab == 0 and pool for lab, pool in zip(cols["label_idx"], cols["unpaired_pool"])],
                        dtype=torch.bool)


def decode_pairs(prepared_dir, split: Optional[str] = "train", shard: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """All rows of paired.parquet in `split`: {"a", "b", "mask", "label"} (may have N = 0)."""
    cols, info = _read(prepared_dir, mf.PAIRED_FILE, split, ["a_png", "b_png", "mask_png", "label_idx"], shard)
    res, ch = int(info["resolution"]), int(info["channels"])
    return {"a": _stack_images(cols["a_png"], ch, res),
            "b": _stack_images(cols["b_png"], ch, res),
            "mask": _stack_masks(cols["mask_png"], res),
            "label": torch.tensor(cols["label_idx"], dtype=torch.int64).reshape(-1)}


# --------------------------------------------------------------------------- datasets

def _as_augment(augment: Any, seed: Optional[int] = None):
    if augment is None or callable(augment):
        return augment
    return build_augment(augment, seed=seed)   # AugmentParams


def _to_float(img_chw_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img_chw_uint8)).float().div_(127.5).sub_(1.0)


def _apply(augment, image: np.ndarray, mask: np.ndarray, image_b: Optional[np.ndarray] = None):
    """image (C,H,W) uint8, mask (1,H,W) uint8 -> augmented (same layout)."""
    if augment is None:
        return image, mask, image_b
    kwargs = {"image": image.transpose(1, 2, 0), "mask": mask[0]}
    if image_b is not None:
        kwargs["image_b"] = image_b.transpose(1, 2, 0)
    out = augment(**kwargs)

    def chw(a):
        a = np.asarray(a)
        return (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)

    return chw(out["image"]), np.asarray(out["mask"])[None], (chw(out["image_b"]) if image_b is not None else None)


class LabelledDataset(Dataset):
    """(image float (C,H,W) in [-1, 1], mask float (1,H,W) in {0, 1}, label int)."""

    def __init__(self, prepared_dir, split: Optional[str] = "train", augment=None):
        data = decode_images(prepared_dir, split)
        self.classes = read_classes(prepared_dir)["classes"]
        self.images = data["image"].numpy()
        self.masks = data["mask"].numpy()
        self.labels = data["label"].numpy()
        self.augment = _as_augment(augment)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image, mask, _ = _apply(self.augment, self.images[i], self.masks[i])
        return _to_float(image), torch.from_numpy(np.ascontiguousarray(mask)).float(), int(self.labels[i])


class PairedDataset(Dataset):
    """{"a": clean, "b": defective (same surface), "mask", "label"}; A, B and mask get the same flips."""

    def __init__(self, prepared_dir, split: Optional[str] = "train", augment=None):
        data = decode_pairs(prepared_dir, split)
        if len(data["label"]) == 0:
            raise DataError(f"{prepared_dir} has no pairs in split {split!r} (paired.parquet is empty): "
                            "use a paired source (prepare.source: synthetic with synthetic.paired > 0, or paired).")
        self.classes = read_classes(prepared_dir)["classes"]
        self.a, self.b = data["a"].numpy(), data["b"].numpy()
        self.masks, self.labels = data["mask"].numpy(), data["label"].numpy()
        self.augment = _as_augment(augment)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        a, mask, b = _apply(self.augment, self.a[i], self.masks[i], self.b[i])
        return {"a": _to_float(a), "b": _to_float(b),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)).float(), "label": int(self.labels[i])}


class UnpairedDataset(Dataset):
    """{"a": normal image, "b": defect image, "label_b": int, "mask_b"}, the pools sampled independently.

    The normal pool is the normal images whose source has no defect image (`unpaired_pool`), so
    A and B never show the same part. Length is the larger pool; each pool is walked in its own
    seeded permutation (call `set_epoch(e)` for a new pairing every epoch).
    """

    def __init__(self, prepared_dir, split: Optional[str] = "train", augment=None, seed: int = 0):
        info = read_classes(prepared_dir)
        self.classes = info["classes"]
        cols = mf.read_table(prepared_dir, mf.IMAGES_FILE, split=split,
                             columns=["image_png", "mask_png", "label_idx", "unpaired_pool"]).to_pydict()
        res, ch = int(info["resolution"]), int(info["channels"])
        labels = np.asarray(cols["label_idx"], np.int64)
        pool = np.asarray(cols["unpaired_pool"], bool)
        normal = np.flatnonzero((labels == 0) & pool)
        defect = np.flatnonzero(labels > 0)
        for name, idx in (("normal", normal), ("defect", defect)):
            if len(idx) == 0:
                raise DataError(f"{prepared_dir} split {split!r} has no {name} images for unpaired training. "
                                "Add them to the source (normal images must come from other parts than the "
                                "defect images) and re-run `pipeline prepare`.")
        self.a = _stack_images([cols["image_png"][i] for i in normal], ch, res).numpy()
        self.b = _stack_images([cols["image_png"][i] for i in defect], ch, res).numpy()
        self.mask_b = _stack_masks([cols["mask_png"][i] for i in defect], res).numpy()
        self.label_b = labels[defect]
        self.zero_mask = np.zeros((1, res, res), np.uint8)
        self.augment = _as_augment(augment)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        self.perm_a = rng.permutation(len(self.a))
        self.perm_b = rng.permutation(len(self.b))

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, i: int) -> dict:
        ia, ib = self.perm_a[i % len(self.a)], self.perm_b[i % len(self.b)]
        a, _, _ = _apply(self.augment, self.a[ia], self.zero_mask)
        b, mask_b, _ = _apply(self.augment, self.b[ib], self.mask_b[ib])
        return {"a": _to_float(a), "b": _to_float(b), "label_b": int(self.label_b[ib]),
                "mask_b": torch.from_numpy(np.ascontiguousarray(mask_b)).float()}
