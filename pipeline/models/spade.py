"""SPADE conditioning (METHODS.md, "SPADE") and Defect-GAN's adaptive noise insertion.

SPADE (Park et al. 2019): normalise the activation without learned affine parameters, then
modulate it per pixel with gamma(m), beta(m) predicted by a small conv net from the control
map m resized to the activation's size:

    out = gamma(m) * (h - mu) / sigma + beta(m)

As written in METHODS.md the modulation is gamma, not the paper code's (1 + gamma); the gamma
conv's bias starts at 1 so a fresh layer behaves like a plain normalisation.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class SPADE(nn.Module):
    """Spatially-adaptive normalisation of `channels` features by a `label_channels` control map."""

    def __init__(self, channels: int, label_channels: int, hidden: int = 64, kernel_size: int = 3,
                 norm: Literal["instance", "batch"] = "instance"):
        super().__init__()
        if norm == "instance":
            self.norm = nn.InstanceNorm2d(channels, affine=False)
        elif norm == "batch":
            self.norm = nn.BatchNorm2d(channels, affine=False)
        else:
            raise ValueError(f"SPADE norm must be 'instance' or 'batch', got {norm!r}")
        pad = kernel_size // 2
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, kernel_size, padding=pad), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        self.beta = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def modulation(self, control: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta), each (B, channels, *size), from the control map resized (nearest) to `size`."""
        if control.shape[-2:] != torch.Size(size):
            control = F.interpolate(control, size=size, mode="nearest")
        actv = self.shared(control)
        return self.gamma(actv), self.beta(actv)

    def forward(self, x: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        normalized = self.norm(x)                                  # (B, C, H, W), param-free
        gamma, beta = self.modulation(control, x.shape[-2:])
        return gamma * normalized + beta


class NoiseInjection(nn.Module):
    """x + weight * noise: one learned scale per channel (init 0), one noise map per sample.

    Defect-GAN's "adaptive noise insertion" (as StyleGAN's per-layer noise): noise (B, 1, H, W)
    ~N(0, 1) is drawn from the global torch RNG unless given, and broadcast over channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            b, _, h, w = x.shape
            noise = torch.randn(b, 1, h, w, device=x.device, dtype=x.dtype)
        return x + self.weight * noise


class SPADEResBlock(nn.Module):
    """Two SPADE -> LeakyReLU -> conv3x3 (-> noise) layers plus a shortcut (SPADE ResBlk).

    The shortcut is learned (SPADE -> 1x1 conv, no bias) when in/out channels differ, identity
    otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, label_channels: int, hidden: int = 64,
                 noise: bool = True, norm: Literal["instance", "batch"] = "instance"):
        super().__init__()
        mid = min(in_channels, out_channels)
        self.norm_0 = SPADE(in_channels, label_channels, hidden, norm=norm)
        self.conv_0 = nn.Conv2d(in_channels, mid, 3, padding=1)
        self.norm_1 = SPADE(mid, label_channels, hidden, norm=norm)
        self.conv_1 = nn.Conv2d(mid, out_channels, 3, padding=1)
        self.noise_0 = NoiseInjection(mid) if noise else None
        self.noise_1 = NoiseInjection(out_channels) if noise else None
        self.learned_shortcut = in_channels != out_channels
        if self.learned_shortcut:
            self.norm_s = SPADE(in_channels, label_channels, hidden, norm=norm)
            self.conv_s = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, control)) if self.learned_shortcut else x
        dx = self.conv_0(self.act(self.norm_0(x, control)))
        if self.noise_0 is not None:
            dx = self.noise_0(dx)
        dx = self.conv_1(self.act(self.norm_1(dx, control)))
        if self.noise_1 is not None:
            dx = self.noise_1(dx)
        return shortcut + dx
