"""SPADE conditioning (METHODS.md, "SPADE") and Defect-GAN's adaptive noise insertion.

SPADE (Park et al. 2019): normalise the activation without learned affine parameters, then
modulate it per pixel with gamma(m), beta(m) predicted by a small conv net from the control
map m resized to the activation's size:

    out = gamma(m) * (h - mu) / sigma + beta(m)

As written in METHODS.md the modulation is gamma, not the paper code's (1 + gamma); the gamma
conv's bias starts at 1 so a fresh layer behaves like a plain normalisation.

The control map is a dense (B, K, H, W) tensor or a `UniformControl` (one class at every pixel
of each image, as Defect-GAN trains): then the modulation is computed once per class on a
small map and stretched (same values; bench/README.md has what it saves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import noise as sampling_noise
from pipeline.models.blocks import InstanceNorm, is_channels_last


@dataclass(frozen=True)
class UniformControl:
    """A control map holding one class at every pixel of each image, kept as (B,) class indices.

    Equivalent to the dense map one_hot(labels) repeated over H x W (`dense`). SPADE's
    modulation of such a map is the same for every image of a class and, away from the border,
    for every pixel, so SPADE never needs the dense map (`SPADE.modulation`).
    """

    labels: torch.Tensor          # (B,) long, values in [0, num_classes)
    num_classes: int

    def dense(self, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, K, *size) one-hot map (an expanded view: no per-pixel memory)."""
        onehot = F.one_hot(self.labels.long(), self.num_classes).to(dtype)
        return onehot[:, :, None, None].expand(-1, -1, *size)


def _stretch(t: torch.Tensor, dim: int, length: int, radius: int) -> torch.Tensor:
    """Stretch axis `dim` of `t` from 2 radius + 1 to `length` (> 2 radius + 1): the first and last
    `radius` entries stay, the middle one is repeated in between (a broadcast read, one write)."""
    middle = t.narrow(dim, radius, 1)
    shape = list(t.shape)
    shape[dim] = length - 2 * radius
    return torch.cat([t.narrow(dim, 0, radius), middle.expand(shape), t.narrow(dim, radius + 1, radius)], dim)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation of `channels` features by a `label_channels` control map."""

    def __init__(self, channels: int, label_channels: int, hidden: int = 64, kernel_size: int = 3,
                 norm: Literal["instance", "batch"] = "instance"):
        super().__init__()
        if norm == "instance":
            self.norm = InstanceNorm(channels)
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

    def modulation(self, control: torch.Tensor | UniformControl,
                   size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta), each (B, channels, *size), from the control map resized (nearest) to `size`."""
        if isinstance(control, UniformControl):
            return self._uniform_modulation(control, size)
        if control.shape[-2:] != torch.Size(size):
            control = F.interpolate(control, size=size, mode="nearest")
        actv = self.shared(control)
        return self.gamma(actv), self.beta(actv)

    @property
    def radius(self) -> int:
        """Receptive radius of the modulation net on the control map (shared conv, then gamma/beta)."""
        return 2 * (self.gamma.kernel_size[0] // 2)

    def _class_modulation(self, control: UniformControl, h: int, w: int) -> torch.Tensor:
        """cat(gamma, beta) (B, 2C, h', w') of a per-image constant map on a map of at most
        (2r + 1) x (2r + 1) pixels, stretched to width `w` (h' = min(h, 2r + 1)).

        Two stacked zero-padded convs of a constant map give a value that depends on the pixel
        only through its distance to each border, up to r: on a (2r + 1)-pixel map the middle pixel
        is the interior value and the edges are the image's edges. So one small map per class is
        enough; each image picks its class's map. Same numbers as the dense map at a fraction of
        the FLOPs (Defect-GAN: this net at full resolution was half of G's forward FLOPs).
        """
        r = self.radius
        sh, sw = min(h, 2 * r + 1), min(w, 2 * r + 1)
        weight = self.shared[0].weight
        classes = torch.eye(control.num_classes, device=weight.device, dtype=weight.dtype)
        actv = self.shared(classes[:, :, None, None].expand(-1, -1, sh, sw))
        small = torch.cat([self.gamma(actv), self.beta(actv)], dim=1)[control.labels.long()]
        return _stretch(small, 3, w, r) if w > sw else small

    def _uniform_modulation(self, control: UniformControl,
                            size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-size (gamma, beta) of a per-image constant map (for callers that want the maps;
        forward does without them)."""
        h, w = size
        full = self._class_modulation(control, h, w)
        if h > full.shape[2]:
            full = _stretch(full, 2, h, self.radius)
        gamma, beta = full.split(self.gamma.out_channels, dim=1)
        return gamma, beta

    def _modulate_uniform(self, normalized: torch.Tensor, control: UniformControl) -> torch.Tensor:
        """gamma * normalized + beta for a per-image constant map without full-size gamma/beta:
        rows further than r from the top and bottom share one (B, C, 1, W) row of gamma/beta, which
        broadcasts; only the r top and r bottom rows need their own."""
        h, w = normalized.shape[-2:]
        r, C = self.radius, self.gamma.out_channels
        gb = self._class_modulation(control, h, w)                        # (B, 2C, min(h, 2r + 1), W)

        def modulate(rows: torch.Tensor, gb_rows: torch.Tensor) -> torch.Tensor:
            gamma, beta = gb_rows.split(C, dim=1)
            return torch.addcmul(beta, rows, gamma)

        if h <= gb.shape[2]:
            out = modulate(normalized, gb)
        else:
            out = torch.cat([modulate(normalized[:, :, :r], gb[:, :, :r]),
                             modulate(normalized[:, :, r:h - r], gb[:, :, r:r + 1]),
                             modulate(normalized[:, :, h - r:], gb[:, :, r + 1:])], dim=2)
        if is_channels_last(normalized) and not is_channels_last(out):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def forward(self, x: torch.Tensor, control: torch.Tensor | UniformControl) -> torch.Tensor:
        normalized = self.norm(x)                                  # (B, C, H, W), param-free
        if isinstance(control, UniformControl):
            return self._modulate_uniform(normalized, control)
        gamma, beta = self.modulation(control, x.shape[-2:])
        return gamma * normalized + beta


class NoiseInjection(nn.Module):
    """x + weight * noise: one learned scale per channel (init 0), one noise map per sample.

    Defect-GAN's "adaptive noise insertion" (as StyleGAN's per-layer noise): noise (B, 1, H, W)
    ~N(0, 1) is drawn through pipeline.models.noise unless given (the global torch RNG in training,
    each sample's own stream at generation), and broadcast over channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            b, _, h, w = x.shape
            noise = sampling_noise.randn(b, 1, h, w, device=x.device, dtype=x.dtype)
        # In the weight's dtype the bf16 activations would be promoted to fp32 for the rest of
        # the network (autocast does not cover elementwise ops).
        return x + self.weight.to(x.dtype) * noise


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

    def forward(self, x: torch.Tensor, control: torch.Tensor | UniformControl) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, control)) if self.learned_shortcut else x
        dx = self.conv_0(self.act(self.norm_0(x, control)))
        if self.noise_0 is not None:
            dx = self.noise_0(dx)
        dx = self.conv_1(self.act(self.norm_1(dx, control)))
        if self.noise_1 is not None:
            dx = self.noise_1(dx)
        return shortcut + dx
