"""Train-time augmentation with albumentations, applied identically to image, mask (and pair B).

    aug = build_augment(params.prepare.augment, seed=0)
    out = aug(image=hwc_uint8, mask=hw_uint8)              # labelled / unpaired
    out = aug(image=a, image_b=b, mask=m)                  # paired: the same flips for A, B and mask

Geometric transforms (flips, 90-degree rotations) move the mask with the image; brightness /
contrast only touch images. `Compose(seed=...)` makes the sequence reproducible; call
`aug.set_random_seed(seed)` to re-seed (e.g. per DataLoader worker).
"""

from __future__ import annotations

import os
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PAIR_TARGET = "image_b"   # the name a pair's second image is passed under (same transform as "image")


def build_augment(params, seed: Optional[int] = None):
    """albumentations.Compose from AugmentParams (hflip, vflip, rotate90, brightness_contrast)."""
    import albumentations as A

    transforms = []
    if params.hflip > 0:
        transforms.append(A.HorizontalFlip(p=params.hflip))
    if params.vflip > 0:
        transforms.append(A.VerticalFlip(p=params.vflip))
    if params.rotate90 > 0:
        transforms.append(A.RandomRotate90(p=params.rotate90))
    if params.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2,
                                                     p=params.brightness_contrast))
    return A.Compose(transforms, additional_targets={PAIR_TARGET: "image"}, seed=seed)
