"""Exponential moving average of generator weights, used for sampling and export (ProGAN: 0.999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(module).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live for parameters; buffers (BN stats) are copied."""
    ema_params = list(ema.parameters())
    live_params = [p.detach() for p in live.parameters()]
    torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)
    for b_ema, b_live in zip(ema.buffers(), live.buffers()):
        b_ema.copy_(b_live)
