"""Headline DVC metrics: a few figures per trained family, per evaluated model and per downstream
(shot count, condition), written next to the detailed outputs, which stay plain JSON outputs.

`dvc metrics show` prints one row per metrics file and one column per key of all files together,
so the headline files are small (<= 15 keys), share their key names (every family has the same
columns, every evaluated model the same, every downstream condition the same) and keep 4 significant
digits. The whole table then fits a 200-column terminal (13 columns, 199 characters with the longest
condition name, real_synth_defectgan_classical), and a new model, shot count or condition adds a
row, not a column.

    metrics/train/<family>.json            kimg, D_loss, G_loss (last tick)
    metrics/evaluate/<model>.json          the overall headline figures of reports/evaluate/metrics.json
                                           (swd, fid_domain, c2st, duplicate_rate; + inception_*), also
                                           for its reference rows do_nothing, noise and real_vs_real
    metrics/downstream/<k>shot/<condition>.json
                                           macro_f1 (mean over seeds) and, against real_only, the paired
                                           difference `delta` with its interval `ci_low`..`ci_high`
                                           (reports/downstream.json `..._delta_mean/_ci_low/_ci_high`;
                                           its `degenerate` flags stay there: a 14th column would
                                           push the table past 200 characters)
    metrics/downstream/segment/<k>shot/<condition>.json
                                           the segmenter's pixel_ap and its paired difference, the same keys

Plot data for `dvc plots show` (the PNGs stay, as `dvc plots show` renders blank offline):
    models/<family>/loss_curves.tsv        written by the training launcher (pipeline/training/delivery.py loss_curves_tsv)
    reports/downstream_scores.tsv          one row per shot count, `<condition>/macro_f1` and
                                           `<condition>/accuracy` columns (`scores_vs_shots_tsv`)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

from pipeline.downstream.conditions import REFERENCE, SEGMENT
from pipeline.fsutil import atomic_dir, write_text_atomic

MAX_KEYS = 15
SIGNIFICANT = 4      # digits kept: headline columns stay narrow; full values are in the detailed JSONs
# img/s stays in models/<family>/metrics.json: a speed moves with the machine and the load, and as a
# headline column it would change `dvc metrics diff` on every rerun and push the table past 200.
TRAIN_KEYS = {"kimg": "kimg", "D/loss": "D_loss", "G/loss": "G_loss"}
# The evaluate figures a reader compares first; the rest (per class, std, thresholds, the
# c2st_worse_than_do_nothing flag) stay in reports/evaluate/metrics.json. c2st (the classifier
# two-sample test, the realism figure that cannot be gamed: pipeline/metrics/two_sample.py) took
# kid_domain's column: kid_domain measures in fid_domain's feature space again, and a 14th column
# would push `dvc metrics show` past 200 characters (c2st, 10 characters wide, saves 4 on
# kid_domain's 14). mmd_domain is left out for the same reason: kid_domain's kernel without the polynomial.
EVALUATE_KEYS = ("swd", "fid_domain", "c2st", "inception_fid", "inception_kid", "duplicate_rate")
_DOWNSTREAM_KEY = re.compile(r"^shots_(\d+)/([^/]+)/(.+)$")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: float) -> float:
    """`value` to SIGNIFICANT significant digits (1225.74168 -> 1226.0, 0.0968241 -> 0.09682)."""
    return float(f"{float(value):.{SIGNIFICANT}g}")


def _write(path: Path, values: dict[str, float]) -> None:
    if len(values) > MAX_KEYS:
        raise ValueError(f"headline {path} has {len(values)} keys, more than {MAX_KEYS}")
    write_text_atomic(Path(path), json.dumps(values, indent=2) + "\n")


def _write_folder(folder: Path, files: dict[str, dict[str, float]]) -> list[Path]:
    """Replace `folder` with exactly these files (relative name -> values), atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for name, values in files.items():
            if len(values) > MAX_KEYS:
                raise ValueError(f"headline {folder / name} has {len(values)} keys, more than {MAX_KEYS}")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(values, indent=2) + "\n")
    return [folder / name for name in files]


# --------------------------------------------------------------------------- train

def train_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The last tick's kimg, img/s and D / G totals (the keys every family reports)."""
    return {short: _short(metrics[key]) for key, short in TRAIN_KEYS.items() if _finite(metrics.get(key))}


def write_train(path: Path, metrics: dict[str, Any]) -> dict[str, float]:
    values = train_headline(metrics)
    _write(path, values)
    return values


# --------------------------------------------------------------------------- evaluate

def evaluate_headline(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{model: {metric: overall value}} for the headline metrics that were computed."""
    chosen = [m for m in EVALUATE_KEYS if m in metrics.get("metrics", EVALUATE_KEYS)]
    out = {}
    for model, entry in metrics.get("models", {}).items():
        overall = entry.get("overall", {})
        out[model] = {m: _short(overall[m]) for m in chosen if _finite(overall.get(m))}
    return out


def write_evaluate(folder: Path, metrics: dict[str, Any]) -> list[Path]:
    return _write_folder(folder, {f"{model}.json": values for model, values in evaluate_headline(metrics).items()})


# --------------------------------------------------------------------------- downstream

def downstream_headline(flat: dict[str, Any], prefix: str = "", main: str = "macro_f1"
                        ) -> dict[tuple[int, str], dict[str, float]]:
    """{(shots, condition): {<main>, delta, ci_low, ci_high}} from reports/downstream.json's flat
    keys under `prefix` ("" the classifier, "segment/" the segmenter, whose main figure is pixel_ap).
    `delta` and its interval are the paired differences of `main` against real_only the downstream
    stage computed (not recomputed here)."""
    groups: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in flat.items():
        match = _DOWNSTREAM_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if match:
            groups.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = value
    out: dict[tuple[int, str], dict[str, float]] = {}
    for (shots, condition), values in sorted(groups.items()):
        row = {}
        if _finite(values.get(f"{main}_mean")):
            row[main] = _short(values[f"{main}_mean"])
        if condition != REFERENCE and _finite(values.get(f"{main}_delta_mean")):
            row["delta"] = _short(values[f"{main}_delta_mean"])
            for bound in ("ci_low", "ci_high"):      # absent (null) with a single seed
                if _finite(values.get(f"{main}_delta_{bound}")):
                    row[bound] = _short(values[f"{main}_delta_{bound}"])
        if row:
            out[(shots, condition)] = row
    return out


def write_downstream(folder: Path, flat: dict[str, Any]) -> list[Path]:
    """<folder>/<k>shot/<condition>.json (the classifier, macro_f1) and, where the segmenter ran,
    <folder>/segment/<k>shot/<condition>.json (pixel_ap): one more column, not one per figure."""
    files = {f"{shots}shot/{condition}.json": values
             for (shots, condition), values in downstream_headline(flat).items()}
    files.update({f"{SEGMENT}/{shots}shot/{condition}.json": values
                  for (shots, condition), values in downstream_headline(flat, f"{SEGMENT}/", "pixel_ap").items()})
    return _write_folder(folder, files)


def plotted_conditions(models: Iterable[str]) -> list[str]:
    """The conditions the downstream plots of dvc.yaml draw (keep the two lists in step): their
    columns are always in the TSV, empty where a condition did not run (e.g. copy-paste without
    masks, a model whose samples carry no class), so `dvc plots show` never misses a field."""
    return ["real_only", "real_classical", "real_copy_paste", *(f"real_synth_{m}" for m in models)]


def scores_vs_shots_tsv(flat: dict[str, Any], metrics: Iterable[str] = ("macro_f1", "accuracy"),
                        conditions: Iterable[str] = ()) -> str:
    """Wide TSV for `dvc plots`: a row per shot count, a `<condition>/<metric>` column per condition
    (`conditions` first, then any other the stage produced) and metric (the mean over seeds); a
    value the stage did not produce is empty."""
    metrics = list(metrics)
    table: dict[int, dict[str, float]] = {}
    conditions = list(conditions)
    for key, value in flat.items():
        match = _DOWNSTREAM_KEY.match(key)
        if not match or not _finite(value):
            continue
        shots, condition, name = int(match.group(1)), match.group(2), match.group(3)
        if name.removesuffix("_mean") in metrics and name.endswith("_mean"):
            table.setdefault(shots, {})[f"{condition}/{name.removesuffix('_mean')}"] = float(value)
            if condition not in conditions:
                conditions.append(condition)
    columns = [f"{c}/{m}" for m in metrics for c in conditions]
    lines = ["\t".join(["shots", *columns])]
    for shots in sorted(table):
        row = table[shots]
        lines.append("\t".join([str(shots), *(f"{row[c]:.6g}" if c in row else "" for c in columns)]))
    return "\n".join(lines) + "\n"


def write_scores_vs_shots(path: Path, flat: dict[str, Any], models: Iterable[str] = ()) -> None:
    write_text_atomic(Path(path), scores_vs_shots_tsv(flat, conditions=plotted_conditions(models)))


__all__ = ["train_headline", "write_train", "evaluate_headline", "write_evaluate", "downstream_headline",
           "write_downstream", "scores_vs_shots_tsv", "write_scores_vs_shots", "plotted_conditions", "MAX_KEYS"]
