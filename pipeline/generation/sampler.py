"""Pure sampling: a loaded family + normal images + labels + regions -> defect images and masks.

No Ray here: `ray_generate.py` wraps `Sampler` in an actor, the benchmark's bare loop and the
tests call it directly.

Reproducibility. A sample's pixels are a function of (generate.seed, sample index) only, not
of how Ray cut the work into batches and actors (nor of generate.ray_batch_size). Two things make
that hold while samples are synthesised in batches:
- Noise: every sample has its own seed, `sample_seed(generate.seed, index)`, and families draw
  all noise at sampling time through `pipeline.models.noise`. Inside `per_sample_noise(seeds)`
  sample i's noise (Defect-GAN's noise maps, ProGAN/DCGAN latents, Pix2Pix's test-time dropout)
  comes from its own generator seeded with its seed, whatever shares its batch. Nothing else in
  a family's `synthesize` mixes samples (instance norm, eval-mode or per-sample batch norm;
  ProGAN's minibatch stddev is in D only).
- Arithmetic: conv kernels pick their algorithm and blocking by the input shape, so the same
  sample computed in a batch of 1 and of 16 differs in the last float bits (measured: up to
  1e-6), enough to flip a rounded pixel now and then. `synthesize` therefore always runs on
  COMPUTE_BATCH samples: a call's samples are cut into chunks of COMPUTE_BATCH and the last chunk
  is padded with copies of its last sample (their outputs are dropped). With the shape fixed, a
  sample's result does not depend on its position in the chunk or on its neighbours (every layer
  computes each sample separately; tests/test_generation.py checks byte equality for batches of
  1, 3 and 16 and across actor counts). Same device type and torch build assumed: a GPU or
  another torch version gives other last bits.
Ray batches of a multiple of COMPUTE_BATCH (generate.ray_batch_size 16, the default) waste nothing;
the padding costs only on a block's last, partial batch.

Quality filter. Masks are thresholded at 0.5; a sample whose mask covers less than
`min_mask_fraction` or more than `max_mask_fraction` of the image is dropped (an empty mask
means the generator did not place a defect; a full one means it repainted the whole surface).
Noise-based families (`outputs_masks` False: progan, dcgan) always return all-zero masks by
contract, so the filter would drop everything: for them it is skipped (`applies_filter`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.errors import DataError
from pipeline.generation.placement import Placement, to_tensor
from pipeline.models.base import GANFamily
from pipeline.models.noise import per_sample_noise

DEFECT_LABEL = "defect"     # output class of families that cannot choose a defect class
DEFECT_LABEL_IDX = -1
# Samples per synthesize call, fixed so that a sample's arithmetic never depends on the batch
# it came in (module doc). 16: the default generate.ray_batch_size, near the CPU's batched speed.
COMPUTE_BATCH = 16


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed` (independent streams per index)."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_seeds(seed: int, indices: np.ndarray) -> np.ndarray:
    return np.array([sample_seed(seed, int(i)) for i in indices], dtype=np.int64)


def applies_filter(family: GANFamily) -> bool:
    return family.outputs_masks


# ---- PNG <-> arrays ----------------------------------------------------------------------------

def decode_png(data: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> (C, H, W) uint8 with `channels` channels (1 or 3)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except Exception as err:
        raise DataError(f"a normal image in the prepared data is not a readable PNG ({err}). "
                        "Re-run `pipeline prepare`.") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def encode_png(arr: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) uint8 -> PNG bytes (compress_level 1: speed over size)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_unit(images_u8: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, C, H, W) uint8 -> float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_u8)).to(device).float().div_(127.5).sub_(1.0)


def images_u8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def binary_masks(masks: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) in [0, 1] -> (B, H, W) uint8 {0, 1}, thresholded at 0.5."""
    return (masks.detach().float()[:, 0] >= 0.5).to(torch.uint8).cpu().numpy()


def keep(fractions: np.ndarray, lo: float, hi: float, filtered: bool) -> np.ndarray:
    """Boolean keep flags of the quality filter (all True when the family skips it)."""
    if not filtered:
        return np.ones(len(fractions), bool)
    return (fractions >= lo) & (fractions <= hi)


# ---- the sampler -------------------------------------------------------------------------------

class Sampler:
    """Runs one loaded family on batches of normal images, COMPUTE_BATCH samples per synthesize
    call, each sample's noise from its own seed (see module doc)."""

    def __init__(self, family: GANFamily, placement: Placement, device: str | torch.device = "cpu"):
        self.family = family.eval()
        self.placement = placement
        self.device = torch.device(device)
        self.channels = family.spec.channels
        # Noise-based families ignore both the normal image and the region: no region is recorded.
        self.uses_region = family.outputs_masks

    @torch.no_grad()
    def generate(self, normal_u8: np.ndarray, labels: np.ndarray, seeds: np.ndarray,
                 indices: np.ndarray) -> dict[str, np.ndarray]:
        """normal_u8 (B, C, H, W) uint8; labels (B,) class indices >= 1 to ask for.

        Returns images (B, H, W, C) uint8, masks (B, H, W) uint8 {0, 1},
        regions (B, H, W) uint8 {0, 1} and mask_fraction (B,) float.
        """
        regions = self.placement.regions(seeds, indices, labels)
        x = to_unit(normal_u8, self.device)                        # (B, C, H, W)
        r = to_tensor(regions, self.device)                         # (B, 1, H, W)
        y = torch.tensor(np.array(labels, np.int64), device=self.device)
        n = len(seeds)
        out_images, out_masks = [], []
        for start in range(0, n, COMPUTE_BATCH):
            # Rows of this chunk; a short last chunk repeats its last sample up to COMPUTE_BATCH.
            rows = np.minimum(np.arange(start, start + COMPUTE_BATCH), n - 1)
            take = torch.from_numpy(rows).to(self.device)
            with per_sample_noise(np.asarray(seeds)[rows]):
                img, mask = self.family.synthesize(x[take], y[take], r[take])
            real = min(COMPUTE_BATCH, n - start)
            out_images.append(images_u8(img[:real]))
            out_masks.append(binary_masks(mask[:real]))
        images = np.concatenate(out_images)
        masks = np.concatenate(out_masks)
        return {"images": images, "masks": masks, "regions": regions,
                "mask_fraction": masks.reshape(len(masks), -1).mean(1).astype(np.float64)}

    def generate_png(self, normal_png: list[bytes], labels: np.ndarray, seeds: np.ndarray,
                     indices: np.ndarray) -> dict[str, np.ndarray]:
        """Same as `generate`, PNG bytes in and out (image_png, mask_png 0/255, region_png 0/255
        or b"" for families that ignore regions: an all-None column would not survive Arrow)."""
        normal = np.stack([decode_png(b, self.channels) for b in normal_png])
        out = self.generate(normal, labels, seeds, indices)
        return {
            "image_png": _object_array([encode_png(a) for a in out["images"]]),
            "mask_png": _object_array([encode_png(m * 255) for m in out["masks"]]),
            "region_png": _object_array([encode_png(r * 255) if self.uses_region else b""
                                         for r in out["regions"]]),
            "mask_fraction": out["mask_fraction"],
        }


def _object_array(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
