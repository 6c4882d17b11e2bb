"""Adversarial losses, one module for every family (METHODS.md, "Adversarial losses").

All discriminators output raw scores (logits); no sigmoid inside D. Losses are means over every
element, so a PatchGAN's grid of scores counts each patch equally.

    name            D loss                                        G loss
    vanilla         -E[log D(x)] - E[log(1 - D(G(z)))]            E[log(1 - D(G(z)))]
    nonsaturating   same as vanilla                               -E[log D(G(z))]
    lsgan           0.5 (E[(D(x)-1)^2] + E[D(G(z))^2])            E[(D(G(z))-1)^2]
    wgan            E[D(G(z))] - E[D(x)]  (+ weight clipping)     -E[D(G(z))]
    wgan-gp         wgan + lambda GP (+ drift E[D(x)^2])          -E[D(G(z))]
    hinge           E[relu(1-D(x))] + E[relu(1+D(G(z)))]          -E[D(G(z))]

With D = sigmoid(logit): log D = -softplus(-logit), log(1 - D) = -softplus(logit).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["vanilla", "nonsaturating", "lsgan", "wgan", "wgan-gp", "hinge"]
LOSS_NAMES: tuple[str, ...] = ("vanilla", "nonsaturating", "lsgan", "wgan", "wgan-gp", "hinge")


def d_adversarial(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator/critic loss from scores on real and fake inputs (no GP, no drift)."""
    real, fake = real.float(), fake.float()
    if kind in ("vanilla", "nonsaturating"):
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "lsgan":
        return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())
    if kind in ("wgan", "wgan-gp"):
        return fake.mean() - real.mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; known: {', '.join(LOSS_NAMES)}")


def g_adversarial(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss from the discriminator's scores on generated inputs."""
    fake = fake.float()
    if kind == "vanilla":
        return -F.softplus(fake).mean()           # E[log(1 - D(G(z)))], minimised
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()           # -E[log D(G(z))]
    if kind == "lsgan":
        return (fake - 1).pow(2).mean()
    if kind in ("wgan", "wgan-gp", "hinge"):
        return -fake.mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; known: {', '.join(LOSS_NAMES)}")


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: E[(||grad_x D(x_hat)||_2 - 1)^2], x_hat = eps x + (1 - eps) G(z), eps ~ U[0,1] per sample.

    `critic` maps images to scores (close over labels for conditional critics). The graph is
    kept (create_graph) so the penalty trains D.
    """
    eps = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device,
                     dtype=real.dtype, generator=generator)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat).float()
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = grad.float().flatten(1).norm(2, dim=1)
    return (norms - 1).pow(2).mean()


def r1_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """R1: E[||grad_x D(x)||^2] on real data (multiply by gamma/2 at the call site)."""
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).float().sum(), x, create_graph=True)
    return grad.float().flatten(1).pow(2).sum(1).mean()


def drift_penalty(real_scores: torch.Tensor) -> torch.Tensor:
    """ProGAN's drift term E[D(x)^2] (weight 0.001 there) keeps critic outputs near 0."""
    return real_scores.float().pow(2).mean()


@torch.no_grad()
def clip_weights(module: nn.Module, c: float = 0.01) -> None:
    """WGAN: clamp every critic parameter to [-c, c] after each critic step."""
    for p in module.parameters():
        p.clamp_(-c, c)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs().mean()


def classification(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Auxiliary-classifier loss (AC-GAN, StarGAN, Defect-GAN): cross-entropy over domains."""
    return F.cross_entropy(logits.float(), labels)
