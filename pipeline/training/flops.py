"""Count the floating-point operations of one training step (for achieved GFLOP/s).

torch's FlopCounterMode tracks modules with hooks that break under autograd.grad (the gradient
penalty), so this is a bare dispatch mode that sums torch's own per-op FLOP formulas.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry


def _shape(t):
    return t.shape if isinstance(t, torch.Tensor) else t


class CountFlops(TorchDispatchMode):
    """with CountFlops() as c: ...; c.total is the FLOP count (matmul/conv families)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*tree_map(_shape, args), **tree_map(_shape, kwargs), out_val=tree_map(_shape, out))
        return out
