"""Random draws at generation time, one stream per sample: the only way families draw noise
inside `synthesize`.

Training draws from the global torch RNG (seeded once by the engine, saved and restored with
checkpoints). Outside `per_sample_noise` the helpers here are exactly those global-RNG calls,
so training, resume and sample grids are unchanged.

Generation needs more: a sample's pixels must be a function of (generate.seed, sample index)
only, whatever batch Ray put it in (pipeline/generation/sampler.py). Inside
`per_sample_noise(seeds)` row i of every draw comes from its own CPU `torch.Generator` seeded
with seeds[i], drawn in the order the network asks for it. Row i's numbers therefore depend on
seeds[i] and on the network's call sequence, never on the other rows or on the batch size.
Draws are made on the CPU and then moved: the same numbers on any device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

# One generator per row of the batch being synthesised, or None (training: global RNG).
_STREAMS: contextvars.ContextVar[list[torch.Generator] | None] = contextvars.ContextVar(
    "per_sample_noise_streams", default=None)


@contextlib.contextmanager
def per_sample_noise(seeds: Sequence[int]) -> Iterator[None]:
    """Within the block, `randn` and `dropout` draw row i from a generator seeded `seeds[i]`."""
    token = _STREAMS.set([torch.Generator().manual_seed(int(s)) for s in seeds])
    try:
        yield
    finally:
        _STREAMS.reset(token)


def _streams(batch: int) -> list[torch.Generator] | None:
    streams = _STREAMS.get()
    if streams is not None and len(streams) != batch:
        # A programming error (a draw whose first dimension is not the batch), not user input.
        raise RuntimeError(f"per_sample_noise holds {len(streams)} sample streams but a draw asked "
                           f"for a batch of {batch}: noise must be drawn with the batch first.")
    return streams


def _per_row(streams: list[torch.Generator], shape: tuple[int, ...], fill) -> torch.Tensor:
    """(len(streams), *shape) float32 on the CPU, row i filled by `fill(row, streams[i])`."""
    out = torch.empty(len(streams), *shape)
    for row, gen in zip(out, streams):
        fill(row, gen)
    return out


def randn(batch: int, *shape: int, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """N(0, 1) noise of shape (batch, *shape): torch.randn outside `per_sample_noise`."""
    streams = _streams(batch)
    if streams is None:
        return torch.randn(batch, *shape, device=device, dtype=dtype)
    z = _per_row(streams, shape, lambda row, gen: row.normal_(generator=gen))
    return z.to(device=device, dtype=dtype or torch.get_default_dtype())


def dropout(x: torch.Tensor, p: float, training: bool, inplace: bool = False) -> torch.Tensor:
    """F.dropout outside `per_sample_noise`; inside, sample i's keep mask comes from its own stream
    (scaled by 1 / (1 - p) like F.dropout)."""
    streams = _streams(x.shape[0]) if training and 0 < p < 1 else None
    if streams is None:
        return F.dropout(x, p, training, inplace)
    keep = _per_row(streams, tuple(x.shape[1:]), lambda row, gen: row.bernoulli_(1 - p, generator=gen))
    return x * keep.to(device=x.device, dtype=x.dtype).div_(1 - p)
