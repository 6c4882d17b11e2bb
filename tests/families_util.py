"""What the family tests share: tiny configs for every family in REGISTRY, toy batches in each
data layout, and one engine iteration through the production step (AdversarialStep), so no test
checks a family against a re-implementation of the engine."""

from __future__ import annotations

import torch

from pipeline.config import from_dict
from pipeline.models import REGISTRY
from pipeline.models.base import DataSpec, GANFamily
from pipeline.training.step import AdversarialStep, StepConfig

SPEC = DataSpec(resolution=16, channels=3, classes=("normal", "scratch", "spot"))

TINY = {
    "dcgan": dict(z_dim=8, base_channels=4, d_base_channels=4),
    "pix2pix": dict(base_channels=8, d_base_channels=8),
    "cyclegan": dict(base_channels=8, n_blocks=1, d_base_channels=8, pool_size=4),
    "stargan": dict(base_channels=8, n_blocks=1, d_base_channels=8),
    "progan": dict(latent_dim=16, base_channels=8, max_channels=16),
    "defectgan": dict(base_channels=8, max_channels=16, n_blocks=1, spade_hidden=8, d_base_channels=8),
}


def tiny_family(name: str, spec: DataSpec = SPEC, **overrides) -> GANFamily:
    cls = REGISTRY[name]
    return cls(from_dict(cls.Config, {**TINY[name], **overrides}, f"train.{name}"), spec)


def make_batch(kind: str, seed: int, res: int = 16, batch: int = 4, channels: int = 3) -> dict[str, torch.Tensor]:
    """Smooth random surfaces with bright (class 1) / dark (class 2) defect squares, in the layout
    `kind` asks for (pipeline/models/base.py)."""
    g = torch.Generator().manual_seed(seed)

    def surfaces():
        low = torch.rand(batch, channels, 4, 4, generator=g) * 1.6 - 0.8
        return torch.nn.functional.interpolate(low, size=res, mode="bilinear", align_corners=False)

    def deface(img, labels):
        out, mask = img.clone(), torch.zeros(batch, 1, res, res)
        for i, k in enumerate(labels.tolist()):
            if k:
                r = slice(res // 4 + k, res // 4 + k + res // 3)
                out[i, :, r, r] = 0.9 if k == 1 else -0.9
                mask[i, :, r, r] = 1
        return out, mask

    labels = 1 + torch.arange(batch) % 2
    if kind == "labelled":
        lab = torch.arange(batch) % 3
        img, mask = deface(surfaces(), lab)
        return {"image": img, "label": lab, "mask": mask}
    clean = surfaces()
    defect, mask = deface(clean, labels)
    if kind == "paired":
        return {"a": clean, "b": defect, "mask": mask, "label": labels}
    return {"a": surfaces(), "b": defect, "label_b": labels, "mask_b": mask}


def engine_iteration(fam: GANFamily, batch, opt_g, opt_d, g_step: bool = True, precision: str = "fp32"):
    """One iteration exactly as training runs it (pipeline/training/step.py, production StepConfig
    defaults). Returns (D stats, G stats), split by their prefixes."""
    step = AdversarialStep(fam, opt_g, opt_d, StepConfig(precision=precision), torch.device("cpu"))
    stats = step(batch, train_g=g_step)
    d_stats = {k: v for k, v in stats.items() if k.startswith("D/")}
    g_stats = {k: v for k, v in stats.items() if k.startswith("G/")}
    return d_stats, g_stats


def train_steps(fam: GANFamily, steps: int, kind: str | None = None, res: int = 16, channels: int = 3) -> None:
    """`steps` real engine iterations on toy batches (G every n_critic-th, as the loop does)."""
    opt_g, opt_d = fam.make_optimizers()
    step = AdversarialStep(fam, opt_g, opt_d, StepConfig(), torch.device("cpu"))
    for it in range(steps):
        step(make_batch(kind or fam.data_kind, it % 3, res=res, channels=channels),
             train_g=(it + 1) % fam.n_critic == 0)
