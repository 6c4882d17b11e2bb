"""Plots (matplotlib, Agg, PNG: DVC and GitHub show them offline) and the markdown summary."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.downstream.run import SYNTH_PREFIX
from pipeline.fsutil import atomic_dir


# --------------------------------------------------------------------------- plots

def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _metric_vs_shots(metrics: dict, shots: list[int], conditions: list[str], name: str, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for cond in conditions:
        mean = [metrics.get(f"shots_{s}/{cond}/{name}_mean", math.nan) for s in shots]
        std = [metrics.get(f"shots_{s}/{cond}/{name}_std", math.nan) for s in shots]
        style = "-" if cond.startswith(SYNTH_PREFIX) else "--"
        ax.errorbar(shots, mean, yerr=std, fmt=style + "o", capsize=3, label=cond)
    ax.set_xscale("log" if len(shots) > 1 and max(shots) / max(min(shots), 1) >= 8 else "linear")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("real images per defect class (training cap)")
    ax.set_ylabel(f"{name.replace('_', '-')} on held-out real test images")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{name.replace('_', '-')} vs shots (mean ± std over seeds)")
    _save(fig, path)


def _confusion(cm: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    k = len(classes)
    fig = Figure(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ax = fig.add_subplot()
    row = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, np.maximum(row, 1))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def confusion_name(shots: int, cond: str) -> str:
    return f"confusion_shots_{shots}_{cond}.png"


def write_plots(plots_dir: Path, runs: list[dict], metrics: dict, classes: list[str], shots: list[int],
                conditions: list[str]) -> list[Path]:
    """Write all PNGs into `plots_dir` (replaced atomically); their final paths."""
    names = []
    with atomic_dir(plots_dir) as tmp:
        for name in ("accuracy", "macro_f1"):
            _metric_vs_shots(metrics, shots, conditions, name, tmp / f"{name}_vs_shots.png")
            names.append(f"{name}_vs_shots.png")
        for s in shots:
            for cond in conditions:
                group = [np.asarray(r["confusion"]) for r in runs if r["shots"] == s and r["condition"] == cond]
                if group:
                    _confusion(np.sum(group, axis=0), classes,
                               f"{cond}, {s} shots (summed over {len(group)} seed(s))", tmp / confusion_name(s, cond))
                    names.append(confusion_name(s, cond))
    return [Path(plots_dir) / n for n in names]


# --------------------------------------------------------------------------- markdown

def _pm(metrics: dict, key: str) -> str:
    mean, std = metrics.get(f"{key}_mean", math.nan), metrics.get(f"{key}_std", math.nan)
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(target).absolute(), Path(start).absolute())).as_posix()


def verdicts(metrics: dict, shots: list[int], conditions: list[str]) -> tuple[list[str], list[str]]:
    """(one sentence per synthetic condition and cap, the (condition, shots) where it did not help)."""
    lines, not_helped = [], []
    classical = [c for c in ("real_aug", "real_strong_aug") if c in conditions]
    for cond in [c for c in conditions if c.startswith(SYNTH_PREFIX)]:
        for s in shots:
            get = lambda c, m: metrics.get(f"shots_{s}/{c}/{m}", math.nan)  # noqa: E731
            acc, base = get(cond, "accuracy_mean"), get("real_only", "accuracy_mean")
            f1, base_f1 = get(cond, "macro_f1_mean"), get("real_only", "macro_f1_mean")
            if not (math.isfinite(acc) and math.isfinite(base)):
                continue
            d_acc, d_f1 = acc - base, f1 - base_f1
            spread = max(get(cond, "accuracy_std"), get("real_only", "accuracy_std"))
            helped = d_acc > 0
            text = (f"- **{cond}, {s} shots**: accuracy {acc:.3f} vs real only {base:.3f} ({d_acc:+.3f}), "
                    f"macro-F1 {f1:.3f} vs {base_f1:.3f} ({d_f1:+.3f}): "
                    + ("helped on average" if helped else "**did not help**"))
            if math.isfinite(spread) and abs(d_acc) <= spread and spread > 0:
                text += " (but the difference is within the seed-to-seed spread)"
            if classical:
                best = max(classical, key=lambda c: get(c, "accuracy_mean"))
                best_acc = get(best, "accuracy_mean")
                verb = "beats" if acc > best_acc else ("only ties" if acc == best_acc else "does not beat")
                text += f"; it {verb} the best classical augmentation ({best} {best_acc:.3f})"
            lines.append(text + ".")
            if not helped:
                not_helped.append(f"{cond} at {s} shots")
    return lines, not_helped


def _shift_headings(text: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def render_summary(*, out_dir: Path, metrics: dict, details: dict[str, Any], plots: list[Path],
                   prepared_dir: Path, synthetic_root: Path, models: list[str], evaluate_dir: Path) -> str:
    classes: list[str] = details["classes"]
    params = details["params"]
    shots: list[int] = params["shots"]
    conditions = list(details["conditions"])
    n_seeds = len(params["seeds"])
    test_counts = ", ".join(f"{c} {n}" for c, n in zip(classes, details["test_per_class"]))
    steps = sorted({r["steps"] for r in details["runs"]})
    out = ["# Downstream defect classifier: does synthetic data help?", "",
           f"A small ResNet trained from scratch, scored on the held-out real **test** split ({test_counts}). "
           f"Training caps the real images of each defect class at the number of shots; normal images are "
           f"{'capped the same way' if params['cap_normals'] else 'kept uncapped (they are plentiful in practice)'}. "
           f"Every condition of one (shots, seed) uses the same real subset and the same number of optimizer "
           f"steps ({', '.join(map(str, steps))}), so extra synthetic images do not also mean extra training. "
           f"Mean ± std over {n_seeds} seed(s){' (one seed: no spread)' if n_seeds == 1 else ''}.", "",
           "Conditions:", ""]
    out += [f"- `{name}`: {desc}" for name, desc in details["conditions"].items()]

    head = "| condition | " + " | ".join(f"{s} shots" for s in shots) + " |"
    rule = "|---|" + "---:|" * len(shots)
    for metric, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
        out += ["", f"## {title}", "", head, rule]
        out += [f"| {c} | " + " | ".join(_pm(metrics, f"shots_{s}/{c}/{metric}") for s in shots) + " |"
                for c in conditions]

    out += ["", "## Did synthetic data help?", ""]
    lines, not_helped = verdicts(metrics, shots, conditions)
    if not lines:
        out.append("No synthetic set was usable, so only real data and classical augmentation were compared.")
    else:
        out += lines + [""]
        if not_helped:
            out.append("Synthetic data **did not help** (mean accuracy not above real only) for: "
                       + ", ".join(not_helped) + ".")
        else:
            out.append("Synthetic data raised mean accuracy over real only in every case above; check the "
                       "spread before trusting small differences.")

    out += ["", "## Per-class recall (mean over seeds)", ""]
    for s in shots:
        out += [f"### {s} shots", "", "| condition | " + " | ".join(classes) + " |",
                "|---|" + "---:|" * len(classes)]
        for c in conditions:
            cells = []
            for cls in classes:
                v = metrics.get(f"shots_{s}/{c}/recall_{cls}_mean", math.nan)
                cells.append(f"{v:.2f}" if math.isfinite(v) else "–")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Plots", ""]
    for p in plots:
        if p.name.endswith("_vs_shots.png"):
            out.append(f"![{p.stem}]({_rel(p, out_dir)})")
    confusions = [p for p in plots if p.name.startswith("confusion_")]
    if confusions:
        out += ["", "Confusion matrices (rows true, columns predicted, summed over seeds): "
                + ", ".join(f"[{p.stem[len('confusion_'):]}]({_rel(p, out_dir)})" for p in confusions)]

    grids = [("real (prepared data)", Path(prepared_dir) / "preview.png")]
    grids += [(m, Path(synthetic_root) / m / "preview.png") for m in models]
    present = [(name, p) for name, p in grids if p.is_file()]
    out += ["", "## Sample grids", ""]
    out += [f"**{name}**\n\n![{name}]({_rel(p, out_dir)})\n" for name, p in present] or ["No preview images found."]

    table = Path(evaluate_dir) / "table.md"
    if table.is_file():
        out += ["", "## Evaluation metrics (from the evaluate stage)", "", _shift_headings(table.read_text().strip())]

    if details["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in details["notes"]]
    return "\n".join(out) + "\n"
