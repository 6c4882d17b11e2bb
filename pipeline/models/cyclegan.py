"""CycleGAN (Zhu et al. 2017): unpaired translation between normal surfaces X and defective ones Y.

Code (vs. paper): G (G: X -> Y, normal -> defect), F (F: Y -> X), D_Y (judges Y), D_X (judges X).
Batch: a = real x (normal pool), b = real y (defect pool).

    L_D_Y = lsgan(D_Y(y), D_Y(pool_Y(G(x))))        L_D_X = lsgan(D_X(x), D_X(pool_X(F(y))))
    L_G   = lsgan_G(D_Y(G(x))) + lsgan_G(D_X(F(y)))
            + lambda_cyc (||F(G(x)) - x||_1 + ||G(F(y)) - y||_1)            (lambda_cyc = 10)
            + lambda_id  (||G(y) - y||_1 + ||F(x) - x||_1)                  (lambda_id = 0.5 lambda_cyc)
lsgan's D loss already carries the paper's 1/2. D's fakes come from 50-image history pools.
The linear lr decay (100 + 100 epochs in the paper) is the engine's scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from pipeline.validation import positive, require
from pipeline.errors import ParamsError
from pipeline.models import losses
from pipeline.models.base import DataSpec, GANFamily, Stats
from pipeline.models.blocks import PatchDiscriminator, ResnetGenerator, difference_mask, init_weights, patch_layers_for
from pipeline.models.pool import ImagePool

PATCH_LOSSES = ("vanilla", "nonsaturating", "lsgan", "hinge")


@dataclass
class Config:
    loss: str = "lsgan"
    lambda_cyc: float = 10.0
    identity: float = 0.5            # lambda_id = identity * lambda_cyc (0 turns the identity loss off)
    pool_size: int = 50              # history of past fakes per D (0 = off)
    base_channels: int = 64
    n_blocks: Optional[int] = None   # residual blocks; None: 9 at >= 256 px, 6 below (paper)
    n_down: int = 2
    d_base_channels: int = 64
    d_layers: int = 3                # 70x70 PatchGAN; capped so the grid stays >= 2x2 at small sizes
    norm: Literal["instance", "batch"] = "instance"
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999

    def validate(self, where: str) -> None:
        require(self.loss in PATCH_LOSSES, f"{where}.loss",
                f"must be one of {', '.join(PATCH_LOSSES)} (CycleGAN's PatchGANs are not WGAN critics), "
                f"got {self.loss!r}.")
        positive(self, where, "base_channels", "n_down", "d_base_channels", "d_layers", "lr")
        for name in ("lambda_cyc", "identity", "pool_size"):
            require(getattr(self, name) >= 0, f"{where}.{name}", "must be 0 or more.")
        if self.n_blocks is not None:
            require(self.n_blocks >= 0, f"{where}.n_blocks", "must be 0 or more.")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"{where}.{name}", "must be in [0, 1).")

    @property
    def lambda_id(self) -> float:
        return self.identity * self.lambda_cyc


class CycleGAN(GANFamily):
    name = "cyclegan"
    Config = Config
    data_kind = "unpaired"
    class_conditional = False
    generator_names = ("G", "F")            # G: X -> Y, F: Y -> X
    discriminator_names = ("D_Y", "D_X")

    def __init__(self, cfg: Config, spec: DataSpec):
        super().__init__(cfg, spec)
        res, c = spec.resolution, spec.channels
        if res % (2 ** cfg.n_down):
            raise ParamsError(f"train.cyclegan.n_down={cfg.n_down} needs a resolution divisible by "
                              f"{2 ** cfg.n_down}, got {res}.")
        n_blocks = cfg.n_blocks if cfg.n_blocks is not None else (9 if res >= 256 else 6)
        d_layers = patch_layers_for(res, cfg.d_layers)

        def gen() -> nn.Module:
            return init_weights(ResnetGenerator(c, c, cfg.base_channels, n_blocks, cfg.n_down, cfg.norm))

        def disc() -> nn.Module:
            return init_weights(PatchDiscriminator(c, cfg.d_base_channels, d_layers, norm=cfg.norm))

        self.G, self.F = gen(), gen()          # G: X -> Y, F: Y -> X
        self.D_Y, self.D_X = disc(), disc()    # D_Y: real y vs G(x); D_X: real x vs F(y)
        self.pool_y, self.pool_x = ImagePool(cfg.pool_size), ImagePool(cfg.pool_size)   # fakes for D_Y / D_X

    def export_generator(self, generators: dict[str, nn.Module]) -> nn.Module:
        return generators["G"]                  # normal -> defect

    # ---- losses ---------------------------------------------------------------------------
    def forward_g(self, batch):
        x, y = batch["a"], batch["b"]                               # (B, C, H, W) each
        if self._per_sample_norm():
            # Same six translations in three calls: G on [x, y], F on [y, x, G(x)], G on F(y).
            idt = self.cfg.identity > 0
            g_in = [x, y] if idt else [x]
            fake_y, *idt_y = self.G(torch.cat(g_in)).split([t.shape[0] for t in g_in])
            f_in = [y, x, fake_y] if idt else [y, fake_y]
            fake_x, *rest = self.F(torch.cat(f_in)).split([t.shape[0] for t in f_in])
            fakes = {"fake_y": fake_y, "fake_x": fake_x, "rec_x": rest[-1],       # F(G(x)) ~ x
                     "rec_y": self.G(fake_x)}                                     # G(F(y)) ~ y
            if idt:
                fakes["idt_y"], fakes["idt_x"] = idt_y[0], rest[0]                # G(y) ~ y, F(x) ~ x
            return fakes
        fakes = {"fake_y": self.G(x), "fake_x": self.F(y)}
        fakes["rec_x"] = self.F(fakes["fake_y"])                    # F(G(x)) ~ x
        fakes["rec_y"] = self.G(fakes["fake_x"])                    # G(F(y)) ~ y
        if self.cfg.identity > 0:
            fakes["idt_y"] = self.G(y)                              # G(y) ~ y
            fakes["idt_x"] = self.F(x)                              # F(x) ~ x
        return fakes

    def _per_sample_norm(self) -> bool:
        """Instance norm treats every sample on its own, so one call on a concatenated batch computes
        exactly what separate calls compute, with bigger (faster) GEMMs. Batch norm mixes samples:
        there the networks are called separately."""
        return self.cfg.norm == "instance"

    def _real_fake_scores(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor):
        if self._per_sample_norm():
            return D(torch.cat([real, fake]))[0].split([real.shape[0], fake.shape[0]])
        return D(real)[0], D(fake)[0]

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        kind = self.cfg.loss
        x, y = batch["a"], batch["b"]
        fake_y = self.pool_y.query(fakes["fake_y"])                 # mix of current and past G(x)
        fake_x = self.pool_x.query(fakes["fake_x"])
        d_y = losses.d_adversarial(kind, *self._real_fake_scores(self.D_Y, y, fake_y))
        d_x = losses.d_adversarial(kind, *self._real_fake_scores(self.D_X, x, fake_x))
        loss = d_y + d_x
        return loss, {"D/D_Y": d_y.item(), "D/D_X": d_x.item()}

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        cfg, kind = self.cfg, self.cfg.loss
        x, y = batch["a"], batch["b"]
        adv_g = losses.g_adversarial(kind, self.D_Y(fakes["fake_y"])[0])
        adv_f = losses.g_adversarial(kind, self.D_X(fakes["fake_x"])[0])
        cyc = losses.l1(fakes["rec_x"], x) + losses.l1(fakes["rec_y"], y)
        loss = adv_g + adv_f + cfg.lambda_cyc * cyc
        stats = {"G/adv_G": adv_g.item(), "G/adv_F": adv_f.item(), "G/cyc": cyc.item()}
        if cfg.identity > 0:
            idt = losses.l1(fakes["idt_y"], y) + losses.l1(fakes["idt_x"], x)
            loss = loss + cfg.lambda_id * idt
            stats["G/idt"] = idt.item()
        return loss, stats

    # ---- state ----------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"pool_y": self.pool_y.state_dict(), "pool_x": self.pool_x.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "pool_y" in state:
            self.pool_y.load_state_dict(state["pool_y"])
        if "pool_x" in state:
            self.pool_x.load_state_dict(state["pool_x"])

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generators):
        x = batch["a"]
        G, F = generators["G"], generators["F"]
        out = G(x)
        mask = difference_mask(out, x).expand_as(x) * 2 - 1
        return {"real": x, "translated": out, "reconstructed": F(out), "mask": mask}

    @torch.no_grad()
    def synthesize(self, normal, labels, region=None):
        out = self.G(normal)
        return out, difference_mask(out, normal)
