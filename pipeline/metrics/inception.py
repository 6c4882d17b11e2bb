"""Inception FID / KID, only from weights the user supplies as a local file (nothing is downloaded).

`evaluate.inception_weights` must point to a WHOLE network saved by the user, loaded with
`torch.jit.load` (TorchScript, preferred: `torch.jit.save(torch.jit.script(net), "inception.pt")`)
or, failing that, `torch.load(..., weights_only=False)` of a pickled `nn.Module` (this runs
pickle: only use files you trust). No Inception architecture is bundled, so a bare state_dict
is not enough. The module receives float32 images in [0, 1], shape (B, 3, S, S) with
S = `evaluate.inception_size` (299 by default; 1-channel images are repeated to 3 channels)
and must return pool features (B, D) or (B, D, 1, 1) (a tuple/list: the first element).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.metrics.kernel import fid_from_features, kid
from pipeline.metrics.registry import MetricContext, register_metric

INCEPTION_MISSING = ("Inception FID needs local Inception weights: set evaluate.inception_weights "
                     "to a .pt/.pth file (nothing is downloaded)")


def check_inception_weights(weights: str | None) -> Path:
    """The weights path, or a PipelineError saying what to set."""
    if not weights:
        raise PipelineError(INCEPTION_MISSING)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise PipelineError(f"evaluate.inception_weights is {weights!r}, but no such file exists. "
                            f"{INCEPTION_MISSING}.")
    return path


def load_inception(weights: str | None) -> nn.Module:
    """Load the user's Inception network (TorchScript first, then a pickled nn.Module)."""
    path = check_inception_weights(weights)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception:  # not TorchScript: try a pickled module  # noqa: BLE001
        try:
            module = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise PipelineError(f"cannot load Inception network from {path}: {err}. Save the whole "
                                "network with torch.jit.save(torch.jit.script(net), path).") from None
    if not isinstance(module, (nn.Module, torch.jit.ScriptModule)):
        raise PipelineError(f"{path} holds a {type(module).__name__}, not a network. A state_dict is not "
                            "enough (no Inception architecture is bundled): save the whole network with "
                            "torch.jit.save(torch.jit.script(net), path).")
    return module.eval()


@torch.no_grad()
def inception_features(module: nn.Module, images: np.ndarray, size: int = 299,
                       batch_size: int = 32) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, D) float64 features from the user's network."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).float() / 255.0   # (B, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = module(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        out.append(y.reshape(y.shape[0], -1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@register_metric("inception_fid", needs=("inception",),
                 description="FID on features of the user's local Inception network")
def inception_fid(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Classic FID, only with `evaluate.inception_weights` set (see the module docstring)."""
    if "inception" not in ctx.features:
        raise PipelineError(INCEPTION_MISSING)
    return fid_from_features(*ctx.features["inception"])


@register_metric("inception_kid", needs=("inception",),
                 description="KID on features of the user's local Inception network")
def inception_kid(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Classic KID, only with `evaluate.inception_weights` set; `inception_kid_std` over subsets."""
    if "inception" not in ctx.features:
        raise PipelineError(INCEPTION_MISSING)
    mean, std = kid(*ctx.features["inception"], ctx.params.kid_subsets, ctx.params.kid_subset_size, ctx.seed)
    ctx.detail("std", std)
    return mean
