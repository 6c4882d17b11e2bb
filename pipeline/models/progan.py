"""Progressive GAN (Karras et al. 2018; METHODS.md, "Progressive GAN").

Code (vs. paper): level l works at resolution 4 * 2**l (level 0 = 4x4, the last level =
spec.resolution). Both networks hold every level from the start; `level` and `alpha` passed to
forward() choose how much of them runs, so growing never rebuilds modules or optimizers.

Schedule, counted in images shown (stylegan2-ada's cur_nimg): level 0 trains for one phase,
then each new level has a fade-in phase (alpha 0 -> 1 linearly) and a stabilise phase
(alpha = 1), each `phase_kimg` thousand images long. `progan_schedule` is a pure function of
cur_nimg, so a resumed run is exactly where it was.

    G: z (+ label embedding) -> 4x4 block -> [upsample, conv3x3, conv3x3] per level -> toRGB (1x1)
       output = (1 - alpha) * upsample(toRGB_old(h)) + alpha * toRGB_new(block(h))
    D: fromRGB (1x1) -> [conv3x3, conv3x3, avgpool] per level -> minibatch std -> conv, dense
       h = (1 - alpha) * fromRGB_old(avgpool(x)) + alpha * block(fromRGB_new(x))
       (+ projection of the label embedding on the last features when conditional)
Equalised learning rate everywhere, pixel norm after every conv in G, LeakyReLU(0.2).
Loss: wgan-gp (lambda 10) + drift 0.001 E[D(x)^2]; Adam(1e-3, 0.0, 0.99); n_critic 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.validation import positive, require
from pipeline.errors import PipelineError
from pipeline.models import losses, noise
from pipeline.models.base import DataSpec, GANFamily, Stats
from pipeline.models.base import fixed_rng as _fixed_rng
from pipeline.models.equalized import EqualizedConv2d, EqualizedLinear, MinibatchStdDev, PixelNorm


@dataclass
class Config:
    latent_dim: int = 128
    base_channels: int = 16          # channels at the final resolution; doubled per halving ...
    max_channels: int = 128          # ... up to this (the paper: 512)
    conditional: bool = True         # label embedded and concatenated to z; projection in D
    phase_kimg: float = 0.0          # fade-in and stabilise length each (paper 600); 0 = auto:
                                     # the run's total images split evenly over all phases
    batch_sizes: dict[int, int] = field(default_factory=dict)   # resolution -> batch (default: train batch)
    mbstd_group: int = 4             # minibatch-stddev group size (0 = whole batch)
    lambda_gp: float = 10.0
    drift: float = 0.001
    lr: float = 1e-3
    beta1: float = 0.0
    beta2: float = 0.99
    n_critic: int = 1
    # The paper trains at a constant lr; true applies the shared linear decay of train.common.
    lr_decay: bool = False
    # The official code (reset_opt_for_new_lod) clears Adam's moments when a resolution is added.
    reset_optimizer_on_grow: bool = True

    def validate(self, where: str) -> None:
        positive(self, where, "latent_dim", "base_channels", "max_channels", "lr", "n_critic")
        require(self.phase_kimg >= 0, f"{where}.phase_kimg", "must be 0 (auto) or positive.")
        require(self.mbstd_group >= 0, f"{where}.mbstd_group", "must be 0 (whole batch) or positive.")
        require(self.lambda_gp >= 0, f"{where}.lambda_gp", "must be 0 or positive.")
        require(self.drift >= 0, f"{where}.drift", "must be 0 or positive.")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{where}.beta1",
                "and beta2 must be in [0, 1).")
        for res, batch in self.batch_sizes.items():
            ok = str(res).isdigit() and int(res) >= 4 and _is_pow2(int(res))
            require(ok, f"{where}.batch_sizes.{res}", "must be keyed by a resolution (4, 8, 16, ...).")
            require(batch > 0, f"{where}.batch_sizes.{res}", f"must be greater than 0, got {batch!r}.")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def progan_schedule(cur_nimg: float, phase_nimg: float, max_level: int) -> tuple[int, float]:
    """(level, alpha) after `cur_nimg` images with phases of `phase_nimg` images each.

    Phase 0: level 0 (4x4), alpha 1. Then for level l = 1..max_level: a fade-in phase with alpha
    rising linearly 0 -> 1, then a stabilise phase at alpha 1. After the last one: max_level, 1.
    """
    if max_level == 0 or phase_nimg <= 0:
        return max_level, 1.0
    p = cur_nimg / phase_nimg - 1.0                # phases elapsed after the 4x4 phase
    if p < 0:
        return 0, 1.0
    step = int(p // 2)                             # growth step (0 -> level 1)
    if step >= max_level:
        return max_level, 1.0
    return step + 1, min(p - 2 * step, 1.0)


def _channels(cfg: Config, level: int, max_level: int) -> int:
    return min(cfg.max_channels, cfg.base_channels * 2 ** (max_level - level))


def _upsample(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


class ProGenerator(nn.Module):
    def __init__(self, cfg: Config, spec: DataSpec, max_level: int):
        super().__init__()
        self.latent_dim, self.max_level, self.conditional = cfg.latent_dim, max_level, cfg.conditional
        ch = [_channels(cfg, lvl, max_level) for lvl in range(max_level + 1)]
        in_dim = cfg.latent_dim * (2 if cfg.conditional else 1)
        self.embed = nn.Embedding(spec.num_classes, cfg.latent_dim) if cfg.conditional else None
        self.pnorm = PixelNorm()
        act = nn.LeakyReLU(0.2)
        # Level 0: the paper's "4x4 conv" from the latent is a dense layer to (C0, 4, 4).
        self.dense = EqualizedLinear(in_dim, ch[0] * 16, gain=math.sqrt(2) / 4)
        self.blocks = nn.ModuleList([nn.Sequential(act, PixelNorm(),
                                                   EqualizedConv2d(ch[0], ch[0], 3, padding=1), act, PixelNorm())])
        for lvl in range(1, max_level + 1):
            self.blocks.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                EqualizedConv2d(ch[lvl - 1], ch[lvl], 3, padding=1), act, PixelNorm(),
                EqualizedConv2d(ch[lvl], ch[lvl], 3, padding=1), act, PixelNorm()))
        self.to_rgb = nn.ModuleList([EqualizedConv2d(c, spec.channels, 1, gain=1.0) for c in ch])

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, level: int | None = None,
                alpha: float = 1.0) -> torch.Tensor:
        """Images (B, C, 4*2**level, 4*2**level), unbounded (clamp for display)."""
        level = self.max_level if level is None else level
        v = self.pnorm(z)                                              # (B, latent)
        if self.conditional:
            if labels is None:
                raise ValueError("conditional ProGAN generator needs labels")
            v = torch.cat([v, self.pnorm(self.embed(labels))], dim=1)
        h = self.dense(v).view(z.shape[0], -1, 4, 4)                  # (B, C0, 4, 4)
        h = self.blocks[0](h)
        for lvl in range(1, level):
            h = self.blocks[lvl](h)
        if level == 0:
            return self.to_rgb[0](h)
        new = self.to_rgb[level](self.blocks[level](h))
        if alpha >= 1:
            return new
        old = _upsample(self.to_rgb[level - 1](h))
        return (1 - alpha) * old + alpha * new


class ProDiscriminator(nn.Module):
    def __init__(self, cfg: Config, spec: DataSpec, max_level: int):
        super().__init__()
        self.max_level, self.conditional = max_level, cfg.conditional
        ch = [_channels(cfg, lvl, max_level) for lvl in range(max_level + 1)]
        act = nn.LeakyReLU(0.2)
        self.from_rgb = nn.ModuleList([nn.Sequential(EqualizedConv2d(spec.channels, c, 1), act) for c in ch])
        self.blocks = nn.ModuleList([nn.Identity()])                   # level 0 ends in `final`
        for lvl in range(1, max_level + 1):
            self.blocks.append(nn.Sequential(
                EqualizedConv2d(ch[lvl], ch[lvl], 3, padding=1), act,
                EqualizedConv2d(ch[lvl], ch[lvl - 1], 3, padding=1), act,
                nn.AvgPool2d(2)))
        self.mbstd = MinibatchStdDev(cfg.mbstd_group)
        self.final_conv = nn.Sequential(EqualizedConv2d(ch[0] + 1, ch[0], 3, padding=1), act)
        self.final_dense = nn.Sequential(EqualizedLinear(ch[0] * 16, ch[0]), act)
        self.out = EqualizedLinear(ch[0], 1, gain=1.0)
        if cfg.conditional:   # projection discriminator: score += <embed(y), features>
            self.embed = nn.Parameter(torch.randn(spec.num_classes, ch[0]))
            self.embed_scale = 1.0 / math.sqrt(ch[0])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, level: int | None = None,
                alpha: float = 1.0) -> torch.Tensor:
        """Scores (B,) for images at the level's resolution."""
        level = self.max_level if level is None else level
        h = self.from_rgb[level](x)
        if level > 0:
            h = self.blocks[level](h)
            if alpha < 1:
                h = (1 - alpha) * self.from_rgb[level - 1](F.avg_pool2d(x, 2)) + alpha * h
            for lvl in range(level - 1, 0, -1):
                h = self.blocks[lvl](h)
        h = self.final_conv(self.mbstd(h))                             # (B, C0, 4, 4)
        feat = self.final_dense(h.flatten(1))                          # (B, C0)
        score = self.out(feat).squeeze(1)
        if self.conditional:
            if labels is None:
                raise ValueError("conditional ProGAN discriminator needs labels")
            score = score + (self.embed[labels] * self.embed_scale * feat).sum(1)
        return score


class ProGAN(GANFamily):
    name = "progan"
    Config = Config
    data_kind = "labelled"
    outputs_masks = False        # noise -> image

    def __init__(self, cfg: Config, spec: DataSpec):
        super().__init__(cfg, spec)
        if spec.resolution < 4 or not _is_pow2(spec.resolution):
            raise PipelineError(f"ProGAN needs a power-of-two resolution of at least 4 "
                                f"(prepare.resolution), got {spec.resolution}.")
        self.max_level = int(math.log2(spec.resolution)) - 2
        self.G = ProGenerator(cfg, spec, self.max_level)
        self.D = ProDiscriminator(cfg, spec, self.max_level)
        self.class_conditional = cfg.conditional   # instance value overrides the ClassVar
        self._batch_sizes = {int(k): v for k, v in cfg.batch_sizes.items()}
        # Current growth state; set_progress recomputes it every iteration. The final network
        # by default, so a family built for generation uses what a finished run trained.
        self.level, self.alpha = self.max_level, 1.0

    # ---- progressive growing --------------------------------------------------------------
    @property
    def current_resolution(self) -> int:
        return 4 * 2 ** self.level

    def phase_nimg(self, total_nimg: int) -> float:
        if self.cfg.phase_kimg > 0:
            return self.cfg.phase_kimg * 1000
        return total_nimg / (2 * self.max_level + 1)

    def set_progress(self, cur_nimg: int, total_nimg: int) -> None:
        self.level, self.alpha = progan_schedule(cur_nimg, self.phase_nimg(total_nimg), self.max_level)

    def uses_lr_decay(self) -> bool:
        return self.cfg.lr_decay

    def optimizer_phase(self) -> int:
        return self.level if self.cfg.reset_optimizer_on_grow else 0

    def batch_size(self, default: int) -> int:
        return self._batch_sizes.get(self.current_resolution, default)

    def extra_state(self) -> dict:
        return {"level": self.level, "alpha": self.alpha}

    def load_extra_state(self, state: dict) -> None:
        self.level = int(state.get("level", self.level))
        self.alpha = float(state.get("alpha", self.alpha))

    def real_at_level(self, x: torch.Tensor) -> torch.Tensor:
        """Real images at the current resolution, blended like G's output during a fade-in."""
        factor = x.shape[-1] // self.current_resolution
        cur = F.avg_pool2d(x, factor) if factor > 1 else x
        if self.level > 0 and self.alpha < 1:
            low = _upsample(F.avg_pool2d(cur, 2))
            cur = (1 - self.alpha) * low + self.alpha * cur
        return cur

    # ---- losses ---------------------------------------------------------------------------
    def _labels(self, batch) -> torch.Tensor | None:
        return batch["label"] if self.cfg.conditional else None

    def _z(self, n: int, device) -> torch.Tensor:
        return noise.randn(n, self.cfg.latent_dim, device=device)

    def forward_g(self, batch):
        real = batch["image"]
        fake = self.G(self._z(real.shape[0], real.device), self._labels(batch), self.level, self.alpha)
        return {"fake": fake}   # (B, C, r, r) at the current resolution r

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        labels, level, alpha = self._labels(batch), self.level, self.alpha
        real, fake = self.real_at_level(batch["image"]), fakes["fake"]
        real_scores = self.D(real, labels, level, alpha)
        fake_scores = self.D(fake, labels, level, alpha)
        adv = losses.d_adversarial("wgan-gp", real_scores, fake_scores)
        gp = losses.gradient_penalty(lambda x: self.D(x, labels, level, alpha), real, fake)
        drift = losses.drift_penalty(real_scores)
        loss = adv + self.cfg.lambda_gp * gp + self.cfg.drift * drift
        return loss, {"D/loss": loss.item(), "D/adv": adv.item(), "D/gp": gp.item(), "D/drift": drift.item(),
                      "D/real": real_scores.mean().item(), "D/fake": fake_scores.mean().item(),
                      "D/resolution": float(self.current_resolution), "D/alpha": float(self.alpha)}

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        scores = self.D(fakes["fake"], self._labels(batch), self.level, self.alpha)
        loss = losses.g_adversarial("wgan-gp", scores)
        return loss, {"G/loss": loss.item(), "G/adv": loss.item(),
                      "G/resolution": float(self.current_resolution), "G/alpha": float(self.alpha)}

    # ---- sampling -------------------------------------------------------------------------
    def _full_size(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(x, self.spec.resolution // x.shape[-1]).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, batch, generators):
        real = batch["image"]
        with _fixed_rng(real.device):
            z = self._z(real.shape[0], real.device)
            fake = generators["G"](z, self._labels(batch), self.level, self.alpha)
        return {"real": self._full_size(self.real_at_level(real)), "fake": self._full_size(fake)}

    @torch.no_grad()
    def synthesize(self, normal, labels, region=None):
        """Noise -> images of classes `labels` at spec.resolution; ignores `normal` and `region`; masks are 0."""
        labels = labels.long()
        if labels.dim() != 1:
            raise PipelineError(f"ProGAN.synthesize: labels must have shape (B,), got {tuple(labels.shape)}.")
        if self.cfg.conditional and (labels.min() < 0 or labels.max() >= self.spec.num_classes):
            raise PipelineError(f"ProGAN.synthesize: labels must be class indices in "
                                f"0..{self.spec.num_classes - 1} "
                                f"({', '.join(self.spec.classes)}), got {labels.tolist()}.")
        device = next(self.G.parameters()).device
        labels = labels.to(device)
        z = self._z(labels.shape[0], device)
        img = self._full_size(self.G(z, labels if self.cfg.conditional else None, self.level, self.alpha))
        res = self.spec.resolution
        return img, torch.zeros(labels.shape[0], 1, res, res, device=device)
