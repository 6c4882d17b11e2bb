"""Copy-paste augmentation: the baseline a practitioner tries before a GAN.

Each new image takes one real training defect of class k, cuts it out by its mask, and pastes
it onto a real normal training image, labelled k (Dwibedi et al. 2017, "Cut, Paste and Learn";
Ghiasi et al. 2021, "Simple Copy-Paste"):
  * geometry: a random horizontal / vertical flip (p = 0.5 each) and a rotation by an angle
    drawn uniformly in [0, 360) degrees about the defect's centroid, then a translation that
    puts the centroid at a random point where the whole (rotated) defect stays inside the image;
  * blending: alpha = max(mask, GaussianBlur(mask, sigma)): the defect's own pixels are pasted
    opaque and a feathered rim of sigma pixels fades into the target, so there is no hard
    seam (Gaussian blending as in Dwibedi et al.; sigma 0 is a hard cut).
Only the real images of the few-shot subset are used (the classifier's own training data), so
copy-paste adds no real information the other conditions lack. Defect images without a mask
(an empty mask) cannot be cut; classes without any are reported by `classes_without_masks`.
"""

from __future__ import annotations

import math

import numpy as np


def classes_without_masks(masks: np.ndarray, labels: np.ndarray, num_classes: int) -> list[int]:
    """Defect classes (>= 1) present in `labels` none of whose images has a non-empty mask."""
    has = masks.reshape(len(masks), -1).any(axis=1)
    return [k for k in range(1, num_classes) if (labels == k).any() and not has[labels == k].any()]


def _paste_one(defect: np.ndarray, mask: np.ndarray, target: np.ndarray, rng: np.random.Generator,
               blend_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """defect, target uint8 (C, H, W); mask (H, W) 0/1 non-empty -> (uint8 (C, H, W), the pasted
    defect's mask uint8 (1, H, W) 0/1: the moved mask before feathering, at 0.5)."""
    import cv2

    _, h, w = defect.shape
    ys, xs = np.nonzero(mask)
    cy, cx = float(ys.mean()), float(xs.mean())
    radius = float(np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max()) + 1.0
    sy, sx = (-1.0 if rng.random() < 0.5 else 1.0), (-1.0 if rng.random() < 0.5 else 1.0)
    theta = math.radians(rng.uniform(0.0, 360.0))
    ty = rng.uniform(radius, h - 1 - radius) if 2 * radius < h - 1 else (h - 1) / 2
    tx = rng.uniform(radius, w - 1 - radius) if 2 * radius < w - 1 else (w - 1) / 2
    # p' = R @ F @ (p - c) + t, with p = (x, y): flip F, rotation R, centroid c, target t.
    c, s = math.cos(theta), math.sin(theta)
    linear = np.array([[c, -s], [s, c]]) @ np.diag([sx, sy])
    offset = np.array([tx, ty]) - linear @ np.array([cx, cy])
    m = np.hstack([linear, offset[:, None]]).astype(np.float64)

    src = np.ascontiguousarray(defect.transpose(1, 2, 0)).astype(np.float32)
    moved = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    alpha = cv2.warpAffine(mask.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    pasted_mask = (alpha >= 0.5).astype(np.uint8)[None]
    if blend_sigma > 0:
        alpha = np.maximum(alpha, cv2.GaussianBlur(alpha, (0, 0), blend_sigma))
    alpha = np.clip(alpha, 0.0, 1.0)[:, :, None]
    moved = moved.reshape(h, w, -1)
    base = target.transpose(1, 2, 0).astype(np.float32)
    out = base * (1 - alpha) + moved * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).transpose(2, 0, 1), pasted_mask


def copy_paste(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, per_class: int, seed: int,
               blend_sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_class` pasted images per defect class that has masked images.

    images uint8 (N, C, H, W), masks (N, 1, H, W) 0/1, labels (N,) with 0 = normal: the real
    training subset. Returns (images uint8 (M, C, H, W), labels (M,), masks uint8 (M, 1, H, W) 0/1,
    the pasted defects' masks, for the segmenter); M = 0 without normals.
    """
    rng = np.random.default_rng([seed, 0xC0FFEE])
    flat = masks.reshape(len(masks), -1).any(axis=1)
    normals = np.flatnonzero(labels == 0)
    out_images, out_labels, out_masks = [], [], []
    if len(normals) == 0:
        return _empty(images)
    for k in sorted(int(c) for c in np.unique(labels) if c >= 1):
        sources = np.flatnonzero((labels == k) & flat)
        if len(sources) == 0:
            continue
        for _ in range(per_class):
            i, j = int(rng.choice(sources)), int(rng.choice(normals))
            image, mask = _paste_one(images[i], masks[i, 0], images[j], rng, blend_sigma)
            out_images.append(image)
            out_masks.append(mask)
            out_labels.append(k)
    if not out_images:
        return _empty(images)
    return np.stack(out_images), np.asarray(out_labels, np.int64), np.stack(out_masks)


def _empty(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64),
            np.zeros((0, 1, *images.shape[2:]), np.uint8))
