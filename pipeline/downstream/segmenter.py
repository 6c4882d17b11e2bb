"""The downstream defect segmenter: a small U-Net trained from scratch (no pretrained weights) on
pixel masks, class-balanced, early-stopped and selected on the real validation split.

It measures what the classifier cannot: whether synthetic pixel-masked defects help locate
defects. Architecture (Ronneberger et al. 2015, "U-Net", shrunk for 32-64 px images on CPU):
`depth` levels of two conv3x3-BN-ReLU with widths w, 2w, 4w, ..., a 2x2 max-pool between
levels, a bottleneck of width w * 2**depth, and on the way up a bilinear x2 upsampling, the
skip of the same level concatenated and two conv3x3-BN-ReLU; a 1x1 conv gives one logit per
pixel. Max-pooling keeps small bright/dark defects visible after downsampling; bilinear
upsampling adds no parameters (no checkerboard of transposed convolutions).

Training mirrors classifier.train_classifier (the same StopRule, so differences between
conditions come from the data only):
  * class-balanced sampling by image label (balanced_sampling_weights), so defect images are
    not drowned by normals;
  * loss = BCE-with-logits + soft Dice. Defects cover ~1-2 % of the pixels: BCE alone is
    dominated by the background and is already low for an all-background prediction, while
    the Dice term (Milletari et al. 2016, "V-Net") is normalised by the foreground size, so the
    defect pixels of the batch count as much as the rest (the BCE + Dice sum is nnU-Net's
    default, Isensee et al. 2021). Dice is computed over the whole batch (sums over all its
    pixels), so batches of normal images with empty masks keep a defined, finite loss;
  * Adam at a constant learning rate; every `eval_every` steps the model is scored on the
    validation split by pixel AP (pixel_scores.pixel_average_precision), ties broken by the
    lower validation loss; after `min_steps`, training stops once `patience` evaluations in a
    row brought no improvement, or at `max_steps`; the best validated weights are returned.
BatchNorm running statistics are used as they were when validated (no recalibration).

Seeded and deterministic on CPU: initialisation under a forked RNG from `seed` (the same
initial weights for every condition of one seed: a paired comparison), batch draws and
augmentation from a private `torch.Generator`; the global RNG is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The classifier's input conversion (channels_last) and batched eval-mode inference, shared.
from pipeline.downstream.classifier import StopRule, _input, _logits, fit_best_on_val
from pipeline.downstream.pixel_scores import pixel_average_precision
from pipeline.metrics.features import balanced_sampling_weights

# (x (B, C, H, W) in [-1, 1], m (B, 1, H, W) 0/1, gen) -> (x, m): augment.strong_classical_joint
JointAugment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallUNet(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, 1, H, W) defect logits; H and W divisible by 2**depth."""

    def __init__(self, in_channels: int, width: int = 8, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1; got {width}")
        self.depth = depth
        widths = [width * 2 ** i for i in range(depth + 1)]           # w, 2w, ..., w * 2**depth
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])]
                                  + [_double_conv(widths[i - 1], widths[i]) for i in range(1, depth + 1)])
        # Up level i (from depth-1 to 0): the upsampled level below (widths[i+1]) + the skip (widths[i]).
        self.up = nn.ModuleList([_double_conv(widths[i + 1] + widths[i], widths[i]) for i in range(depth)])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 2 ** self.depth or w % 2 ** self.depth:
            raise ValueError(f"SmallUNet(depth={self.depth}) needs image sides divisible by {2 ** self.depth}; "
                             f"got {h}x{w} (use a smaller depth or pad the images)")
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)                                           # (B, w * 2**i, H / 2**i, W / 2**i)
        for i in reversed(range(self.depth)):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skips[i]], 1))
        return self.head(x)                                           # (B, 1, H, W)


@dataclass
class SegTrainLog:
    steps: int = 0                        # optimizer steps taken
    best_step: int = 0                    # step of the returned weights
    best_val_pixel_ap: float = float("nan")
    best_val_loss: float = float("nan")
    stopped_by: str = ""                  # "patience" | "max_steps"
    history: list[tuple[int, float, float]] = field(default_factory=list)   # (step, val pixel AP, val loss)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE-with-logits (mean over pixels) + soft Dice loss over the whole batch (module docstring).

    logits, target (B, 1, H, W), target 0/1. `smooth` (the usual +1) keeps Dice finite and
    near 0 when the batch has no defect pixel and none is predicted.
    """
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum() + smooth) / (p.sum() + target.sum() + smooth)
    return bce + (1 - dice)


def _check(images: np.ndarray, masks: np.ndarray, images_name: str, masks_name: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{images_name} must be uint8 (N, C, H, W); got shape {images.shape}")
    if masks.shape != (len(images), 1, *images.shape[2:]):
        raise ValueError(f"{masks_name} must be (N, 1, H, W) = {(len(images), 1, *images.shape[2:])} "
                         f"to match {images_name}; got {masks.shape}")
    if not masks.any():
        raise ValueError(f"{masks_name} has no defect pixel: a segmenter needs masked defect images")


def train_segmenter(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, *, val_images: np.ndarray,
                    val_masks: np.ndarray, stop: StopRule, batch_size: int, lr: float, seed: int, width: int = 8,
                    augment: Optional[JointAugment] = None,
                    precision: Literal["fp32", "bf16"] = "fp32") -> tuple[SmallUNet, SegTrainLog]:
    """Train on (images uint8 (N, C, H, W), masks (N, 1, H, W) 0/1 (any non-zero is defect),
    labels (N,) with 0 = normal, used for balanced sampling only); return the best model on the
    val split.

    masks and val_masks must contain defect pixels (nothing to learn / model selection is by
    val pixel AP): a ValueError names the one that has none. `augment` transforms image and
    mask together (augment.strong_classical_joint). Same seed, same initial weights whatever
    the data. The global RNG state is left untouched.
    """
    # Any non-zero mask value is defect (a 0/255 mask must not become a target of 255).
    images, masks = np.asarray(images), (np.asarray(masks) > 0).astype(np.uint8)
    val_images, val_masks = np.asarray(val_images), (np.asarray(val_masks) > 0).astype(np.uint8)
    labels = np.asarray(labels, np.int64)
    _check(images, masks, "images", "masks")
    _check(val_images, val_masks, "val_images", "val_masks")
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} images")
    if n < 2:
        raise ValueError("train_segmenter needs at least 2 images")
    val_target = torch.from_numpy(np.ascontiguousarray(val_masks)).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallUNet(images.shape[1], width=width).to(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(seed)

        def batch_loss(idx: np.ndarray) -> torch.Tensor:
            x = _input(images[idx])
            m = torch.from_numpy(masks[idx]).float()
            if augment is not None:
                x, m = augment(x, m, gen)
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            return segmentation_loss(logits, m)

        def validate() -> tuple[float, float]:
            val_logits = _logits(model, val_images, 256, precision)
            # AP depends on the ranking only: logits keep it where float32 sigmoids saturate at 1.
            return (pixel_average_precision(val_logits.numpy(), val_masks),
                    float(segmentation_loss(val_logits, val_target)))

        fitted = fit_best_on_val(model, weights=balanced_sampling_weights(labels), batch_size=min(batch_size, n),
                                 lr=lr, stop=stop, gen=gen, batch_loss=batch_loss, validate=validate)
    log = SegTrainLog(steps=fitted.steps, best_step=fitted.best_step, best_val_pixel_ap=fitted.best_score,
                      best_val_loss=fitted.best_loss, stopped_by=fitted.stopped_by, history=fitted.history)
    return model.eval(), log


def predict_pixel_scores(model: nn.Module, images: np.ndarray, batch_size: int = 256,
                         precision: Literal["fp32", "bf16"] = "fp32") -> np.ndarray:
    """Defect probability per pixel, float32 (N, H, W) (sigmoid of the logits)."""
    images = np.asarray(images)
    if len(images) == 0:
        return np.zeros((0, *images.shape[2:]), np.float32)
    return torch.sigmoid(_logits(model, images, batch_size, precision)).squeeze(1).numpy().astype(np.float32)
