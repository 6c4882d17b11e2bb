"""ProGAN's layer tricks (METHODS.md, "Progressive GAN"): equalised learning rate, pixelwise
feature normalisation and the minibatch standard-deviation layer.

Equalised learning rate (Karras et al. 2018, sec. 4.1): weights are stored ~N(0, 1) and
multiplied at run time by He's constant  scale = gain / sqrt(fan_in)  (gain = sqrt(2) gives
sqrt(2 / fan_in)). Adam's update is scale-invariant per parameter, so every layer then learns
at the same effective speed whatever its fan-in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.blocks import cat_channels

HE_GAIN = math.sqrt(2.0)


class EqualizedConv2d(nn.Module):
    """Conv2d whose weight ~N(0, 1) is scaled by gain / sqrt(in_channels * k * k) on every call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, gain: float = HE_GAIN):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.fan_in = in_channels * kernel_size * kernel_size
        self.scale = gain / math.sqrt(self.fan_in)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, stride={self.stride}, padding={self.padding}, scale={self.scale:.4g}"


class EqualizedLinear(nn.Module):
    """Linear layer whose weight ~N(0, 1) is scaled by gain / sqrt(in_features) on every call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = HE_GAIN):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.fan_in = in_features
        self.scale = gain / math.sqrt(self.fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"{i}, {o}, scale={self.scale:.4g}"


class PixelNorm(nn.Module):
    """b = a / sqrt(mean_c(a^2) + eps): each pixel's feature vector gets unit mean square (sec. 4.2)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, C, ...) normalised over dim 1
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)


class MinibatchStdDev(nn.Module):
    """Append one feature map: the std over the (group of the) batch, averaged over features and pixels.

    ProGAN sec. 3: for each feature and pixel take the standard deviation over the group
    (population std, sqrt(var + eps)), average it over all features and pixels into one scalar
    per group, and replicate it as an extra channel. `group_size` 0 (or one that does not divide
    the batch) uses the whole batch as a single group.
    """

    def __init__(self, group_size: int = 4, eps: float = 1e-8):
        super().__init__()
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = min(self.group_size, b) if self.group_size > 0 else b
        if b % g:
            g = b
        y = x.reshape(g, b // g, c, h, w)                          # (G, M, C, H, W): member g of group m
        y = y - y.mean(dim=0, keepdim=True)
        std = torch.sqrt(y.pow(2).mean(dim=0) + self.eps)          # (M, C, H, W)
        stat = std.mean(dim=(1, 2, 3))                              # (M,)
        stat = stat.repeat(g).reshape(b, 1, 1, 1).expand(b, 1, h, w)   # sample i belongs to group i % M
        return cat_channels([x, stat.to(x.dtype)])
