"""The end of a Ray Train run on the launching machine: the final checkpoint (the engine's final
files, which went through Ray storage so a remote cluster's run still arrives) copied to
models/<family>/ atomically, with the per-tick loss curves as loss_curves.tsv, DVC's plot of
the run."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import TrainingError
from pipeline.fsutil import atomic_dir
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.loop import EXPORT_FILE

LOSS_CURVES_TSV = "loss_curves.tsv"                 # per-tick losses, the DVC plot of a training


def deliver(result, out_dir: Path) -> Path:
    """Copy the final checkpoint (the engine's final files) to out_dir, atomically, with the
    per-tick loss curves as a TSV beside them (loss_curves.tsv, DVC's plot of the run)."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise TrainingError("training ended without a final checkpoint; see the worker log above.")
    with checkpoint.as_directory() as src:
        src = Path(src)
        if not (src / EXPORT_FILE).exists():
            raise TrainingError(f"the last checkpoint {checkpoint.path} holds no {EXPORT_FILE}; training did not "
                                "reach its end. Continue it with --resume.")
        with atomic_dir(out_dir) as tmp:
            for item in src.iterdir():
                if not item.name.startswith("."):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            history = load_checkpoint(tmp).get("history") or []
            (tmp / LOSS_CURVES_TSV).write_text(loss_curves_tsv(history))
    return out_dir


def loss_curves_tsv(history: list[dict]) -> str:
    """One row per tick: kimg, then every loss the family reports (`D/...`, `G/...`), in a fixed
    column order; a value a tick lacks is empty."""
    columns = sorted({k for row in history for k in row if k.startswith(("D/", "G/"))})
    lines = ["\t".join(["kimg", *columns])]
    for row in history:
        kimg = row.get("kimg", row.get("nimg", 0) / 1000)
        lines.append("\t".join([f"{kimg:.4g}", *(f"{row[c]:.6g}" if c in row else "" for c in columns)]))
    return "\n".join(lines) + "\n"
