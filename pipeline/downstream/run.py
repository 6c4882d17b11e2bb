"""The downstream stage: does synthetic data help a defect classifier with few real defects?

For each few-shot cap in `downstream.shots` and each seed in `downstream.seeds`, one classifier
(classifier.py) is trained per condition and scored on the held-out real TEST split:

  real_only          the capped real training images, no augmentation
  real_aug           + the pipeline's train-time augmentation (`prepare.augment` via build_augment)
  real_strong_aug    + a stronger classical preset: flips, rotate90, brightness/contrast, Affine
  real_synth_<model> + up to `downstream.synthetic_per_class` synthetic images per defect class
                     from data/synthetic/<model> (only class-labelled samples, label_idx >= 1;
                     models that only write "defect" are skipped with a note)

Fairness rules:
  * The cap applies to DEFECT classes: at most `shots` real images per defect class, drawn with
    the run's seed. Normal images are kept uncapped by default (on a production line they are
    plentiful); `downstream.cap_normals: true` caps them at `shots` too.
  * Within one (shots, seed) every condition sees the same real subset and the same number of
    optimizer steps: max(epochs x ceil(largest condition's training set / batch_size),
    min_steps). More images (synthetic) therefore never also means more training.
  * The test split is never used for anything but scoring.

Outputs in `out_dir` (each file written atomically):
  downstream.json       DVC metrics, flat keys "shots_<k>/<condition>/<metric>_{mean,std}"
  downstream_runs.json  every run (seed, subset sizes, scores, confusion matrix) and notes
  plots/*.png           accuracy / macro-F1 vs shots per condition, confusion matrices
  summary.md            the report (report.py)
MLflow: through `pipeline.tracking.log_downstream(metrics, artifacts)` when that module exists.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from rich.progress import Progress

from pipeline.downstream import scores
from pipeline.downstream.classifier import Augment, predict, train_classifier
from pipeline.errors import DataError
from pipeline.fsutil import write_text_atomic
from pipeline.metrics.data import (ImageSet, PreparedInfo, SyntheticSet, find_model_folders, load_real,
                                   load_synthetic, read_prepared_info)

log = logging.getLogger(__name__)

BASE_CONDITIONS = ("real_only", "real_aug", "real_strong_aug")
SYNTH_PREFIX = "real_synth_"


@dataclass
class Condition:
    name: str
    description: str
    augment: Optional[str] = None                # None | "params" | "strong"
    synthetic: Optional[SyntheticSet] = None


def strong_augment(seed: int):
    """The stronger classical preset (albumentations 2.x spellings; Affine replaces ShiftScaleRotate)."""
    import albumentations as A
    import cv2

    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-15, 15),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    ], seed=seed)


def _as_callable(compose) -> Augment:
    return lambda image: compose(image=image)["image"]


def few_shot_indices(labels: np.ndarray, shots: int, seed: int, cap_normals: bool = False) -> np.ndarray:
    """Indices of at most `shots` images per defect class (all normals unless cap_normals), seeded."""
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(labels):
        idx = np.nonzero(labels == k)[0]
        idx = idx[rng.permutation(len(idx))]
        keep.append(idx if (k == 0 and not cap_normals) else idx[:shots])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def synthetic_indices(synth: SyntheticSet, per_class: int, seed: int) -> np.ndarray:
    """Up to `per_class` class-labelled (label_idx >= 1) samples per class, seeded."""
    rng = np.random.default_rng(seed + 1_000_003)
    keep = []
    for k in np.unique(synth.label_idx[synth.label_idx >= 1]):
        idx = np.nonzero(synth.label_idx == k)[0]
        keep.append(idx[rng.permutation(len(idx))][:per_class])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def build_conditions(synth: dict[str, SyntheticSet], notes: list[str]) -> list[Condition]:
    conds = [Condition("real_only", "real images only, no augmentation"),
             Condition("real_aug", "real + the pipeline's augmentation (prepare.augment)", augment="params"),
             Condition("real_strong_aug", "real + strong classical augmentation (flips, rotate90, "
                                          "brightness/contrast, Affine)", augment="strong")]
    for model, s in synth.items():
        if not s.class_labelled:
            note = (f"{model}: its samples are labelled only '{'defect'}' (no class chosen), so they cannot "
                    "train a class-labelled classifier; skipped in the downstream comparison.")
            log.warning(note)
            notes.append(note)
            continue
        conds.append(Condition(f"{SYNTH_PREFIX}{model}", f"real + synthetic images from {model}", synthetic=s))
    return conds


def training_set(cond: Condition, real: ImageSet, params, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, labels, number of synthetic images) for one condition."""
    if cond.synthetic is None:
        return real.images, real.labels, 0
    idx = synthetic_indices(cond.synthetic, params.synthetic_per_class, seed)
    s = cond.synthetic
    return (np.concatenate([real.images, s.images[idx]]),
            np.concatenate([real.labels, s.label_idx[idx]]), len(idx))


def _augment_for(cond: Condition, augment_params, seed: int) -> Optional[Augment]:
    if cond.augment == "params":
        from pipeline.data.transforms import build_augment

        return _as_callable(build_augment(augment_params, seed=seed))
    if cond.augment == "strong":
        return _as_callable(strong_augment(seed))
    return None


def run_downstream(params, augment, prepared_dir: Path, synthetic_root: Path, out_dir: Path,
                   models: list[str], *, evaluate_dir: Optional[Path] = None) -> dict:
    """Train and score every (shots, seed, condition); write downstream.json, plots, summary.md.

    Returns the flat metrics written to downstream.json. `evaluate_dir` (default
    `out_dir/evaluate`) is where the evaluate stage's table.md is looked for.
    """
    prepared_dir, synthetic_root, out_dir = Path(prepared_dir), Path(synthetic_root), Path(out_dir)
    # ---- inputs checked before any training
    info = read_prepared_info(prepared_dir)
    found, notes = find_model_folders(synthetic_root, models)
    synth = {m: load_synthetic(p, info, m) for m, p in found.items()}
    conditions = build_conditions(synth, notes)
    train = load_real(prepared_dir, ["train"])
    test = load_real(prepared_dir, ["test"])
    if len(test) == 0:
        raise DataError(f"{prepared_dir} has no test images: the downstream classifier is scored on the "
                        "held-out test split. Re-run `pipeline prepare` with prepare.split.test > 0.")
    if len(np.unique(train.labels[train.labels >= 1])) == 0:
        raise DataError(f"{prepared_dir} has no defect images in the training split; nothing to compare.")
    if not any([augment.hflip, augment.vflip, augment.rotate90, augment.brightness_contrast]):
        notes.append("prepare.augment enables no transform, so real_aug trains exactly like real_only.")

    num_classes = len(info.classes)
    runs: list[dict[str, Any]] = []
    total = len(params.shots) * len(params.seeds) * len(conditions)
    with Progress(transient=True) as progress:
        task = progress.add_task("downstream classifiers", total=total)
        for shots in params.shots:
            for seed in params.seeds:
                real = train.take(few_shot_indices(train.labels, shots, seed, params.cap_normals))
                short = [info.classes[k] for k in range(1, num_classes)
                         if 0 < int((train.labels == k).sum()) < shots]
                if short and seed == params.seeds[0]:
                    notes.append(f"shots {shots}: classes {short} have fewer real training images than the "
                                 "cap; all of theirs are used.")
                sets = {c.name: training_set(c, real, params, seed) for c in conditions}
                largest = max(len(y) for _, y, _ in sets.values())
                steps = max(params.epochs * math.ceil(largest / params.batch_size), params.min_steps)
                for cond in conditions:
                    x, y, n_synth = sets[cond.name]
                    model = train_classifier(x, y, num_classes, steps=steps, batch_size=params.batch_size,
                                             lr=params.lr, seed=seed, width=params.width,
                                             augment=_augment_for(cond, augment, seed),
                                             precision=params.precision)
                    pred = predict(model, test.images, precision=params.precision)
                    runs.append({
                        "shots": shots, "seed": seed, "condition": cond.name, "steps": steps,
                        "n_train": int(len(y)), "n_real": int(len(real)), "n_synthetic": n_synth,
                        "train_per_class": np.bincount(y, minlength=num_classes).tolist(),
                        "accuracy": scores.accuracy(test.labels, pred),
                        "macro_f1": scores.macro_f1(test.labels, pred, num_classes),
                        "recall": scores.per_class_recall(test.labels, pred, num_classes).tolist(),
                        "confusion": scores.confusion_matrix(test.labels, pred, num_classes).tolist(),
                    })
                    progress.advance(task)

    metrics = aggregate(runs, info.classes, params.shots, [c.name for c in conditions])
    write_outputs(out_dir, metrics, runs, notes, conditions, info, params, prepared_dir, synthetic_root,
                  evaluate_dir if evaluate_dir is not None else out_dir / "evaluate", test)
    return metrics


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def aggregate(runs: list[dict], classes: list[str], shots_list: list[int], conditions: list[str]) -> dict[str, float]:
    """Flat DVC metrics: shots_<k>/<condition>/{accuracy,macro_f1,recall_<class>}_{mean,std}."""
    flat: dict[str, float] = {}
    for shots in shots_list:
        for cond in conditions:
            group = [r for r in runs if r["shots"] == shots and r["condition"] == cond]
            if not group:
                continue
            key = f"shots_{shots}/{cond}"
            for name in ("accuracy", "macro_f1"):
                flat[f"{key}/{name}_mean"], flat[f"{key}/{name}_std"] = _mean_std([r[name] for r in group])
            for k, cls in enumerate(classes):
                flat[f"{key}/recall_{cls}_mean"], flat[f"{key}/recall_{cls}_std"] = \
                    _mean_std([r["recall"][k] for r in group])
            flat[f"{key}/n_train"] = float(np.mean([r["n_train"] for r in group]))
    return flat


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(out_dir: Path, metrics: dict, runs: list[dict], notes: list[str], conditions: list[Condition],
                  info: PreparedInfo, params, prepared_dir: Path, synthetic_root: Path, evaluate_dir: Path,
                  test: ImageSet) -> None:
    from pipeline.config import to_dict
    from pipeline.downstream import report

    plots = report.write_plots(out_dir / "plots", runs, metrics, info.classes, list(params.shots),
                               [c.name for c in conditions])
    write_text_atomic(out_dir / "downstream.json", json.dumps(_json_safe(metrics), indent=2) + "\n")
    details = {"params": to_dict(params), "classes": info.classes,
               "test_per_class": np.bincount(test.labels, minlength=len(info.classes)).tolist(),
               "conditions": {c.name: c.description for c in conditions}, "notes": notes, "runs": runs}
    write_text_atomic(out_dir / "downstream_runs.json", json.dumps(_json_safe(details), indent=2) + "\n")
    summary = report.render_summary(out_dir=out_dir, metrics=metrics, details=details, plots=plots,
                                    prepared_dir=prepared_dir, synthetic_root=synthetic_root,
                                    models=[c.name[len(SYNTH_PREFIX):] for c in conditions if c.synthetic],
                                    evaluate_dir=evaluate_dir)
    write_text_atomic(out_dir / "summary.md", summary)
    artifacts = [out_dir / "downstream.json", out_dir / "downstream_runs.json", out_dir / "summary.md", *plots]
    try:
        from pipeline.tracking import log_downstream
    except ImportError:
        log.info("pipeline.tracking not available: downstream results not logged to MLflow")
        return
    log_downstream({k: v for k, v in metrics.items() if math.isfinite(v)}, artifacts)
