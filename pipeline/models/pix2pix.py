"""Pix2Pix (Isola et al. 2017): paired image-to-image translation, clean surface a -> defective b.

    G: U-Net a -> b (skips, dropout as noise)
    D: PatchGAN on the pair, channel concat [a, b] -> grid of real/fake logits
    L_D = 0.5 (L_adv(D(a, b), real) + L_adv(D(a, G(a)), fake))   ("divide the objective by 2
          while optimizing D, which slows down the rate at which D learns relative to G")
    L_G = L_adv(D(a, G(a))) + lambda_l1 ||G(a) - b||_1           (lambda_l1 = 100)

Adversarial loss: the paper trains G to maximise log D(x, G(x)) with BCE on logits, which is
`nonsaturating` in losses.py (`vanilla` there is the saturating minimax form); that is the default.
One defect domain, so `class_conditional` is False.

Inference (`inference: paper`, the default): as the paper, "at inference time, we run the generator
net in exactly the same manner as during the training phase": dropout stays on (G's only noise
source) and batch norm uses the test batch's statistics, with the paper's test batch of one image,
i.e. each image's own statistics (blocks.BatchNorm.per_sample_stats). So the EMA generator's copied
running statistics are never used, and an image's output depends only on it and the RNG, not on its
batch. `inference: eval` is the usual eval mode (running statistics, no dropout).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from pipeline.validation import positive, require
from pipeline.errors import ParamsError
from pipeline.models import losses
from pipeline.models.base import DataSpec, GANFamily, Stats
from pipeline.models.blocks import (BatchNorm, PatchDiscriminator, UnetGenerator, difference_mask, init_weights,
                                    patch_layers_for)

# Losses that suit a normalised PatchGAN (no weight clipping, no per-sample gradient penalty).
PATCH_LOSSES = ("vanilla", "nonsaturating", "lsgan", "hinge")


@dataclass
class Config:
    loss: str = "nonsaturating"      # BCE-with-logits, as in the paper (see module docstring)
    lambda_l1: float = 100.0
    base_channels: int = 64          # G: C64 at the outer level
    num_downs: Optional[int] = None  # U-Net depth; None: log2(resolution) (8 at 256 px, 1x1 bottleneck)
    dropout: bool = True             # decoder dropout 0.5 in the 512-channel levels
    d_base_channels: int = 64
    d_layers: int = 3                # 70x70 PatchGAN; capped so the grid stays >= 2x2 at small sizes
    norm: Literal["batch", "instance"] = "batch"
    inference: Literal["paper", "eval"] = "paper"   # see the module docstring
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999

    def validate(self, where: str) -> None:
        require(self.loss in PATCH_LOSSES, f"{where}.loss",
                f"must be one of {', '.join(PATCH_LOSSES)} (pix2pix's PatchGAN is not a WGAN critic), "
                f"got {self.loss!r}.")
        require(self.inference in ("paper", "eval"), f"{where}.inference",
                f"must be 'paper' (test-time dropout, per-image statistics) or 'eval', got {self.inference!r}.")
        positive(self, where, "base_channels", "d_base_channels", "d_layers", "lr")
        require(self.lambda_l1 >= 0, f"{where}.lambda_l1", "must be 0 or more.")
        if self.num_downs is not None:
            require(self.num_downs >= 2, f"{where}.num_downs", f"must be at least 2, got {self.num_downs}.")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"{where}.{name}", "must be in [0, 1).")


class Pix2Pix(GANFamily):
    name = "pix2pix"
    Config = Config
    data_kind = "paired"
    class_conditional = False

    def __init__(self, cfg: Config, spec: DataSpec):
        super().__init__(cfg, spec)
        res, c = spec.resolution, spec.channels
        if cfg.num_downs is not None and res % (2 ** cfg.num_downs):
            raise ParamsError(f"train.pix2pix.num_downs={cfg.num_downs} needs a resolution divisible by "
                              f"{2 ** cfg.num_downs}, got {res}.")
        if cfg.num_downs is None and res & (res - 1):
            raise ParamsError(f"pix2pix's default U-Net depth needs a power-of-two resolution, got {res}; "
                              "set train.pix2pix.num_downs.")
        self.G = init_weights(UnetGenerator(c, c, cfg.base_channels, cfg.num_downs, cfg.norm,
                                            resolution=res, dropout=cfg.dropout))
        self.D = init_weights(PatchDiscriminator(2 * c, cfg.d_base_channels, patch_layers_for(res, cfg.d_layers),
                                                 norm=cfg.norm))

    # ---- losses ---------------------------------------------------------------------------
    def forward_g(self, batch):
        return {"fake": self.G(batch["a"])}                       # (B, C, H, W) translated a -> b

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        a, b = batch["a"], batch["b"]
        real, _ = self.D(torch.cat([a, b], 1))                    # D sees the pair (conditional GAN)
        fake, _ = self.D(torch.cat([a, fakes["fake"]], 1))
        adv = 0.5 * losses.d_adversarial(self.cfg.loss, real, fake)
        return adv, {"D/adv": adv.item(), "D/real": real.mean().item(), "D/fake": fake.mean().item()}

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        a, b, fake_b = batch["a"], batch["b"], fakes["fake"]
        score, _ = self.D(torch.cat([a, fake_b], 1))
        adv = losses.g_adversarial(self.cfg.loss, score)
        l1 = losses.l1(fake_b, b)
        loss = adv + self.cfg.lambda_l1 * l1
        return loss, {"G/adv": adv.item(), "G/l1": l1.item()}

    # ---- sampling -------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference_mode(self, G: nn.Module):
        """G as the paper runs it at test time (module docstring); restores G's modes after."""
        if self.cfg.inference != "paper":
            yield G
            return
        dropouts = [m for m in G.modules() if isinstance(m, nn.Dropout)]
        norms = [m for m in G.modules() if isinstance(m, BatchNorm)]
        was_training = [m.training for m in dropouts]
        for m in dropouts:
            m.train()
        for m in norms:
            m.per_sample_stats = True
        try:
            yield G
        finally:
            for m, flag in zip(dropouts, was_training):
                m.train(flag)
            for m in norms:
                m.per_sample_stats = False

    @torch.no_grad()
    def sample(self, batch, generators):
        a, b = batch["a"], batch["b"]
        with self.inference_mode(generators["G"]) as G:
            out = G(a)
        mask = difference_mask(out, a).expand_as(a) * 2 - 1
        return {"input": a, "translated": out, "target": b, "mask": mask}

    @torch.no_grad()
    def synthesize(self, normal, labels, region=None):
        with self.inference_mode(self.G) as G:
            out = G(normal)
        return out, difference_mask(out, normal)
