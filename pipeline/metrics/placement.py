"""Placement: do generated defects land where they were asked to?

Defect-GAN's control map may be spatially varying at inference; the generation stage stores
the requested region (`region_png`, 0/255) beside each sample's mask. `mask_in_region` is the
share of the generated mask's mass that falls inside the region, averaged over samples that
have a region and a non-empty mask (1 = perfectly confined; higher is better).
`mask_area_in_range` is the share of those samples whose mask covers MASK_AREA_RANGE of the image:
neither collapsed to (almost) nothing, Defect-GAN's "change nothing" failure, nor spread over the
whole image (the "no collapse" check of the CPU presets; higher is better).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.registry import MetricContext, register_metric

# Share of the image a placed defect's mask may cover: below 0.2 % it is a few pixels at 64 px
# (a collapsed mask), above 30 % it is no longer a local defect.
MASK_AREA_RANGE = (0.002, 0.30)


def mask_share_in_region(masks: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Per sample: sum(mask * region) / sum(mask); NaN where the mask is empty. (N, 1, H, W) 0/1 in."""
    m = masks.reshape(len(masks), -1).astype(np.float64)
    r = (regions.reshape(len(regions), -1) > 0).astype(np.float64)
    mass = m.sum(axis=1)
    inside = (m * r).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, inside / np.where(mass > 0, mass, 1.0), np.nan)


@register_metric("mask_in_region", lower_is_better=False,
                 description="share of generated mask mass inside the requested region")
def mask_in_region(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Mean share of mask mass inside the region; NaN when no sample carries a region."""
    if ctx.fake_masks is None or ctx.fake_regions is None or ctx.has_region is None \
            or not ctx.has_region.any():
        ctx.detail("n", 0)
        return math.nan
    shares = mask_share_in_region(ctx.fake_masks[ctx.has_region], ctx.fake_regions[ctx.has_region])
    valid = ~np.isnan(shares)
    ctx.detail("n", int(valid.sum()))
    ctx.detail("empty_masks", int((~valid).sum()))
    return float(shares[valid].mean()) if valid.any() else math.nan


@register_metric("mask_area_in_range", lower_is_better=False,
                 description="share of placed samples whose mask covers 0.2-30 % of the image")
def mask_area_in_range(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Share of samples with a region whose mask area is within MASK_AREA_RANGE; NaN without regions.

    Details: the mean area, and how many fall below and above the range."""
    if ctx.fake_masks is None or ctx.has_region is None or not ctx.has_region.any():
        return math.nan
    masks = ctx.fake_masks[ctx.has_region]
    area = (masks.reshape(len(masks), -1) > 0).mean(axis=1)
    low, high = MASK_AREA_RANGE
    ctx.detail("mean_area", float(area.mean()))
    ctx.detail("below", int((area < low).sum()))
    ctx.detail("above", int((area > high).sum()))
    return float(((area >= low) & (area <= high)).mean())
