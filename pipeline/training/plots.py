"""Loss-curve PNGs (matplotlib, Agg): DVC plots and MLflow show them offline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.fsutil import atomic_file  # noqa: E402


def plot_loss_curves(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """One panel for D terms, one for G terms, x = kimg."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    kimg = [h["nimg"] / 1000 for h in history]
    for ax, prefix in zip(axes, ("D/", "G/")):
        keys = sorted({k for h in history for k in h if k.startswith(prefix) and "grad_norm" not in k})
        for key in keys:
            ax.plot(kimg, [h.get(key, float("nan")) for h in history], label=key, marker=".")
        ax.set_xlabel("kimg (thousands of real images shown)")
        ax.set_title(f"{title} {prefix[:-1]} losses".strip())
        if keys:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
