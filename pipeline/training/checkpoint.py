"""Full checkpoints that resume exactly, loadable with torch.load(weights_only=True).

A checkpoint holds G, D and G_ema weights, both optimizers, the lr schedules, family extra state
(history pools, progressive phase), images-shown counters, tick history, the batch sampler and
every RNG state (torch, numpy, python) of each rank (rank 0's at the top level, the others' in
`peer_ranks`), the resolved config and the reporter's state (MLflow run id). Only plain containers, numbers, strings and tensors go in, so no pickle code runs on load.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import TrainingError
from pipeline.fsutil import atomic_file

CHECKPOINT_FILE = "checkpoint.pt"


def capture_rng() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(obj):
    if isinstance(obj, list):
        return tuple(_as_tuples(v) for v in obj)
    if isinstance(obj, tuple):
        return tuple(_as_tuples(v) for v in obj)
    return obj


def save_checkpoint(state: dict, directory: Path) -> Path:
    """Write `state` to directory/checkpoint.pt atomically (temp file + rename)."""
    path = Path(directory) / CHECKPOINT_FILE
    with atomic_file(path, "wb") as fh:
        torch.save(state, fh)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint file or a folder holding checkpoint.pt; clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise TrainingError(f"checkpoint {path} not found. Train first, or point to a folder holding {CHECKPOINT_FILE}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt/truncated file or foreign pickle
        raise TrainingError(f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err)[:200]}). "
                            "Delete it to train from scratch, or restore it from a backup.") from None
    if not isinstance(state, dict) or "family" not in state:
        raise TrainingError(f"checkpoint {path} is not a pipeline checkpoint (no 'family' entry).")
    return state
