"""Pseudo-masks for defect images whose source has no pixel mask (`prepare.pseudo_masks`).

Beyond the paper. Defect-GAN learns a class's look from where its defects are: with pixel masks
the masks shape the training control maps, supervise the restoration mask and ask the repaint to
reproduce the real defect inside it (pipeline/models/defectgan.py). Without masks (elpv, image-level
labels) the only class signal left is D's classifier, and G exploits it with one shortcut mark in
every image (bench/results/defectgan_ablation.md, session 4). A pseudo-mask gives those terms a
rough location of each real defect.

Method "normal_reference" (a reference-image anomaly map, the simplest of the normal-model
localisers; no network, no download):
  1. reference(x) = the per-pixel median of the `neighbours` training normal images nearest to x
     (L2 over pixels), so the cell type, busbars and texture of x are in the reference;
  2. deviation(x) = |x - reference(x)| averaged over channels, then a 3x3 box blur (pixel noise);
  3. threshold = the `quantile` of the same deviation computed for every training normal image
     against its nearest *other* normals: by construction about (1 - quantile) of normal pixels
     would be called defect;
  4. mask = deviation > threshold, minus pixels with fewer than 3 of the 9 in their 3x3
     neighbourhood on (isolated speckle);
  5. a mask covering less than `min_area` of the image is speckle-sized (a normal image scored
     against its neighbours yields marks of that size too) and is dropped.
A defect image whose mask comes out empty keeps has_mask false (training falls back to a box).

Only training normals are references, so val / test labels never leak into the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Rows of deviations computed at once: bounds the (chunk x normals) distance matrix.
_CHUNK = 256


@dataclass
class PseudoMaskResult:
    masks: np.ndarray        # (n, H, W) bool
    threshold: float         # the deviation threshold (in [0, 1] intensity units)


def _as_float(images: np.ndarray) -> torch.Tensor:
    """(n, H, W, C) or (n, H, W) uint8 -> (n, C*H*W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).flatten(1)


def _deviation(x: torch.Tensor, normals: torch.Tensor, neighbours: int, shape: tuple[int, ...],
               skip_self: bool) -> torch.Tensor:
    """(n, H, W) blurred |x - median of its nearest normals|; skip_self: x is `normals` itself."""
    h, w = shape[0], shape[1]
    channels = shape[2] if len(shape) == 3 else 1
    out = []
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK]
        dist = torch.cdist(chunk, normals)
        if skip_self:
            rows = torch.arange(chunk.shape[0])
            dist[rows, rows + start] = float("inf")
        nearest = dist.topk(neighbours, largest=False).indices
        reference = normals[nearest].median(dim=1).values
        diff = (chunk - reference).abs().view(-1, h, w, channels).mean(-1)
        out.append(F.avg_pool2d(diff[:, None], 3, stride=1, padding=1)[:, 0])
    return torch.cat(out)


def normal_reference_masks(defects: np.ndarray, normals: np.ndarray, neighbours: int = 5,
                           quantile: float = 0.995, min_area: float = 0.002) -> PseudoMaskResult:
    """Pseudo-masks of `defects` against the training `normals` (both (n, H, W[, C]) uint8).

    Needs more normal images than `neighbours` (one is left out when calibrating)."""
    if normals.shape[0] <= neighbours:
        raise ValueError(f"{normals.shape[0]} normal image(s) for {neighbours} neighbours: need more")
    shape = tuple(defects.shape[1:])
    reference = _as_float(normals)
    calibration = _deviation(reference, reference, neighbours, shape, skip_self=True)
    # np.quantile: torch.quantile refuses inputs above 16M elements.
    threshold = float(np.quantile(calibration.numpy().ravel(), quantile))
    if defects.shape[0] == 0:
        return PseudoMaskResult(np.zeros((0, *shape[:2]), bool), threshold)
    on = _deviation(_as_float(defects), reference, neighbours, shape, skip_self=False) > threshold
    support = F.avg_pool2d(on.float()[:, None], 3, stride=1, padding=1)[:, 0] * 9
    masks = on & (support >= 2.5)
    masks &= masks.float().mean(dim=(1, 2), keepdim=True) >= min_area
    return PseudoMaskResult(masks.numpy(), threshold)
