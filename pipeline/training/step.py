"""The single adversarial training step shared by every GAN family.

The family supplies `forward_g`, `d_loss` and `g_loss` (see pipeline/models/base.py); this
module owns everything else: requires_grad toggling, detaching fakes for D, n_critic, autocast,
gradient synchronisation across workers, clipping, the non-finite guard and optimizer calls.

Gradients are averaged across workers here (one flat all-reduce per phase) instead of wrapping
the networks in DistributedDataParallel: DDP's reducer breaks on the double backward of the
gradient penalty and on the several D forwards (real, fake, interpolates) per backward that
WGAN-GP families need, while an explicit all-reduce is exact for every family and is the same
code path on 1 worker (where it is skipped) and on N.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pipeline.errors import TrainingError
from pipeline.models.base import GANFamily, Stats


def set_requires_grad(modules, flag: bool) -> None:
    for module in modules:
        module.requires_grad_(flag)


def detach_tree(obj):
    """Detach every tensor in a (nested) dict/list/tuple of generator outputs."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: detach_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detach_tree(v) for v in obj)
    return obj


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients over workers with one flat all-reduce (no-op on a single worker)."""
    world = distributed_world()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def use_fused_kernels(optimizer: torch.optim.Optimizer) -> str:
    """Switch `optimizer` to torch's fused kernels (Adam/AdamW/SGD/Adagrad, CPU and CUDA) or, for
    optimizers without one (RMSprop), to the multi-tensor foreach path. Same update rule; call it
    before the first step. Returns the kind chosen ('fused', 'foreach' or 'unchanged')."""
    groups = optimizer.param_groups
    if all("fused" in g for g in groups):
        devices = {p.device.type for g in groups for p in g["params"]}
        floating = all(p.is_floating_point() for g in groups for p in g["params"])
        if floating and devices <= {"cpu", "cuda"} and not any(g.get("differentiable") for g in groups):
            for g in groups:
                g["fused"], g["foreach"] = True, False
            optimizer.defaults.update(fused=True, foreach=False)
            return "fused"
    if all("foreach" in g for g in groups):
        for g in groups:
            g["foreach"] = True
        optimizer.defaults.update(foreach=True)
        return "foreach"
    return "unchanged"


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CPU (AMX) and CUDA; fp32 is the identity. bf16 needs no loss scaler."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_finite(loss: torch.Tensor, phase: str, stats: Stats) -> None:
    if not math.isfinite(float(loss.detach())):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in stats.items())
        raise TrainingError(f"non-finite {phase} loss ({terms}). Training stopped; the last good "
                            "checkpoint is kept. Lower the learning rate, set train.common.grad_clip, "
                            "or use precision fp32.")


@dataclass
class StepConfig:
    precision: str = "fp32"
    grad_clip: float = 0.0
    # torch's fused optimizer kernels (Adam/SGD; foreach for RMSprop): the same update rule in one
    # pass over each tensor instead of a dozen elementwise ops (bench/README.md, ablation).
    fused_optimizers: bool = True
    # torch.compile the generators (in place, so state_dict keys do not change; see
    # AdversarialStep._maybe_compile for when). Off by default:
    # it costs minutes of compile time and recompiles on every new input shape or Python scalar
    # (ProGAN's fade-in alpha). Discriminators stay eager: the gradient penalty's double backward
    # is not supported by compiled autograd.
    compile_generators: bool = False


class AdversarialStep:
    """One iteration: a D update every call, a G update every `family.n_critic`-th call."""

    def __init__(self, family: GANFamily, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 cfg: StepConfig, device: torch.device):
        self.family, self.opt_g, self.opt_d, self.cfg, self.device = family, opt_g, opt_d, cfg, device
        self.g_nets = list(family.generators().values())
        self.d_nets = list(family.discriminators().values())
        self.g_params = [p for m in self.g_nets for p in m.parameters()]
        self.d_params = [p for m in self.d_nets for p in m.parameters()]
        if cfg.fused_optimizers:
            use_fused_kernels(opt_g)
            use_fused_kernels(opt_d)
        self._kinds_seen: set[bool] = set()
        self._compiled = False

    def _maybe_compile(self, train_g: bool) -> None:
        """Compile the generators once every kind of iteration (D only / D + G) has run eagerly.

        The loop counts FLOPs (CountFlops, a dispatch mode) on the first iteration of each kind,
        and dynamo invoked under a dispatch mode gives up on the frame for good; compiling after
        those iterations, and never while a mode is active, keeps both working.
        """
        self._kinds_seen.add(train_g)
        if self._compiled or not self.cfg.compile_generators:
            return
        kinds = {True} if self.family.n_critic == 1 else {False, True}
        if self._kinds_seen >= kinds and _get_current_dispatch_mode() is None:
            for net in self.g_nets:
                net.compile(dynamic=False)
            self._compiled = True

    def _update(self, loss: torch.Tensor, params, optimizer) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(params)
        norm = 0.0
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        optimizer.step()
        return norm

    def __call__(self, batch: dict[str, torch.Tensor], train_g: bool) -> Stats:
        family = self.family
        amp = autocast_context(self.cfg.precision, self.device)

        # Generators run once; their outputs feed both phases. Without a G update this
        # iteration no graph is needed, which saves the backward memory.
        set_requires_grad(self.d_nets, False)
        set_requires_grad(self.g_nets, train_g)
        with amp, torch.set_grad_enabled(train_g):
            fakes = family.forward_g(batch)

        # D phase: G frozen, fakes detached.
        set_requires_grad(self.g_nets, False)
        set_requires_grad(self.d_nets, True)
        with amp:
            d_loss, stats = family.d_loss(batch, detach_tree(fakes))
        stats = dict(stats)
        _check_finite(d_loss, "D", stats)
        grad_norm = self._update(d_loss, self.d_params, self.opt_d)
        family.after_d_step()
        stats["D/loss"] = float(d_loss.detach())
        if self.cfg.grad_clip > 0:
            stats["D/grad_norm"] = grad_norm

        if train_g:
            # G phase: D frozen (its weights just moved; scores are recomputed).
            set_requires_grad(self.d_nets, False)
            set_requires_grad(self.g_nets, True)
            with amp:
                g_loss, g_stats = family.g_loss(batch, fakes)
            stats.update(g_stats)
            _check_finite(g_loss, "G", stats)
            grad_norm = self._update(g_loss, self.g_params, self.opt_g)
            stats["G/loss"] = float(g_loss.detach())
            if self.cfg.grad_clip > 0:
                stats["G/grad_norm"] = grad_norm
        set_requires_grad(self.d_nets, True)
        set_requires_grad(self.g_nets, True)
        self._maybe_compile(train_g)
        return stats
