"""Network building blocks shared by the GAN families.

    norm_layer / init_weights   the Pix2Pix/CycleGAN conventions (instance norm without affine,
                                N(0, 0.02) init)
    SmallMapConv2d              nn.Conv2d that computes a large layer with a tiny output map as
                                one matrix product on the CPU (StarGAN's / Defect-GAN's D)
    PatchDiscriminator          70x70 PatchGAN (Pix2Pix, CycleGAN) + optional auxiliary
                                classifier head (AC-GAN, StarGAN, Defect-GAN)
    ResnetBlock / ResnetGenerator   CycleGAN's generator (Johnson et al.), StarGAN's backbone
    UnetGenerator               Pix2Pix's U-Net with skip connections
    DCGANGenerator / DCGANDiscriminator   DCGAN, optionally conditional (cGAN / AC-GAN)
    difference_mask             |out - in| mask for families without a mask output

All discriminators return raw scores (logits); losses live in `pipeline/models/losses.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from pipeline.models import noise

NORMS = ("instance", "instance-affine", "batch", "none")


# --------------------------------------------------------------------------- helpers

class InstanceNorm(nn.Module):
    """Instance normalisation (per sample and channel over H x W, no running statistics).

    Computed as group norm with one group per channel, which is the same normalisation as
    nn.InstanceNorm2d, but keeps the input's memory format: torch's instance norm returns a
    contiguous tensor, so in a channels_last network every norm layer cost two layout copies
    and channels_last lost (bench/README.md). No affine parameters (the CycleGAN/Pix2Pix/SPADE
    convention) unless `affine` (StarGAN's generator: a learned per-channel scale and shift,
    parameters `weight` / `bias` as in nn.InstanceNorm2d(affine=True)).
    """

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = False):
        super().__init__()
        self.num_channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and is_channels_last(x):
            # torch's bf16 group-norm backward on channels_last is ~4x slower than on NCHW plus the
            # two layout copies (measured at 32 x 64 x 128 x 128: 494 vs 216 ms fwd + bwd).
            out = F.group_norm(x.contiguous(), self.num_channels, self.weight, self.bias, self.eps)
            return out.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_channels, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class SmallMapConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, state_dict and initialisation) that, on the CPU, computes a
    layer with a large weight and a tiny output map as one matrix product over the unfolded
    input patches (im2col + GEMM) instead of through torch's convolution kernel.

    Same convolution, same gradients (first and second order: the gradient penalty's double
    backward goes through unfold and matmul); only the order of the floating-point sums differs
    (relative difference ~5e-7 in fp32). Why: the deep end of StarGAN's D at 128 px, 1024 -> 2048
    channels 4x4 from 4x4 to 2x2 pixels (a 33.5 M-parameter weight, 64 output rows at batch 16),
    took 45 % of StarGAN's training step through the convolution kernel. Forward + backward on 2
    Xeon cores (AMX), batch 16, bf16 autocast: 294 -> 81 ms, with the gradient penalty's double
    backward 740 -> 174 ms; 512 -> 1024 from 8x8 to 4x4: 59 -> 19 ms; fp32 gains too (211 -> 62
    ms). Below `MIN_GEMM_WEIGHT` elements or above `MAX_GEMM_POSITIONS` output positions the kernel
    is as fast or faster (256 -> 512 from 16x16 with the penalty: 51 vs 59 ms; the 2048 -> 1 3x3
    source head: 1.8 vs 4.6 ms), so those layers keep it. Whole StarGAN step at 128 px: 1.80x
    (bench/bench_small_map_conv.py, bench/results/train_step_small_map_gemm_2026-12-06.md). CUDA
    keeps cuDNN.
    `gemm_small_maps = False` (set_small_map_gemm) turns the route off, for the ablation.
    """

    MAX_GEMM_POSITIONS = 16          # output map of at most 4x4
    MIN_GEMM_WEIGHT = 2 ** 20        # weight elements (256 -> 512 channels at 4x4 is 2 M)
    gemm_small_maps: bool = True

    def routes_to_gemm(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the matrix-product route."""
        return self._gemm_output_size(x) is not None

    def _gemm_output_size(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The output map (h, w) when forward(x) takes the matrix-product route, else None."""
        if not (self.gemm_small_maps and x.device.type == "cpu" and x.dim() == 4 and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and self.weight.numel() >= self.MIN_GEMM_WEIGHT):
            return None
        h, w = ((x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                // self.stride[i] + 1 for i in range(2))
        return (h, w) if h * w <= self.MAX_GEMM_POSITIONS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self._gemm_output_size(x)
        if size is None:
            return super().forward(x)
        (h, w), n = size, x.shape[0]
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                           stride=self.stride)                                  # (B, C k k, h w)
        # One 2-D product (C_out, C k k) x (C k k, B h w): a batched matmul against the weight
        # would, in the gradient penalty's double backward, copy the weight once per sample; and
        # the weight goes in as stored, so autocast's bf16 cast of it reads memory in order.
        columns = patches.transpose(0, 1).reshape(patches.shape[1], n * h * w)
        out = self.weight.flatten(1) @ columns                                  # (C_out, B h w)
        if self.bias is not None:
            out = out + self.bias[:, None].to(out.dtype)
        out = out.view(self.out_channels, n, h, w).transpose(0, 1)              # (B, C_out, h, w)
        return out.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def set_small_map_gemm(module: nn.Module, enabled: bool) -> int:
    """Turn SmallMapConv2d's matrix-product route on or off in every layer of `module`; returns
    how many layers have the switch."""
    layers = [m for m in module.modules() if isinstance(m, SmallMapConv2d)]
    for m in layers:
        m.gemm_small_maps = enabled
    return len(layers)


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor stored channels_last (and not also plain contiguous, e.g. C = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def cat_channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along channels, in the first tensor's memory format.

    torch.cat of a channels_last image and an expanded label/stat map returns a plain contiguous
    tensor, which would make the next conv (and its backward) run in the slow mixed layout.
    """
    out = torch.cat(tensors, 1)
    if is_channels_last(tensors[0]) and not is_channels_last(out):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class Dropout(nn.Dropout):
    """nn.Dropout (same module, no state) whose mask is drawn through pipeline.models.noise: the
    global RNG in training, each sample's own stream at generation (Pix2Pix keeps dropout on at
    test time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return noise.dropout(x, self.p, self.training, self.inplace)


class BatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state_dict) that can also normalise each
    sample by its own statistics (`per_sample_stats = True`): what train-mode batch norm does on a
    batch of one image, without touching the running statistics. Pix2Pix's test-time inference
    ("batch normalization using the statistics of the test batch", batch size 1) uses it, so an
    image's output does not depend on which other images share its batch."""

    per_sample_stats: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_sample_stats:
            return F.instance_norm(x, None, None, self.weight, self.bias, use_input_stats=True, eps=self.eps)
        return super().forward(x)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """'instance' (no affine, no running stats, as in CycleGAN/Pix2Pix), 'instance-affine'
    (learned scale and shift, as in StarGAN), 'batch' or 'none'."""
    if kind in ("instance", "instance-affine"):
        return InstanceNorm(channels, affine=kind == "instance-affine")
    if kind == "batch":
        return BatchNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; known: {', '.join(NORMS)}")


def _uses_bias(norm: str) -> bool:
    # A conv followed by batch norm or affine instance norm does not need a bias (the norm's shift
    # replaces it; StarGAN's convs have bias=False); plain instance norm has no affine shift, so
    # the conv keeps its bias (as in the Pix2Pix code).
    return norm not in ("batch", "instance-affine")


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """Pix2Pix/CycleGAN/DCGAN init: conv/linear weights ~ N(0, gain), biases 0, BN weights ~ N(1, gain).

    Spectrally normalised convs are initialised through their `original` weight. Returns `module`.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if parametrize.is_parametrized(m, "weight"):
                weight = m.parametrizations.weight.original
            else:
                weight = m.weight
            with torch.no_grad():
                weight.normal_(0.0, gain)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.normal_(1.0, gain)
                m.bias.zero_()
    return module


def difference_mask(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Mask for families without a mask output: |out - inp| averaged over channels, divided by
    its per-image maximum so it spans [0, 1]. (B, C, H, W) x2 -> (B, 1, H, W)."""
    diff = (out.float() - inp.float()).abs().mean(1, keepdim=True)          # (B, 1, H, W)
    peak = diff.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return (diff / peak).clamp(0, 1)


def _max_patch_layers(resolution: int) -> int:
    """Most strided layers a PatchDiscriminator can have at `resolution` and still output a 2x2 grid."""
    return max(1, int(math.log2(resolution)) - 2)


def patch_layers_for(resolution: int, n_layers: int) -> int:
    """`n_layers` capped so the patch grid is at least 2x2 (n_layers=3, the 70x70 PatchGAN, needs
    32 px; 16 px images get 2 layers, a 34x34 receptive field)."""
    return max(1, min(n_layers, _max_patch_layers(resolution)))


# --------------------------------------------------------------------------- PatchGAN

class PatchDiscriminator(nn.Module):
    """PatchGAN (Pix2Pix/CycleGAN `NLayerDiscriminator`), optionally with an auxiliary classifier.

    Layers (C64-C128-C256-C512 in the paper for n_layers=3):
        conv4 s2 -> LReLU(0.2)                                   (no norm on the first layer)
        (n_layers - 1) x [conv4 s2 -> norm -> LReLU(0.2)]
        conv4 s1 -> norm -> LReLU(0.2)                           = the last feature map
        source head: conv4 s1 -> 1 channel                       (B, 1, h, w) patch scores
        class head:  conv4 s1 -> num_classes, global mean         (B, num_classes) logits
    n_layers=3 gives the 70x70 receptive field. Input must be at least 2**(n_layers + 2) px
    (use `patch_layers_for`). Each patch score is a logit; no sigmoid.
    """

    def __init__(self, in_channels: int, base_channels: int = 64, n_layers: int = 3,
                 num_classes: int = 0, norm: str = "instance", spectral_norm: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
        sn = _spectral_norm if spectral_norm else (lambda m: m)
        bias = _uses_bias(norm)
        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, base_channels, 4, 2, 1)),
                                   nn.LeakyReLU(0.2, inplace=True)]
        ch = base_channels
        for n in range(1, n_layers):                         # stride-2 layers, channels x2 up to 8x
            out = base_channels * min(2 ** n, 8)
            layers += [sn(nn.Conv2d(ch, out, 4, 2, 1, bias=bias)), norm_layer(norm, out),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        out = base_channels * min(2 ** n_layers, 8)          # one stride-1 layer before the heads
        layers += [sn(nn.Conv2d(ch, out, 4, 1, 1, bias=bias)), norm_layer(norm, out),
                   nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.source = sn(nn.Conv2d(out, 1, 4, 1, 1))
        self.classifier = sn(nn.Conv2d(out, num_classes, 4, 1, 1)) if num_classes > 0 else None
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.features(x)                                  # (B, C', h+1, w+1)
        scores = self.source(h)                               # (B, 1, h, w)
        logits = None
        if self.classifier is not None:
            logits = self.classifier(h).mean(dim=(2, 3))      # (B, num_classes)
        return scores, logits

    def receptive_field(self) -> int:
        """Receptive field (px) of one patch score, from the conv layers' kernels and strides."""
        rf, jump = 1, 1
        for m in [*self.features, self.source]:
            if isinstance(m, nn.Conv2d):
                rf += (m.kernel_size[0] - 1) * jump
                jump *= m.stride[0]
        return rf


# --------------------------------------------------------------------------- StarGAN's D

def stargan_d_layers(resolution: int, n_layers: int) -> int:
    """`n_layers` stride-2 convs capped so the final map is at least 2x2 (StarGAN: 6 at 128 px)."""
    return max(1, min(n_layers, int(math.log2(resolution)) - 1))


class StarGANDiscriminator(nn.Module):
    """StarGAN's discriminator (yunjey/stargan model.py), which Defect-GAN's paper also uses.

        n_layers x [conv4 s2 -> LReLU(0.01)], channels base, 2 base, 4 base, ... (doubling, no cap)
        source head: conv3 s1 p1 -> 1 channel, no bias            (B, 1, h, w) patch scores
        class head:  conv (h x w) over the whole final map, no bias  (B, num_classes) logits
    No normalisation (a WGAN-GP critic's gradient penalty is per sample). At 128 px, 6 layers,
    base 64 and 5 classes this is the reference's 44.8 M parameters. `n_layers` is capped by
    `stargan_d_layers` so the final map stays at least 2x2 on small images.
    """

    def __init__(self, in_channels: int, resolution: int, base_channels: int = 64, n_layers: int = 6,
                 num_classes: int = 0):
        super().__init__()
        n_layers = stargan_d_layers(resolution, n_layers)
        # SmallMapConv2d: the deep layers' large weights on tiny maps run as one matrix product.
        layers: list[nn.Module] = [SmallMapConv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.01)]
        ch = base_channels
        for _ in range(1, n_layers):
            layers += [SmallMapConv2d(ch, ch * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            ch *= 2
        self.features = nn.Sequential(*layers)
        final = resolution // 2 ** n_layers
        self.source = nn.Conv2d(ch, 1, 3, 1, 1, bias=False)
        self.classifier = nn.Conv2d(ch, num_classes, final, bias=False) if num_classes > 0 else None
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.features(x)                                   # (B, C', res / 2^n, res / 2^n)
        scores = self.source(h)                                # (B, 1, h, w)
        logits = self.classifier(h).flatten(1) if self.classifier is not None else None   # (B, K)
        return scores, logits


D_ARCHS = ("stargan", "patchgan")


def class_discriminator(arch: str, in_channels: int, resolution: int, base_channels: int, n_layers: int,
                        num_classes: int) -> nn.Module:
    """The critic + auxiliary classifier of StarGAN / Defect-GAN: 'stargan' (the papers' D) or
    'patchgan' (a 70 px PatchGAN whose class logits are averaged over patches; lighter)."""
    if arch == "stargan":
        return StarGANDiscriminator(in_channels, resolution, base_channels, n_layers, num_classes)
    if arch == "patchgan":
        return PatchDiscriminator(in_channels, base_channels, patch_layers_for(resolution, n_layers),
                                  num_classes=num_classes, norm="none")
    raise ValueError(f"unknown discriminator {arch!r}; known: {', '.join(D_ARCHS)}")


# --------------------------------------------------------------------------- ResNet generator

class ResnetBlock(nn.Module):
    """x + [pad1 conv3 norm ReLU pad1 conv3 norm](x): CycleGAN's R256 block (reflection padding)
    or StarGAN's residual block (`padding="zeros"`)."""

    def __init__(self, channels: int, norm: str = "instance", padding: str = "reflect"):
        super().__init__()
        bias = _uses_bias(norm)

        def conv3() -> list[nn.Module]:
            if padding == "reflect":
                return [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias)]
            return [nn.Conv2d(channels, channels, 3, padding=1, bias=bias)]

        self.block = nn.Sequential(*conv3(), norm_layer(norm, channels), nn.ReLU(inplace=True),
                                   *conv3(), norm_layer(norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN generator: c7s1-64, d128, d256, n_blocks x R256, u128, u64, c7s1-out, tanh.

    `n_down` stride-2 downsamplings (channels x2 each) and as many transposed-conv ups;
    the paper uses 6 blocks at 128 px and 9 at 256 px. Input H, W must be divisible by 2**n_down.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64,
                 n_blocks: int = 6, n_down: int = 2, norm: str = "instance"):
        super().__init__()
        bias = _uses_bias(norm)
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, base_channels, 7, bias=bias),
                                   norm_layer(norm, base_channels), nn.ReLU(inplace=True)]
        ch = base_channels
        for _ in range(n_down):                                                    # dk
            layers += [nn.Conv2d(ch, ch * 2, 3, 2, 1, bias=bias), norm_layer(norm, ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [ResnetBlock(ch, norm) for _ in range(n_blocks)]                 # Rk
        for _ in range(n_down):                                                    # uk
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1, bias=bias),
                       norm_layer(norm, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]   # c7s1-out
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)                                  # (B, out, H, W) in [-1, 1]


# --------------------------------------------------------------------------- U-Net generator

class _UnetBlock(nn.Module):
    """One U-Net level: down -> submodule -> up, output concatenated with the input (skip).

    Outermost: conv down, ..., ReLU, convT up, tanh (no skip concat on the output).
    Innermost: LReLU conv down (no norm: 1x1 at the bottleneck), ReLU convT up, norm.
    """

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int, submodule: nn.Module | None,
                 outermost: bool, innermost: bool, norm: str, dropout: bool):
        super().__init__()
        self.outermost = outermost
        bias = _uses_bias(norm)
        down_conv = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=bias)
        if outermost:
            down = [down_conv]
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1), nn.Tanh()]
            layers = down + [submodule] + up
        elif innermost:
            down = [nn.LeakyReLU(0.2, True), down_conv]
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=bias), norm_layer(norm, outer_nc)]
            layers = down + up
        else:
            down = [nn.LeakyReLU(0.2, True), down_conv, norm_layer(norm, inner_nc)]
            up = [nn.ReLU(True), nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=bias),
                  norm_layer(norm, outer_nc)]
            layers = down + [submodule] + up + ([Dropout(0.5)] if dropout else [])
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)               # skip connection


class UnetGenerator(nn.Module):
    """Pix2Pix U-Net (encoder C64-C128-C256-C512-C512..., decoder mirrored with skips), tanh output.

    Depth: `num_downs` stride-2 levels; when None it is log2(`resolution`), which takes the
    bottleneck to 1x1 as the paper's 8 levels do at 256 px. We take the resolution explicitly
    (keyword `resolution`) rather than inferring it at the first forward, so every parameter
    exists before the optimizer is built. `dropout` (p=0.5) sits in the decoder's 512-channel
    levels below the bottleneck's neighbours, as in the paper (the source of G's noise).
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 64,
                 num_downs: int | None = None, norm: str = "batch", *, resolution: int | None = None,
                 dropout: bool = True):
        super().__init__()
        if num_downs is None:
            if resolution is None:
                raise ValueError("UnetGenerator needs num_downs or resolution")
            num_downs = int(math.log2(resolution))
        if num_downs < 2:
            raise ValueError(f"UnetGenerator needs num_downs >= 2, got {num_downs}")
        self.num_downs = num_downs
        widths = [base_channels * min(2 ** i, 8) for i in range(num_downs)]   # level i's inner width
        # Build from the bottleneck outwards. Level i maps widths[i-1] -> widths[i] channels.
        block: nn.Module = _UnetBlock(widths[-2], widths[-1], widths[-2], None, False, True, norm, False)
        for i in range(num_downs - 2, 0, -1):
            inner, outer = widths[i], widths[i - 1]
            deep = inner == outer == base_channels * 8
            block = _UnetBlock(outer, inner, outer, block, False, False, norm, dropout and deep)
        self.model = _UnetBlock(out_channels, widths[0], in_channels, block, True, False, norm, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)                                  # (B, out, H, W) in [-1, 1]


# --------------------------------------------------------------------------- DCGAN

def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(labels.long(), num_classes).to(dtype)


class DCGANGenerator(nn.Module):
    """DCGAN G: z (+ one-hot class, cGAN/AC-GAN) -> 4x4 -> strided transposed convs -> tanh.

        convT4 s1 (1x1 -> 4x4), BN, ReLU; [convT4 s2, BN, ReLU] x (log2(res) - 3); convT4 s2 -> C, tanh.
    Widths halve at each up, from base_channels * 2**(ups - 1) (at most 8x) down to base_channels.
    """

    def __init__(self, z_dim: int, channels: int, resolution: int, base_channels: int, num_classes: int = 0):
        super().__init__()
        ups = int(math.log2(resolution)) - 2                 # 4 -> resolution
        if 2 ** (ups + 2) != resolution or ups < 1:
            raise ValueError(f"DCGAN needs a power-of-two resolution >= 8, got {resolution}")
        self.z_dim, self.num_classes = z_dim, num_classes
        ch = base_channels * min(2 ** (ups - 1), 8)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim + num_classes, ch, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(ups - 1):
            out = max(ch // 2, base_channels)
            layers += [nn.ConvTranspose2d(ch, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("conditional DCGANGenerator needs labels")
            z = torch.cat([z, _one_hot(labels, self.num_classes, z.dtype)], 1)   # cGAN: [z, c]
        return self.model(z[:, :, None, None])               # (B, C, res, res)


class DCGANDiscriminator(nn.Module):
    """DCGAN D: conv4 s2 + LReLU(0.2) (no norm first), [conv4 s2, norm, LReLU] down to 4x4, conv4 -> 1.

    conditioning: 'none'; 'cgan' (one-hot label replicated over H x W, concatenated to the image);
    'acgan' (a second 4x4 head outputs class logits). forward(x, labels) -> (scores (B,), logits or None).
    norm 'batch' as in DCGAN; use 'none' for WGAN-GP critics (GP is per-sample).
    """

    def __init__(self, channels: int, resolution: int, base_channels: int, num_classes: int = 0,
                 conditioning: str = "none", norm: str = "batch", spectral_norm: bool = False):
        super().__init__()
        if conditioning not in ("none", "cgan", "acgan"):
            raise ValueError(f"unknown conditioning {conditioning!r}; known: none, cgan, acgan")
        if conditioning != "none" and num_classes < 1:
            raise ValueError(f"conditioning {conditioning!r} needs num_classes > 0")
        downs = int(math.log2(resolution)) - 2                # resolution -> 4
        if 2 ** (downs + 2) != resolution or downs < 1:
            raise ValueError(f"DCGAN needs a power-of-two resolution >= 8, got {resolution}")
        self.conditioning, self.num_classes = conditioning, num_classes
        sn = _spectral_norm if spectral_norm else (lambda m: m)
        in_ch = channels + (num_classes if conditioning == "cgan" else 0)
        layers: list[nn.Module] = [sn(nn.Conv2d(in_ch, base_channels, 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        ch = base_channels
        for _ in range(downs - 1):
            out = min(ch * 2, base_channels * 8)
            layers += [sn(nn.Conv2d(ch, out, 4, 2, 1, bias=_uses_bias(norm))), norm_layer(norm, out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        self.features = nn.Sequential(*layers)                # (B, ch, 4, 4)
        self.source = sn(nn.Conv2d(ch, 1, 4, 1, 0))
        self.classifier = sn(nn.Conv2d(ch, num_classes, 4, 1, 0)) if conditioning == "acgan" else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.conditioning == "cgan":
            if labels is None:
                raise ValueError("cGAN discriminator needs labels")
            c = _one_hot(labels, self.num_classes, x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = cat_channels([x, c])                          # (B, C + K, H, W)
        h = self.features(x)
        scores = self.source(h).flatten(1).squeeze(1)         # (B,)
        logits = self.classifier(h).flatten(1) if self.classifier is not None else None   # (B, K)
        return scores, logits
