"""Loss-curve PNGs (matplotlib, Agg): DVC plots and MLflow show them offline.

One row of panels per network (D, G); a network with more than `MAX_SERIES` loss terms gets more
panels, so each panel has at most 6 curves in 6 distinct colours, its legend beside the curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.fsutil import atomic_file  # noqa: E402

MAX_SERIES = 6
COLORS = plt.get_cmap("tab10").colors[:MAX_SERIES]     # distinct within a panel
NETWORKS = {"D/": "discriminator (D)", "G/": "generator (G)"}


def loss_panels(history: list[dict[str, float]]) -> list[tuple[str, list[str]]]:
    """(panel title, loss keys) per panel: D terms then G terms, at most MAX_SERIES keys each."""
    panels = []
    for prefix, name in NETWORKS.items():
        keys = sorted({k for h in history for k in h if k.startswith(prefix) and "grad_norm" not in k})
        n = max(1, math.ceil(len(keys) / MAX_SERIES))
        size = max(1, math.ceil(len(keys) / n))           # balanced: 7 terms -> 4 + 3, not 6 + 1
        for i in range(n):
            part = keys[i * size:(i + 1) * size]
            panels.append((f"{name} losses" + (f" ({i + 1}/{n})" if n > 1 else ""), part))
    return panels


def loss_figure(history: list[dict[str, float]], title: str = ""):
    """The loss-curve figure (the caller closes it): x = kimg, y = the loss terms' tick means."""
    panels = loss_panels(history)
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows), squeeze=False)
    kimg = [h["nimg"] / 1000 for h in history]
    for ax, (name, keys) in zip(axes.flat, panels):
        for key, color in zip(keys, COLORS):
            ax.plot(kimg, [h.get(key, float("nan")) for h in history], label=key, marker=".", color=color)
        ax.set_title(name)
        ax.set_xlabel("kimg (thousands of real images shown)")
        ax.set_ylabel("loss (mean over the tick)")
        if keys:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: training losses" if title else "Training losses")
    fig.tight_layout()
    return fig


def plot_loss_curves(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """Write `loss_figure` as PNG at `path`."""
    fig = loss_figure(history, title)
    try:
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)
