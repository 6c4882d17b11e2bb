"""Plots (matplotlib, Agg, PNG: DVC and GitHub show them offline) and the markdown summary."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.downstream.conditions import COPY_PASTE, HEADLINE, REFERENCE, SEGMENT, SEGMENT_HEADLINE, SYNTH_PREFIX
from pipeline.downstream.stats import verdict

TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1",
          "pixel_ap": "pixel AP", "pixel_f1": "pixel F1", "image_auroc": "image AUROC", "mean_iou": "mean IoU"}
HEADINGS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro-F1",
            "pixel_ap": "Pixel AP", "pixel_f1": "Pixel F1 (threshold chosen on val)",
            "image_auroc": "Image AUROC (maximum pixel score)", "mean_iou": "Mean IoU over defect classes"}


# --------------------------------------------------------------------------- plots

def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _metric_vs_shots(metrics: dict, shots: list[int], conditions: list[str], name: str, path: Path,
                     prefix: str = "", task: str = "classifier") -> None:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for cond in conditions:
        mean = [metrics.get(f"{prefix}shots_{s}/{cond}/{name}_mean", math.nan) for s in shots]
        std = [metrics.get(f"{prefix}shots_{s}/{cond}/{name}_std", math.nan) for s in shots]
        style = "-" if cond.startswith(SYNTH_PREFIX) else "--"
        ax.errorbar(shots, mean, yerr=std, fmt=style + "o", capsize=3, label=cond)
    ax.set_xscale("log" if len(shots) > 1 and max(shots) / max(min(shots), 1) >= 8 else "linear")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("real images per defect class (training cap)")
    ax.set_ylabel(f"{TITLES[name]} on held-out real test images")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{task}: {TITLES[name]} vs shots (mean ± std over seeds)")
    _save(fig, path)


def _deltas(metrics: dict, shots: list[int], conditions: list[str], level: float, path: Path,
            names: tuple[str, ...] = HEADLINE, prefix: str = "") -> None:
    others = [c for c in conditions if c != REFERENCE]
    fig = Figure(figsize=(6.5 * len(names), 0.9 + 0.35 * max(1, len(others)) * len(shots)))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        rows, labels = 0, []
        for s in shots:
            for cond in others:
                mean = metrics.get(f"{prefix}shots_{s}/{cond}/{name}_delta_mean", math.nan)
                low = metrics.get(f"{prefix}shots_{s}/{cond}/{name}_delta_ci_low", math.nan)
                high = metrics.get(f"{prefix}shots_{s}/{cond}/{name}_delta_ci_high", math.nan)
                colour = {"helped": "tab:green", "hurt": "tab:red"}.get(verdict(low, high), "tab:gray")
                err = [[mean - low], [high - mean]] if math.isfinite(low) else None
                ax.errorbar([mean], [rows], xerr=err, fmt="o", color=colour, capsize=3)
                labels.append(f"{cond}, {s} shots")
                rows += 1
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(rows), labels if i == 0 else [""] * rows, fontsize=7)   # one label column
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
        ax.set_xlabel(f"{TITLES[name]} minus real_only (paired per seed)")
        ax.set_title(f"{TITLES[name]}: mean difference, {level:.0%} t interval", fontsize=9)
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
                conditions: list[str], ci_level: float = 0.95, segment_conditions: list[str] = ()) -> list[str]:
    """Write all PNGs into the (new, empty) folder `plots_dir`; their file names."""
    names = []
    for name in HEADLINE:
        _metric_vs_shots(metrics, shots, conditions, name, plots_dir / f"{name}_vs_shots.png")
        names.append(f"{name}_vs_shots.png")
    if len(conditions) > 1:
        _deltas(metrics, shots, conditions, ci_level, plots_dir / "delta_vs_real_only.png")
        names.append("delta_vs_real_only.png")
    if segment_conditions:
        prefix = f"{SEGMENT}/"
        for name in SEGMENT_HEADLINE:
            _metric_vs_shots(metrics, shots, list(segment_conditions), name,
                             plots_dir / f"segmenter_{name}_vs_shots.png", prefix, "segmenter")
            names.append(f"segmenter_{name}_vs_shots.png")
        if len(segment_conditions) > 1:
            _deltas(metrics, shots, list(segment_conditions), ci_level, plots_dir / "segmenter_delta_vs_real_only.png",
                    SEGMENT_HEADLINE, prefix)
            names.append("segmenter_delta_vs_real_only.png")
    for s in shots:
        for cond in conditions:
            group = [np.asarray(r["confusion"]) for r in runs
                     if r["kind"] == "downstream" and r["shots"] == s and r["condition"] == cond]
            if group:
                _confusion(np.sum(group, axis=0), classes,
                           f"{cond}, {s} shots (summed over {len(group)} seed(s))", plots_dir / confusion_name(s, cond))
                names.append(confusion_name(s, cond))
    return names


# --------------------------------------------------------------------------- markdown

def _num(v: float, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def _pm(metrics: dict, key: str) -> str:
    mean, std = metrics.get(f"{key}_mean", math.nan), metrics.get(f"{key}_std", math.nan)
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} ± {std:.3f}" if math.isfinite(std) else f"{mean:.3f}"


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(target).absolute(), Path(start).absolute())).as_posix()


def interval_text(metrics: dict, key: str) -> str:
    """'+0.050 [-0.010, +0.110]' for the paired difference stored under `key`_delta_*."""
    mean = metrics.get(f"{key}_delta_mean", math.nan)
    low, high = metrics.get(f"{key}_delta_ci_low", math.nan), metrics.get(f"{key}_delta_ci_high", math.nan)
    if not math.isfinite(mean):
        return "–"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:+.3f} (one seed: no interval)"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def verdicts(metrics: dict, shots: list[int], conditions: list[str]) -> dict[str, list[str]]:
    """{"helped" | "hurt" | "no detectable difference" | ...: ["<condition> at <k> shots", ...]} from the
    macro-F1 interval; degenerate conditions are listed under "degenerate" instead."""
    out: dict[str, list[str]] = {}
    for s in shots:
        for cond in conditions:
            if cond == REFERENCE or f"shots_{s}/{cond}/macro_f1_delta_mean" not in metrics:
                continue
            key = f"shots_{s}/{cond}"
            if metrics.get(f"{key}/degenerate") or metrics.get(f"shots_{s}/{REFERENCE}/degenerate"):
                group = "degenerate"
            else:
                group = verdict(metrics.get(f"{key}/macro_f1_delta_ci_low", math.nan),
                                metrics.get(f"{key}/macro_f1_delta_ci_high", math.nan))
            out.setdefault(group, []).append(f"{cond} at {s} shots")
    return out


def _verdict_of(metrics: dict, key: str, ref_key: str, name: str) -> str:
    if metrics.get(f"{key}/degenerate") or metrics.get(f"{ref_key}/degenerate"):
        return "degenerate"
    return verdict(metrics.get(f"{key}/{name}_delta_ci_low", math.nan), metrics.get(f"{key}/{name}_delta_ci_high", math.nan))


def _joined_verdicts(per_shot: list[tuple[int, str]]) -> str:
    """[(5, "helped"), (20, "helped")] -> "helped at 5 and 20 shots"; mixed verdicts are listed per shot count."""
    if not per_shot:
        return "–"
    if len({v for _, v in per_shot}) == 1:
        counts = [str(s) for s, _ in per_shot]
        at = counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + " and " + counts[-1]
        return f"{per_shot[0][1]} at {at} shots"
    return "; ".join(f"{v} at {s} shots" for s, v in per_shot)


def verdict_table(metrics: dict, shots: list[int], conditions: list[str], name: str, prefix: str = "") -> list[str]:
    """Markdown lines: condition, the paired difference vs real_only per shot count, the verdict."""
    lines = ["| condition | " + " | ".join(f"{s} shots" for s in shots) + " | verdict |",
             "|---|" + "---:|" * len(shots) + "---|"]
    for c in conditions:
        if c == REFERENCE:
            continue
        cells, per_shot = [], []
        for s in shots:
            key = f"{prefix}shots_{s}/{c}"
            cells.append(interval_text(metrics, f"{key}/{name}"))
            if f"{key}/{name}_delta_mean" in metrics:
                per_shot.append((s, _verdict_of(metrics, key, f"{prefix}shots_{s}/{REFERENCE}", name)))
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {_joined_verdicts(per_shot)} |")
    return lines


def verdict_sentence(metrics: dict, shots: list[int], conditions: list[str], name: str, prefix: str = "") -> str:
    """One sentence per task: did each synthetic set help, hurt or make no detectable difference
    against real data alone, and where did it stand against copy-paste (paired per seed)."""
    synth = [c for c in conditions if c.startswith(SYNTH_PREFIX)]
    if not synth:
        return f"No synthetic set took part, so only real data and the baselines were compared ({TITLES[name]})."
    parts = []
    for c in synth:
        per_shot = [(s, _verdict_of(metrics, f"{prefix}shots_{s}/{c}", f"{prefix}shots_{s}/{REFERENCE}", name))
                    for s in shots if f"{prefix}shots_{s}/{c}/{name}_delta_mean" in metrics]
        versus = []
        for s in shots if not any(v == "degenerate" for _, v in per_shot) else ():
            key = f"{prefix}shots_{s}/{c}/{name}_vs_copy_paste"
            if f"{key}_mean" in metrics:
                v = verdict(metrics.get(f"{key}_ci_low", math.nan), metrics.get(f"{key}_ci_high", math.nan))
                word = {"helped": "better than", "hurt": "worse than"}.get(v, "no detectable difference from")
                versus.append(f"{word} copy-paste at {s} shots ({metrics[f'{key}_mean']:+.3f} "
                              f"[{metrics.get(f'{key}_ci_low', math.nan):+.3f}, {metrics.get(f'{key}_ci_high', math.nan):+.3f}])")
        text = f"`{c}` {_joined_verdicts(per_shot)} against real data alone"
        degenerate = any(v == "degenerate" for _, v in per_shot)
        missing = "not compared with copy-paste (a degenerate classifier)" if degenerate else "copy-paste did not run"
        parts.append(text + "; " + (", ".join(versus) if versus else missing) + ".")
    return " ".join(parts)


def _shift_headings(text: str) -> str:
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())


def _cell(metrics: dict, key: str, name: str) -> str:
    return ("**degenerate** " if metrics.get(f"{key}/degenerate") else "") + _pm(metrics, f"{key}/{name}")


def render_summary(*, out_dir: Path, metrics: dict, details: dict[str, Any], plots: list[Path],
                   prepared_dir: Path, synthetic_root: Path, models: list[str], evaluate_dir: Path) -> str:
    classes: list[str] = details["classes"]
    params = details["params"]
    shots: list[int] = params["shots"]
    conditions = list(details["conditions"])
    n_seeds = len(params["seeds"])
    level = params["ci_level"]
    test_counts = ", ".join(f"{c} {n}" for c, n in zip(classes, details["test_per_class"]))
    val_counts = ", ".join(f"{c} {n}" for c, n in zip(classes, details["val_per_class"]))
    down = [r for r in details["runs"] if r["kind"] == "downstream"]
    steps = [r["steps"] for r in details["runs"]]
    base = details["majority_baseline"]
    seg_conditions = list(details.get("segment_conditions", {}))
    out = ["# Does synthetic data help? The verdict", "",
           f"Paired per-seed differences against `{REFERENCE}` (mean [{level:.0%} t interval], {n_seeds} seed(s)); "
           "**helped** / **hurt** only where the whole interval is on one side of 0.", "",
           f"**Classification** (macro-F1 of a defect classifier): "
           + verdict_sentence(metrics, shots, conditions, "macro_f1"), ""]
    out += verdict_table(metrics, shots, conditions, "macro_f1")
    if seg_conditions:
        out += ["", f"**Segmentation** (pixel AP of a defect segmenter): "
                + verdict_sentence(metrics, shots, seg_conditions, "pixel_ap", f"{SEGMENT}/"), ""]
        out += verdict_table(metrics, shots, seg_conditions, "pixel_ap", f"{SEGMENT}/")
    realism = _realism_sentence(Path(evaluate_dir) / "metrics.json")
    out += ["", _floor_sentence(metrics, shots, base, len(classes) - 1)] + (["", realism] if realism else []) + [""]
    out += ["# Downstream defect classifier", "",
           f"A small CNN trained from scratch per condition and seed, scored on the held-out real **test** split "
           f"({test_counts}). Training caps the real images of each defect class at the number of shots; normal "
           f"images are {'capped the same way' if params['cap_normals'] else 'kept uncapped (they are plentiful in practice)'}"
           f". Every classifier draws its batches class-balanced, is scored on the real **val** split ({val_counts}) "
           f"every {params['eval_every']} steps, stops after {params['patience']} evaluations without improvement "
           f"(at least {params['min_steps']}, at most {params['max_steps']} steps; here {min(steps, default=0)}-"
           f"{max(steps, default=0)}), and keeps its best-on-val weights: the same rule for every condition. Within "
           f"one (shots, seed) all conditions share the real subset and the initial weights, so conditions are "
           f"compared as paired per-seed differences against `{REFERENCE}` over {n_seeds} seed(s), with a "
           f"{level:.0%} t interval; a condition **helped** only where the whole interval is above 0.", "",
           f"Floor: always predicting the majority class scores accuracy {_num(base['accuracy'])}, balanced "
           f"accuracy {_num(base['balanced_accuracy'])}, macro-F1 {_num(base['macro_f1'])} on this test split. "
           "A classifier that predicts one class for every test image is marked **degenerate**: its numbers are "
           "not a result.", "", "Conditions:", ""]
    out += [f"- `{name}`: {desc}" for name, desc in details["conditions"].items()]

    out += _score_tables(metrics, shots, conditions, (*HEADLINE, "accuracy"))   # accuracy: vs the floor
    rule = "|---|" + "---:|" * len(shots)

    out += ["", f"## Paired difference vs {REFERENCE} (mean [{level:.0%} t interval])", "",
            "| condition | shots | balanced accuracy | macro-F1 | verdict (macro-F1) |", "|---|---:|---:|---:|---|"]
    for s in shots:
        for c in conditions:
            if c == REFERENCE:
                continue
            key = f"shots_{s}/{c}"
            if f"{key}/macro_f1_delta_mean" not in metrics:
                continue
            v = ("degenerate, not a result" if metrics.get(f"{key}/degenerate") or
                 metrics.get(f"shots_{s}/{REFERENCE}/degenerate") else
                 verdict(metrics.get(f"{key}/macro_f1_delta_ci_low", math.nan),
                         metrics.get(f"{key}/macro_f1_delta_ci_high", math.nan)))
            out.append(f"| {c} | {s} | {interval_text(metrics, key + '/balanced_accuracy')} | "
                       f"{interval_text(metrics, key + '/macro_f1')} | {v} |")

    out += ["", "## Did synthetic data help?", ""]
    groups = verdicts(metrics, shots, conditions)
    synth = {g: [x for x in items if x.startswith(SYNTH_PREFIX)] for g, items in groups.items()}
    if not any(synth.values()):
        out.append("No synthetic set was usable, so only real data, classical augmentation and copy-paste "
                   "were compared.")
    for group, title in (("helped", "Helped (interval above 0)"), ("hurt", "Hurt (interval below 0)"),
                         ("no detectable difference", "No detectable difference (interval contains 0)"),
                         ("degenerate", "Degenerate classifier, not a result"),
                         ("no interval (one seed)", "One seed, no interval")):
        if synth.get(group):
            out.append(f"- {title}: " + ", ".join(synth[group]) + ".")
    baselines = [x for g, items in groups.items() if g == "helped" for x in items if not x.startswith(SYNTH_PREFIX)]
    if baselines:
        out.append(f"- Baselines that helped: {', '.join(baselines)}.")

    if seg_conditions:
        out += _segmentation_section(metrics, details, shots, seg_conditions, classes, level, plots, out_dir)

    degenerate = [r for r in details["runs"] if r["degenerate"]]
    if degenerate:
        out += ["", "## Degenerate classifiers", ""]
        for r in degenerate:
            if r["kind"] == SEGMENT:
                out.append(f"- segmenter {r['condition']}, {r['shots']} shots, seed {r['seed']}: one answer for "
                           "every test pixel at its val threshold.")
                continue
            where = (f"{r['condition']}, {r['shots']} shots" if r["kind"] == "downstream" else f"CAS {r['model']}")
            only = ", ".join(classes[c + (0 if r["kind"] == "downstream" else 1)] for c in r["predicted_classes"])
            out.append(f"- {where}, seed {r['seed']}: predicts only {only}.")

    cas = list(dict.fromkeys(r["model"] for r in details["runs"] if r["kind"] == "cas"))
    if cas:
        out += ["", "## Classification accuracy score (CAS: train on synthetic only, test on real)", "",
                "A classifier of the defect classes trained on one source only, scored on the real test defects "
                "(Ravuri & Vinyals 2019); `real` trains on all real training defects, the reference. Mean ± std "
                "over seeds; per-class columns are recalls.", "",
                "| trained on | accuracy | balanced accuracy | " + " | ".join(classes[1:]) + " |",
                "|---|---:|---:|" + "---:|" * (len(classes) - 1)]
        for name in cas:
            key = f"cas/{name}"
            flag = " (**degenerate**)" if metrics.get(f"{key}/degenerate") else ""
            cells = [_num(metrics.get(f"{key}/recall_{c}_mean", math.nan), ".2f") for c in classes[1:]]
            out.append(f"| {name}{flag} | {_pm(metrics, key + '/accuracy')} | "
                       f"{_pm(metrics, key + '/balanced_accuracy')} | " + " | ".join(cells) + " |")

    out += ["", "## Per-class recall (mean over seeds)", ""]
    for s in shots:
        out += [f"### {s} shots", "", "| condition | " + " | ".join(classes) + " |",
                "|---|" + "---:|" * len(classes)]
        for c in conditions:
            cells = [_num(metrics.get(f"shots_{s}/{c}/recall_{cls}_mean", math.nan), ".2f") for cls in classes]
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Training budget", "", "| condition | " + " | ".join(f"{s} shots" for s in shots) + " |", rule]
    for c in conditions:
        cells = []
        for s in shots:
            group = [r for r in down if r["condition"] == c and r["shots"] == s]
            cells.append(f"{np.mean([r['n_train'] for r in group]):.0f} images, {np.mean([r['steps'] for r in group]):.0f} steps"
                         if group else "–")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out.append("")

    out += ["## Plots", ""]
    for p in plots:
        if (p.name.endswith("_vs_shots.png") or p.name.startswith("delta_")) and not p.name.startswith("segmenter_"):
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


def _score_tables(metrics: dict, shots: list[int], conditions: list[str], names: tuple[str, ...],
                  prefix: str = "") -> list[str]:
    """One markdown table per score: conditions x shots, mean ± std over seeds."""
    out = []
    for metric in names:
        out += ["", f"## {HEADINGS[metric]} (mean ± std over seeds)", "",
                "| condition | " + " | ".join(f"{s} shots" for s in shots) + " |", "|---|" + "---:|" * len(shots)]
        out += [f"| {c} | " + " | ".join(_cell(metrics, f"{prefix}shots_{s}/{c}", metric) for s in shots) + " |"
                for c in conditions]
    return out


def _realism_sentence(evaluate_metrics: Path) -> str:
    """The evaluate stage's two-sample test in one sentence: each set's held-out accuracy at telling
    its images from real defects (0.5 indistinguishable, 1.0 detectable), with the reference rows,
    and the sets that are worse than doing nothing. "" when evaluate did not compute it."""
    import json

    try:
        models = json.loads(Path(evaluate_metrics).read_text()).get("models", {})
    except (OSError, ValueError):
        return ""
    c2st = {m: v.get("overall", {}).get("c2st") for m, v in models.items()}
    c2st = {m: v for m, v in c2st.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if not c2st:
        return ""
    cells = ", ".join(f"{m} {v:.2f}" for m, v in c2st.items())
    worse = [m for m, v in models.items() if v.get("overall", {}).get("c2st_worse_than_do_nothing")]
    text = (f"**Realism** (classifier two-sample test, held-out accuracy at telling a set from real defect images: "
            f"0.5 indistinguishable, 1.0 detectable): {cells}.")
    return text + (f" Worse than doing nothing: {', '.join(worse)}." if worse else "")


def _floor_sentence(metrics: dict, shots: list[int], base: dict, defect_classes: int) -> str:
    """Does the real-only classifier beat always answering the majority class, on accuracy and
    balanced accuracy? Below the floor, no comparison of conditions means much."""
    parts, below = [], []
    for s in shots:
        key = f"shots_{s}/{REFERENCE}"
        acc, bacc = metrics.get(f"{key}/accuracy_mean", math.nan), metrics.get(f"{key}/balanced_accuracy_mean", math.nan)
        parts.append(f"{s} shots accuracy {_num(acc)}, balanced accuracy {_num(bacc)}")
        if not (acc > base["accuracy"] and (defect_classes < 2 or bacc > base["balanced_accuracy"])):
            below.append(str(s))
    floor = (f"always answering the majority class scores accuracy {_num(base['accuracy'])}, balanced accuracy "
             f"{_num(base['balanced_accuracy'])}")
    if below:
        return (f"**Warning:** the real-only classifier does not beat the floor at {', '.join(below)} shots "
                f"({'; '.join(parts)}; {floor}): it has not learned the defects, so its comparisons say little.")
    return f"The real-only classifier beats the floor ({'; '.join(parts)}; {floor})."


def _segmentation_section(metrics: dict, details: dict, shots: list[int], conditions: list[str], classes: list[str],
                          level: float, plots: list[Path], out_dir: Path) -> list[str]:
    prefix = f"{SEGMENT}/"
    counts = ", ".join(f"{c} {n}" for c, n in zip(classes, details.get("segment_test_per_class", [])))
    seg_runs = [r for r in details["runs"] if r["kind"] == SEGMENT]
    steps = [r["steps"] for r in seg_runs]
    out = ["", "# Downstream defect segmenter", "",
           "A small U-Net trained from scratch per condition and seed on the same real subsets as the classifier "
           "(normals with empty masks; defect images without a known mask left out), class-balanced draws, "
           f"early-stopped on val pixel AP with the classifier's rule (here {min(steps, default=0)}-"
           f"{max(steps, default=0)} steps), scored on the real test images whose masks are known ({counts}). "
           "Pixel AP: area under the precision-recall curve over every test pixel; pixel F1 at the threshold that "
           "maximises F1 on val; image AUROC from each image's maximum pixel score (normal vs defect); IoU per "
           "defect class over the test images of that class at the val threshold. The same paired statistics as "
           "the classifier.", "", "Conditions:", ""]
    out += [f"- `{name}`: {desc}" for name, desc in details["segment_conditions"].items()]
    out += _score_tables(metrics, shots, conditions, ("pixel_ap", "pixel_f1", "image_auroc", "mean_iou"), prefix)
    out += ["", f"## Segmenter: paired difference vs {REFERENCE} (mean [{level:.0%} t interval])", "",
            "| condition | shots | pixel AP | pixel F1 | image AUROC | verdict (pixel AP) |", "|---|---:|---:|---:|---:|---|"]
    for s in shots:
        for c in conditions:
            key = f"{prefix}shots_{s}/{c}"
            if c == REFERENCE or f"{key}/pixel_ap_delta_mean" not in metrics:
                continue
            out.append(f"| {c} | {s} | " + " | ".join(interval_text(metrics, f"{key}/{n}") for n in SEGMENT_HEADLINE)
                       + f" | {_verdict_of(metrics, key, f'{prefix}shots_{s}/{REFERENCE}', 'pixel_ap')} |")
    out += ["", "## Segmenter: IoU per defect class (mean over seeds)", ""]
    for s in shots:
        out += [f"### {s} shots", "", "| condition | " + " | ".join(classes[1:]) + " |",
                "|---|" + "---:|" * (len(classes) - 1)]
        out += [f"| {c} | " + " | ".join(_num(metrics.get(f"{prefix}shots_{s}/{c}/iou_{cls}_mean", math.nan), ".3f")
                                          for cls in classes[1:]) + " |" for c in conditions]
        out.append("")
    seg_plots = [p for p in plots if p.name.startswith("segmenter_")]
    if seg_plots:
        out += ["## Segmenter plots", ""] + [f"![{p.stem}]({_rel(p, out_dir)})" for p in seg_plots]
    return out
