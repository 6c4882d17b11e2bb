"""The contract every GAN family implements for the one training engine.

A family owns its networks, its config dataclass and its losses; nothing else. The engine
(`pipeline/training/step.py`, `loop.py`) owns requires_grad toggling, n_critic, optimizer and
scheduler steps, gradient clipping, the NaN guard, autocast, EMA, checkpoints and sample grids,
and never knows which GAN it trains.

Per iteration the engine does:
    fakes = family.forward_g(batch)                  # once; reused by both phases
    d_loss, d_stats = family.d_loss(batch, detach(fakes))   # D params trainable, G frozen
    [every n_critic-th iteration]
    g_loss, g_stats = family.g_loss(batch, fakes)    # G params trainable, D frozen

Batches are dicts of tensors, images in [-1, 1], shape (B, C, H, W); which keys exist depends
on `data_kind`:
    labelled:  image, label (B,) long, mask (B, 1, H, W) in {0, 1}
    paired:    a (clean), b (defective, same surface), mask, label
    unpaired:  a (normal pool), b (defect pool), label_b, mask_b, has_mask_b (B,) bool (mask_b is
               known; an image without a mask has an all-zero mask_b)
Class index 0 is always `normal`; `DataSpec.classes[k]` names class k.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from pipeline.models.losses import clip_weights

Stats = dict[str, float]


def _parameters(networks: dict[str, nn.Module]) -> list[nn.Parameter]:
    return [p for module in networks.values() for p in module.parameters()]


@contextlib.contextmanager
def fixed_rng(device: torch.device, seed: int = 0):
    """Sample grids draw the same noise every tick and leave the training RNG streams untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@dataclass(frozen=True)
class DataSpec:
    """What a family needs to know about its data to build its networks."""

    resolution: int
    channels: int
    classes: tuple[str, ...]   # classes[0] == "normal"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        """As stored in checkpoints and exported models."""
        return {"resolution": self.resolution, "channels": self.channels, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: dict) -> "DataSpec":
        """From `to_dict`'s form or a prepared dataset's classes.json (other keys are ignored)."""
        return cls(resolution=int(data["resolution"]), channels=int(data["channels"]),
                   classes=tuple(data["classes"]))

    def describe(self) -> str:
        return f"{self.resolution} px, {self.channels} channels, classes {list(self.classes)}"

    def require_same(self, data: "DataSpec", trained_what: str, data_what: str, advice: str,
                     error: type[Exception]) -> None:
        """Raise `error` unless a model trained on this spec can run on `data` (same resolution,
        channels and classes, in order): "<trained_what> was trained on ...; <data_what> has ...".
        """
        if self != data:
            raise error(f"{trained_what} was trained on {self.describe()}; {data_what} has "
                        f"{data.describe()}. {advice}")


class GANFamily(nn.Module):
    """Base class. Subclasses set `name`, `Config`, `data_kind` and implement the methods below.

    What a family is, declared here and read by training, generation and evaluate, which never
    name a family: `data_kind` (the batches it trains on), `class_conditional` (it can make a
    chosen defect class) and `outputs_masks` (it turns a normal image into a defective one and
    says where). Which families the DAG trains, generates from, evaluates and compares is
    params.yaml's `generate.models` (dvc.yaml's foreach reads that list); any family can be in it.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    data_kind: ClassVar[Literal["labelled", "paired", "unpaired"]]
    # Families whose generator cannot choose a defect class (cyclegan, pix2pix: one defect
    # domain) set this False; their samples are labelled "defect" and the downstream
    # classifier comparison skips them. An instance may set it from its config (dcgan, progan).
    class_conditional: ClassVar[bool] = True
    # False for noise-based families: `synthesize` ignores the normal image and the region and
    # returns all-zero masks, so generation records no region and skips its mask quality filter,
    # and evaluate's do-nothing baseline cannot come from their samples.
    outputs_masks: ClassVar[bool] = True
    # Attribute names of the networks, in a fixed order (optimizer parameter order, EMA copies).
    generator_names: ClassVar[tuple[str, ...]] = ("G",)
    discriminator_names: ClassVar[tuple[str, ...]] = ("D",)

    def __init__(self, cfg, spec: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec

    # ---- networks -------------------------------------------------------------------------
    def generators(self) -> dict[str, nn.Module]:
        """Trainable generator networks by name (e.g. {'G': ..., 'F': ...}). EMA copies are made of these."""
        return {name: getattr(self, name) for name in self.generator_names}

    def discriminators(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self.discriminator_names}

    def make_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """(generator optimizer, discriminator optimizer) over all G / all D params.

        Default: Adam with the config's `beta1`, `beta2` and learning rates `lr_g` / `lr_d`
        where the config has them, else `lr` for both."""
        cfg = self.cfg
        lr_g, lr_d = (cfg.lr_g, cfg.lr_d) if hasattr(cfg, "lr_g") else (cfg.lr, cfg.lr)
        betas = (cfg.beta1, cfg.beta2)
        return (torch.optim.Adam(_parameters(self.generators()), lr=lr_g, betas=betas),
                torch.optim.Adam(_parameters(self.discriminators()), lr=lr_d, betas=betas))

    @property
    def n_critic(self) -> int:
        """D steps per G step (WGAN family: 5)."""
        return int(getattr(self.cfg, "n_critic", 1))

    # ---- losses ---------------------------------------------------------------------------
    def forward_g(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the generators once; the outputs are shared by d_loss and g_loss."""
        raise NotImplementedError

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        """Discriminator loss (incl. GP / classification terms). `fakes` are already detached."""
        raise NotImplementedError

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    # ---- optional hooks -------------------------------------------------------------------
    def after_d_step(self) -> None:
        """Called after each D optimizer step. Default: WGAN weight clipping (Arjovsky et al.) of
        every discriminator to [-cfg.clip, cfg.clip] when the config's `loss` is `wgan`."""
        if getattr(self.cfg, "loss", None) == "wgan":
            for module in self.discriminators().values():
                clip_weights(module, self.cfg.clip)

    def set_progress(self, cur_nimg: int, total_nimg: int) -> None:
        """Called before each iteration with images shown so far (ProGAN growth/fade-in)."""

    def trains_generator(self) -> bool:
        """False while the family wants D-only iterations (after `set_progress`; Defect-GAN's
        optional classifier warm-up). The engine then skips G updates."""
        return True

    def uses_lr_decay(self) -> bool:
        """Whether the engine applies the shared linear lr decay (train.common.lr_decay_start)."""
        return True

    def optimizer_phase(self) -> int:
        """The engine clears both optimizers' state (Adam moments) whenever this value changes
        (ProGAN: the resolution level, as the official code resets Adam when it adds one)."""
        return 0

    def progress_metrics(self) -> dict[str, float]:
        """Scalars describing training progress to log per tick (ProGAN: resolution, alpha)."""
        return {}

    def batch_size(self, default: int) -> int:
        """Batch size for the current iteration (ProGAN: per resolution)."""
        return default

    def extra_state(self) -> dict:
        """Non-parameter state a resume needs (history pools, progressive phase)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generators: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Rows for the sample grid, e.g. {'real': x, 'translated': y, 'mask': m} (each B,C,H,W in [-1,1]).

        `generators` are the networks to use (the engine passes the EMA copies).
        """
        raise NotImplementedError

    def export_generator(self, generators: dict[str, nn.Module]) -> nn.Module:
        """The single module saved as the product's model (EMA weights), e.g. CycleGAN's X->Y."""
        return next(iter(generators.values()))

    # ---- synthesis (generation stage) ----------------------------------------------------
    @torch.no_grad()
    def synthesize(self, normal: torch.Tensor, labels: torch.Tensor,
                   region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Make defect images of classes `labels` (B,) long, indices into spec.classes (>= 1).

        normal: (B, C, H, W) clean images in [-1, 1] (noise-based families ignore them).
        All noise is drawn through `pipeline.models.noise` with the batch first, so the
        generation stage can give every sample its own stream (`per_sample_noise`).
        region: optional (B, 1, H, W) in {0, 1}, where the defect should go (Defect-GAN honours
        it; others ignore it).
        Returns (images (B, C, H, W) in [-1, 1], masks (B, 1, H, W) in [0, 1]). Families
        without a mask output return |image - normal| averaged over channels, rescaled to [0, 1],
        or zeros for noise-based families. Uses the family's current (EMA-loaded) weights.
        """
        raise NotImplementedError
