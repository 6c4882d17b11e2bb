"""Where defects go: the control map (region) handed to `family.synthesize(..., region)`.

Three modes (params `generate.placement`):
    random      one axis-aligned box per sample, side uniform in [box_min, box_max] x resolution,
                position uniform over the image; drawn from the sample's own seed, so the box does
                not depend on which actor or batch the sample lands in.
    masks       the user's PNG masks (generate.masks_dir) at the data resolution, used in sorted
                file-name order and cycled by sample index.
    real_masks  a real training mask of the requested class (prepared data, has_mask rows), picked
                by the sample's seed and jittered by it (flips, a shift of up to a quarter of the
                image, 1 px dilation), as Defect-GAN's `train_control: masks` trains: the defect
                takes a shape of its class. Classes without a known mask fall back to `random`.
Regions are uint8 arrays (H, W) in {0, 1}; `to_tensor` stacks them as (B, 1, H, W) float.
Only Defect-GAN honours the region; other families ignore it (their region_png is still
written so evaluation can measure mask-in-region).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import DataError

MASK_SUFFIXES = (".png",)


def random_box(seed: int, resolution: int, box_min: float, box_max: float) -> np.ndarray:
    """(H, W) uint8 {0, 1}: one box whose side is a uniform fraction of the image in [box_min, box_max]."""
    rng = np.random.default_rng(seed)
    lo = max(1, int(round(box_min * resolution)))
    hi = max(lo, int(round(box_max * resolution)))
    h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))   # sides drawn independently
    y0 = int(rng.integers(0, resolution - h + 1))
    x0 = int(rng.integers(0, resolution - w + 1))
    region = np.zeros((resolution, resolution), np.uint8)
    region[y0:y0 + h, x0:x0 + w] = 1
    return region


def load_user_masks(masks_dir: str | Path | None, resolution: int) -> list[tuple[str, np.ndarray]]:
    """[(file name, (H, W) uint8 {0, 1})] from the PNGs in `masks_dir`, sorted by name.

    Pixels > 127 are the region. Raises DataError naming the file for a wrong size, an
    unreadable or empty mask, and naming the folder when it is missing or holds no PNG.
    """
    if not masks_dir:
        raise DataError("generate.placement is 'masks' but generate.masks_dir is not set. "
                        "Point it to a folder of PNG masks, or use placement: random.")
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise DataError(f"masks folder {folder} (generate.masks_dir) does not exist.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MASK_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"masks folder {folder} (generate.masks_dir) holds no .png file.")
    masks = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                size = img.size
                arr = np.asarray(img.convert("L"))
        except Exception as err:  # PIL raises several types for truncated/corrupt files
            raise DataError(f"mask {path} is not a readable PNG ({type(err).__name__}: {err}).") from None
        if size != (resolution, resolution):
            raise DataError(f"mask {path} is {size[0]}x{size[1]} px; the prepared data is "
                            f"{resolution}x{resolution} px (classes.json resolution). "
                            f"Resize the mask to {resolution}x{resolution}.")
        region = (arr > 127).astype(np.uint8)
        if not region.any():
            raise DataError(f"mask {path} is empty (no pixel above 127): it marks no place for a defect.")
        masks.append((path.name, region))
    return masks


@dataclass
class Placement:
    """Turns (sample seed, sample index) into a region. Picklable: it travels to Ray actors."""

    mode: str = "random"                       # "random" | "masks" | "real_masks"
    resolution: int = 32
    box_min: float = 0.2
    box_max: float = 0.5
    masks: list[np.ndarray] = field(default_factory=list)   # mode "masks": (H, W) {0, 1}
    class_masks: dict[int, np.ndarray] = field(default_factory=dict)   # "real_masks": label -> (N, H, W)

    def region(self, seed: int, index: int, label: int = -1) -> np.ndarray:
        if self.mode == "masks":
            return self.masks[index % len(self.masks)]
        # A different stream from the torch seed of the same sample (placement never shares
        # random numbers with the generator's noise).
        stream = seed ^ 0x5EED_B0C5
        if self.mode == "real_masks" and label in self.class_masks:
            return jitter_mask(self.class_masks[label], stream)
        return random_box(stream, self.resolution, self.box_min, self.box_max)

    def regions(self, seeds: np.ndarray, indices: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """(B, H, W) uint8 {0, 1}; `labels` (the requested classes) matter for real_masks only."""
        labels = np.full(len(seeds), -1) if labels is None else np.asarray(labels)
        return np.stack([self.region(int(s), int(i), int(k)) for s, i, k in zip(seeds, indices, labels)])


def shift_range(lo: int, hi: int, size: int) -> tuple[int, int]:
    """Shifts in [-size // 4, size // 4] that keep the span [lo, hi] (and the 1 px its dilation
    adds) inside [0, size); (0, 0) where the span already touches both borders. Shared by
    generation's jitter_mask and Defect-GAN's training-time jitter_masks, so a generated region
    moves exactly as the training regions did."""
    return max(-(size // 4), min(0, 1 - lo)), min(size // 4, max(0, size - 2 - hi))


def jitter_mask(masks: np.ndarray, seed: int) -> np.ndarray:
    """One of `masks` (N, H, W) picked and jittered by `seed`: random flips, a shift of up to a
    quarter of the image that keeps the mask inside it, dilation by 1 px (as
    pipeline.models.defectgan.jitter_masks does in training)."""
    rng = np.random.default_rng(seed)
    m = masks[int(rng.integers(0, len(masks)))]
    if rng.random() < 0.5:
        m = m[:, ::-1]
    if rng.random() < 0.5:
        m = m[::-1, :]
    h, w = m.shape
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    (dy0, dy1), (dx0, dx1) = shift_range(rows[0], rows[-1], h), shift_range(cols[0], cols[-1], w)
    m = np.roll(m, (int(rng.integers(dy0, dy1 + 1)), int(rng.integers(dx0, dx1 + 1))), (0, 1))
    padded = np.pad(m, 1)
    grown = np.zeros_like(m)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + h, dx:dx + w]
    return np.ascontiguousarray(grown, dtype=np.uint8)


def real_class_masks(prepared_dir: Path) -> dict[int, np.ndarray]:
    """label -> (N, H, W) uint8 {0, 1}: the known masks of the prepared training defects."""
    from pipeline.data.datasets import decode_images

    data = decode_images(prepared_dir, "train")
    out = {}
    for label in data["label"].unique().tolist():
        sel = (data["label"] == label) & data["has_mask"] & (data["mask"].flatten(1).amax(1) > 0)
        if label > 0 and sel.any():
            out[int(label)] = (data["mask"][sel, 0] > 0).numpy().astype(np.uint8)
    return out


def to_tensor(regions: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, H, W) {0, 1} uint8 -> (B, 1, H, W) float."""
    return torch.from_numpy(np.ascontiguousarray(regions)).to(device=device, dtype=torch.float32).unsqueeze(1)


def placement_from_params(params, resolution: int, prepared_dir: Path | None = None) -> Placement:
    """The Placement `generate.*` params describe (user masks loaded and checked here; real masks
    read from the prepared data)."""
    if params.placement == "masks":
        masks = [m for _, m in load_user_masks(params.masks_dir, resolution)]
        return Placement("masks", resolution, params.box_min, params.box_max, masks)
    if params.placement == "real_masks":
        if prepared_dir is None:
            raise DataError("generate.placement 'real_masks' needs the prepared dataset (--data).")
        return Placement("real_masks", resolution, params.box_min, params.box_max,
                         class_masks=real_class_masks(Path(prepared_dir)))
    return Placement("random", resolution, params.box_min, params.box_max)
