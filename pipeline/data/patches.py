"""Patch mode (`prepare.resize: patches`): defects at their own scale.

Resizing a whole inspection image (hundreds of px) to 32-64 px erases defects a few px wide.
Here each image is read at its own size (times `prepare.patches.scale`) and cut into patches of
`prepare.resolution` px; the network then sees a defect as large as the camera did (the way
Defect-GAN trains on 128 px patches of large CODEBRIM images).

    plan_image(native, params, size, rng) -> ImagePlan     where the patches of one image go (pass 1)
    cut(native, plan, windows, scale) -> [(window, image, mask)]   the pixels (pass 2)

* Defect patches: one (or `defect_per_component`) per connected component of the mask
  (8-connectivity), placed at random (`jitter`) among the positions that keep the whole
  component inside the patch. A component larger than the patch in a direction gets a patch
  holding part of it: an anchor pixel of the component is drawn at random and the patch is
  placed around it, inside the component's bounding box, so it is full of that defect. The
  patch's class is its component's class: the majority class of the component's own pixels in a
  class-index mask, or the image's class for a 0/1 mask. Its mask marks every defect pixel in
  the patch, of any component (binary, as SCHEMA.md says).
* Normal patches: `normal_per_image` per image, at random among the positions whose patch,
  grown by `normal_margin` px on each side, holds no mask pixel: from normal images and from the
  defect-free regions of defect images, so a dataset without a normal image still has normals.
  A defect image whose mask is unknown (has_mask false) gives none.
* An image smaller than the patch is padded to it by reflection, centred (never cropped away
  from its defect); the mask is reflected with it, so mirrored defect pixels stay marked.
  Positions (`patch_x`, `patch_y`) are in the scaled source image; they are negative when the
  patch starts in the padding.

Everything random comes from a generator seeded by (prepare.seed, the image's id): an image's
patches do not depend on the other images.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from pipeline.data.importers import NORMAL, NativeImage

EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Window:
    x: int              # top-left column in the scaled source image (< 0: starts in the reflect padding)
    y: int              # top-left row
    label: str          # the patch's class: its component's, or normal


@dataclass
class ImagePlan:
    """Where one image's patches may go (candidates; the caps pick among them)."""

    width: int                          # the scaled image's size
    height: int
    content_hash: str                   # of the scaled pixels (byte-identical images share a split)
    defect: list[Window] = field(default_factory=list)
    normal: list[Window] = field(default_factory=list)
    components: dict[str, int] = field(default_factory=dict)   # class -> components with a patch
    larger_than_patch: int = 0          # components with a patch on part of them
    too_small: int = 0                  # components below min_component_px (no patch of their own)
    padded: bool = False
    why_no_defect_patch: str = ""       # a defect image with no defect patch: why


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8", "surrogateescape"))])


# --------------------------------------------------------------------------- scale and pad

def scaled(native: NativeImage, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWxC, mask HxW) resized by `scale` (the identity at 1).

    The image is resampled bicubically. Mask values are kept: enlarging takes the nearest
    pixel; shrinking marks an output pixel with the value covering most of it among the values
    present, whenever any mask pixel falls in it, so a 1 px scratch survives a reduction.
    """
    if scale == 1:
        return native.image, native.mask
    height, width = native.mask.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = native.image
    pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
    out = np.asarray(pil.resize(size, Image.BICUBIC))
    image = out[:, :, None] if out.ndim == 2 else out
    if scale > 1:
        return image, np.asarray(Image.fromarray(native.mask).resize(size, Image.NEAREST))
    mask = np.zeros((size[1], size[0]), np.uint8)
    best = np.zeros((size[1], size[0]), np.float32)
    for value in np.unique(native.mask):
        if value == 0:
            continue
        cover = np.asarray(Image.fromarray((native.mask == value).astype(np.float32)).resize(size, Image.BOX))
        take = cover > best
        mask[take], best[take] = value, cover[take]
    return image, mask


def pad_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) padding that centres an image smaller than `size` in a side (0 where it fits)."""
    return max(0, size - height) // 2, max(0, size - width) // 2


def padded(a: np.ndarray, size: int) -> np.ndarray:
    """`a` (HxW or HxWxC) reflect-padded, centred, to at least size x size."""
    height, width = a.shape[:2]
    top, left = pad_offsets(height, width, size)
    if height >= size and width >= size:
        return a
    pads = [(top, max(0, size - height) - top), (left, max(0, size - width) - left)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pads, mode="reflect")


# --------------------------------------------------------------------------- components and windows

@dataclass
class Component:
    label: str
    pixels: int
    y0: int             # bounding box in padded coordinates, exclusive end
    x0: int
    y1: int
    x1: int
    ys: np.ndarray      # its pixels (padded coordinates)
    xs: np.ndarray


def components(mask: np.ndarray, classes: Optional[dict[int, str]], label: str,
               offset: tuple[int, int] = (0, 0)) -> list[Component]:
    """Connected defect components (8-connectivity) of a mask, each with its class: the
    majority class of its pixels (a tie: the lower index) when `classes` maps values to
    classes, else the image's `label`. Coordinates are shifted by `offset` (top, left): the
    padding, so that they are those of the padded image (found before padding, a reflected copy
    of a defect is not a component of its own)."""
    from scipy import ndimage   # installed with albumentations (pinned in constraints.txt)

    labels, n = ndimage.label(mask > 0, structure=EIGHT_CONNECTED)
    out = []
    for i, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:
            continue
        inside = labels[box] == i
        ys, xs = np.nonzero(inside)
        if classes is None:
            cls = label
        else:
            counts = np.bincount(mask[box][inside], minlength=256)
            cls = classes[int(np.argmax(counts[1:])) + 1]
        top, left = offset
        out.append(Component(cls, len(ys), box[0].start + top, box[1].start + left, box[0].stop + top,
                             box[1].stop + left, ys + box[0].start + top, xs + box[1].start + left))
    return out


def _jittered(lo: int, hi: int, jitter: float, rng: np.random.Generator) -> int:
    """A position in [lo, hi]: the middle `jitter` share of the range (0: its centre)."""
    shrink = int((hi - lo) * (1 - jitter) / 2)
    return int(rng.integers(lo + shrink, hi - shrink + 1))


def defect_window(c: Component, height: int, width: int, size: int, jitter: float,
                  rng: np.random.Generator) -> tuple[int, int]:
    """(x, y) of a patch on component `c` in a padded image of height x width (>= size).

    Where the component fits in the patch it lies wholly inside it; where it does not, the
    patch covers a random anchor pixel of the component and stays within its bounding box."""
    k = int(rng.integers(len(c.ys)))
    anchor = {"y": int(c.ys[k]), "x": int(c.xs[k])}
    pos = {}
    for axis, lo_box, hi_box, extent in (("y", c.y0, c.y1, height), ("x", c.x0, c.x1, width)):
        if hi_box - lo_box <= size:             # fits: every position keeping [lo_box, hi_box) inside
            lo, hi = max(hi_box - size, 0), min(lo_box, extent - size)
        else:                                   # larger: around the anchor, inside the bounding box
            lo = max(anchor[axis] - size + 1, lo_box)
            hi = min(anchor[axis], hi_box - size)
        pos[axis] = _jittered(lo, hi, jitter, rng)
    return pos["x"], pos["y"]


def _window_sums(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, axis: int) -> np.ndarray:
    """Sums of `a` over [lo[i], hi[i]) along `axis`, for each i."""
    c = np.cumsum(a, axis=axis, dtype=np.int64 if a.size >= 2**31 else np.int32)
    c = np.concatenate([np.zeros_like(c.take([0], axis=axis)), c], axis=axis)
    return c.take(hi, axis=axis) - c.take(lo, axis=axis)


def normal_positions(mask: np.ndarray, size: int, margin: int) -> np.ndarray:
    """bool (H - size + 1, W - size + 1): the patch at (y, x), grown by `margin` px on every side
    (clipped to the image), holds no mask pixel."""
    height, width = mask.shape
    ys, xs = np.arange(height - size + 1), np.arange(width - size + 1)
    cols = _window_sums(mask > 0, np.clip(xs - margin, 0, width), np.clip(xs + size + margin, 0, width), 1)
    inside = _window_sums(cols, np.clip(ys - margin, 0, height), np.clip(ys + size + margin, 0, height), 0)
    return inside == 0


def spread_sample(free: np.ndarray, k: int, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to k (y, x) drawn uniformly among the True cells of `free` (a copy is changed), none
    within half a patch of another in both directions. Random draws first (cheap on a large,
    mostly free image), every free cell when they keep missing."""
    free = free.copy()
    half = max(1, size // 2)
    picked: list[tuple[int, int]] = []
    while len(picked) < k:
        y = x = None
        for _ in range(64):
            ty, tx = int(rng.integers(free.shape[0])), int(rng.integers(free.shape[1]))
            if free[ty, tx]:
                y, x = ty, tx
                break
        if y is None:
            cells = np.flatnonzero(free)
            if not len(cells):
                break
            y, x = divmod(int(cells[rng.integers(len(cells))]), free.shape[1])
        picked.append((y, x))
        free[max(0, y - half + 1):y + half, max(0, x - half + 1):x + half] = False
    return picked


# --------------------------------------------------------------------------- one image

def plan_image(native: NativeImage, params, size: int, rng: np.random.Generator) -> ImagePlan:
    """Candidate patches of one image (`params`: prepare.patches)."""
    image, mask = scaled(native, params.scale)
    height, width = mask.shape
    digest = hashlib.sha256(f"{image.shape}".encode() + image.tobytes()).hexdigest()
    plan = ImagePlan(width, height, digest, padded=height < size or width < size)
    top, left = pad_offsets(height, width, size)
    pmask = padded(mask, size)
    ph, pw = pmask.shape
    if native.has_mask and native.label != NORMAL:
        seen = set()
        comps = components(mask, native.classes, native.label, (top, left))
        for c in comps:
            if c.pixels < params.min_component_px:
                plan.too_small += 1
                continue
            plan.components[c.label] = plan.components.get(c.label, 0) + 1
            plan.larger_than_patch += (c.y1 - c.y0 > size) or (c.x1 - c.x0 > size)
            for _ in range(params.defect_per_component):
                x, y = defect_window(c, ph, pw, size, params.jitter, rng)
                if (x, y) not in seen:
                    seen.add((x, y))
                    plan.defect.append(Window(x - left, y - top, c.label))
        if not plan.defect:
            plan.why_no_defect_patch = (
                f"its mask's {len(comps)} component(s) are all smaller than prepare.patches.min_component_px "
                f"({params.min_component_px} px)" if comps else "its mask marks no pixel")
    elif native.label != NORMAL:
        plan.why_no_defect_patch = native.why_no_mask or "its mask is unknown"
    if native.has_mask and params.normal_per_image:
        for y, x in spread_sample(normal_positions(pmask, size, params.normal_margin), params.normal_per_image,
                                  size, rng):
            plan.normal.append(Window(x - left, y - top, NORMAL))
    return plan


def cut(native: NativeImage, windows: list[Window], size: int, scale: float
        ) -> tuple[list[tuple[Window, np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """The pixels of `windows`: [(window, image size x size x C, mask size x size 0/1)], and the
    scaled image and mask they were cut from."""
    image, mask = scaled(native, scale)
    top, left = pad_offsets(*mask.shape, size)
    pimage, pmask = padded(image, size), padded(mask, size)
    out = []
    for w in windows:
        y, x = w.y + top, w.x + left
        out.append((w, pimage[y:y + size, x:x + size], (pmask[y:y + size, x:x + size] > 0).astype(np.uint8)))
    return out, image, mask


# --------------------------------------------------------------------------- caps

def shares(cap: int, fractions: dict[str, float]) -> dict[str, Optional[int]]:
    """A cap over all splits cut into each split's share (None: no cap)."""
    if not cap:
        return {s: None for s in fractions}
    return {s: int(cap * f + 0.5) for s, f in fractions.items()}


def round_robin(by_image: dict[str, list], cap: Optional[int], rng: np.random.Generator) -> list:
    """Up to `cap` items taken one per image in turn (images in random order), so a cap keeps
    as many source images as it can; every item when `cap` is None."""
    order = [by_image[k] for k in sorted(by_image)]
    order = [order[i] for i in rng.permutation(len(order))]
    picked, depth = [], 0
    while order and (cap is None or len(picked) < cap):
        order = [items for items in order if len(items) > depth]
        for items in order:
            if cap is not None and len(picked) >= cap:
                break
            picked.append(items[depth])
        depth += 1
    return picked
