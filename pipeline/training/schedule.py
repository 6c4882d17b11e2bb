"""Learning-rate schedules as pure functions of images shown, so a resumed run (or a ProGAN
run whose batch size changes per resolution) gets exactly the same rate at the same point."""

from __future__ import annotations

import torch


def linear_decay_factor(nimg: int, total_nimg: int, decay_start: float) -> float:
    """1.0 until `decay_start` x total, then linearly down to 0 at total (CycleGAN: 100 + 100 epochs)."""
    start = decay_start * total_nimg
    if nimg <= start or total_nimg <= start:
        return 1.0
    return max(0.0, 1.0 - (nimg - start) / (total_nimg - start))


def step_decay_factor(nimg: int, step_nimg: int, gamma: float) -> float:
    """gamma ** (number of completed `step_nimg` intervals)."""
    return gamma ** (nimg // step_nimg) if step_nimg > 0 else 1.0


class LRSchedule:
    """Sets every param group's lr to base_lr x factor(nimg). Base rates are captured once."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor):
        self.optimizer = optimizer
        self.factor = factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def apply(self, nimg: int) -> float:
        f = self.factor(nimg)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
