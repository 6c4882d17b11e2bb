"""DCGAN (Radford et al. 2016), optionally class-conditional: cGAN (Mirza & Osindero) or AC-GAN (Odena et al.).

Noise-based: G(z[, c]) makes an image from z ~ N(0, I); the normal image given to `synthesize`
is ignored and masks are zeros.

    conditioning  G input        D input                D heads
    none          z              x                      real/fake
    cgan          [z, one_hot c] [x, one_hot c per px]  real/fake
    acgan         [z, one_hot c] x                      real/fake + class logits; both real and
                                                        fake pay the classification loss
Fakes are made for the batch's own labels, so G sees the data's class frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from pipeline.validation import positive, require
from pipeline.errors import ParamsError
from pipeline.models import losses, noise
from pipeline.models.base import DataSpec, GANFamily, Stats
from pipeline.models.blocks import DCGANDiscriminator, DCGANGenerator, init_weights

# Published optimizer settings per adversarial loss (METHODS.md): lr, betas (RMSProp for wgan).
_OPTIM_DEFAULTS = {
    "wgan": (5e-5, None),
    "wgan-gp": (1e-4, (0.0, 0.9)),
}
_DCGAN_OPTIM = (2e-4, (0.5, 0.999))


@dataclass
class Config:
    conditioning: Literal["none", "cgan", "acgan"] = "acgan"
    loss: str = "nonsaturating"       # DCGAN trains G with BCE on "real" targets (non-saturating)
    z_dim: int = 100
    base_channels: int = 64           # G width at the last up (doubles towards 4x4, at most 8x)
    d_base_channels: int = 64
    spectral_norm: bool = False       # SN on every D conv (SNGAN; pairs well with hinge)
    lambda_cls: float = 1.0           # AC-GAN classification weight
    lambda_gp: float = 10.0           # wgan-gp only
    clip: float = 0.01                # wgan only: critic weights clipped to [-clip, clip]
    n_critic: Optional[int] = None    # None: 5 for wgan / wgan-gp, 1 otherwise
    lr: Optional[float] = None        # None: 2e-4 (Adam 0.5, 0.999); wgan 5e-5 RMSProp; wgan-gp 1e-4 Adam(0, 0.9)
    beta1: Optional[float] = None
    beta2: Optional[float] = None

    def validate(self, where: str) -> None:
        require(self.loss in losses.LOSS_NAMES, f"{where}.loss",
                f"must be one of {', '.join(losses.LOSS_NAMES)}, got {self.loss!r}.")
        positive(self, where, "z_dim", "base_channels", "d_base_channels", "clip")
        require(self.lambda_cls >= 0, f"{where}.lambda_cls", "must be 0 or more.")
        require(self.lambda_gp >= 0, f"{where}.lambda_gp", "must be 0 or more.")
        if self.n_critic is not None:
            positive(self, where, "n_critic")
        if self.lr is not None:
            positive(self, where, "lr")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(value is None or 0 <= value < 1, f"{where}.{name}", "must be in [0, 1).")


class DCGAN(GANFamily):
    name = "dcgan"
    Config = Config
    data_kind = "labelled"
    outputs_masks = False        # noise -> image

    def __init__(self, cfg: Config, spec: DataSpec):
        super().__init__(cfg, spec)
        res = spec.resolution
        if res < 8 or res & (res - 1):
            raise ParamsError(f"dcgan needs a power-of-two resolution >= 8 (prepare.resolution), got {res}.")
        conditioned = cfg.conditioning != "none"
        # An unconditional DCGAN cannot choose the defect class of what it draws.
        self.class_conditional = conditioned
        k = spec.num_classes if conditioned else 0
        self.G = init_weights(DCGANGenerator(cfg.z_dim, spec.channels, res, cfg.base_channels, k))
        # Batch norm mixes samples, which breaks the per-sample gradient penalty: critics of
        # wgan-gp get no normalisation.
        d_norm = "none" if cfg.loss == "wgan-gp" else "batch"
        self.D = init_weights(DCGANDiscriminator(spec.channels, res, cfg.d_base_channels, k,
                                                 cfg.conditioning, d_norm, cfg.spectral_norm))
        self._sample_seed = 0

    # ---- networks -------------------------------------------------------------------------
    @property
    def n_critic(self) -> int:
        if self.cfg.n_critic is not None:
            return int(self.cfg.n_critic)
        return 5 if self.cfg.loss in ("wgan", "wgan-gp") else 1

    def make_optimizers(self):
        cfg = self.cfg
        lr, betas = _OPTIM_DEFAULTS.get(cfg.loss, _DCGAN_OPTIM)
        lr = cfg.lr if cfg.lr is not None else lr
        if cfg.loss == "wgan" and cfg.beta1 is None and cfg.beta2 is None:
            # WGAN (Arjovsky et al.): RMSProp, momentum-free.
            return (torch.optim.RMSprop(self.G.parameters(), lr=lr),
                    torch.optim.RMSprop(self.D.parameters(), lr=lr))
        betas = betas or _DCGAN_OPTIM[1]
        betas = (cfg.beta1 if cfg.beta1 is not None else betas[0],
                 cfg.beta2 if cfg.beta2 is not None else betas[1])
        return (torch.optim.Adam(self.G.parameters(), lr=lr, betas=betas),
                torch.optim.Adam(self.D.parameters(), lr=lr, betas=betas))

    # ---- losses ---------------------------------------------------------------------------
    def _labels(self, batch) -> torch.Tensor | None:
        return batch["label"] if self.cfg.conditioning != "none" else None

    def _noise(self, n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # CPU draw: same numbers on any device
        z = noise.randn(n, self.cfg.z_dim) if generator is None else \
            torch.randn(n, self.cfg.z_dim, generator=generator)
        return z.to(device=like.device, dtype=like.dtype)

    def forward_g(self, batch):
        x = batch["image"]                                           # (B, C, H, W)
        return {"fake": self.G(self._noise(x.shape[0], x), self._labels(batch))}

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        cfg, x, y = self.cfg, batch["image"], self._labels(batch)
        real_s, real_c = self.D(x, y)
        fake_s, fake_c = self.D(fakes["fake"], y)
        adv = losses.d_adversarial(cfg.loss, real_s, fake_s)
        loss, stats = adv, {"D/adv": adv.item(), "D/real": real_s.mean().item(), "D/fake": fake_s.mean().item()}
        if cfg.loss == "wgan-gp":
            gp = losses.gradient_penalty(lambda inp: self.D(inp, y)[0], x, fakes["fake"])
            loss = loss + cfg.lambda_gp * gp
            stats["D/gp"] = gp.item()
        if cfg.conditioning == "acgan":
            # AC-GAN: D maximises the log-likelihood of the right class on real AND fake images.
            cls_real = losses.classification(real_c, y)
            cls_fake = losses.classification(fake_c, y)
            loss = loss + cfg.lambda_cls * (cls_real + cls_fake)
            stats["D/cls_real"], stats["D/cls_fake"] = cls_real.item(), cls_fake.item()
        return loss, stats

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        cfg, y = self.cfg, self._labels(batch)
        fake_s, fake_c = self.D(fakes["fake"], y)
        adv = losses.g_adversarial(cfg.loss, fake_s)
        loss, stats = adv, {"G/adv": adv.item()}
        if cfg.conditioning == "acgan":
            cls = losses.classification(fake_c, y)
            loss = loss + cfg.lambda_cls * cls
            stats["G/cls"] = cls.item()
        return loss, stats

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generators):
        x = batch["image"]
        # Fixed noise (own generator): grids are comparable across ticks and leave the
        # training RNG untouched.
        z = self._noise(x.shape[0], x, torch.Generator().manual_seed(self._sample_seed))
        return {"real": x, "fake": generators["G"](z, self._labels(batch))}

    @torch.no_grad()
    def synthesize(self, normal, labels, region=None):
        z = self._noise(normal.shape[0], normal)
        images = self.G(z, labels if self.cfg.conditioning != "none" else None)
        masks = torch.zeros(normal.shape[0], 1, *images.shape[2:], device=images.device)
        return images, masks
