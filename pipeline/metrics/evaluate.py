"""The evaluate stage: every requested metric, per synthetic model, overall and per class.

Comparisons (real = prepared images of `evaluate.real_splits`, held out from GAN training by
default):
  overall        a model's defect samples (every label but normal) vs the real DEFECT images of
                 the classes it generated ("defect"-labelled samples count as every defect
                 class); never a real normal image (`comparison_groups`)
  per class k    the model's class-k samples vs real class-k images; "defect" samples vs all
                 real defect images (label_idx >= 1)

Outputs (written atomically into `out_dir`):
  metrics.json   DVC metrics: {"models": {model: {"overall": {...}, "per_class": {...}}}, ...}
                 NaN (not computable) is written as null. "features.domain" describes the
                 domain network, including its accuracy, balanced accuracy and per-class
                 recall on the real test split (test_accuracy, test_balanced_accuracy,
                 test_recall): how far class_accuracy_domain can be trusted.
  table.md       models x metrics, like the Defect-GAN paper's comparison table, + per class
  do_nothing     with `evaluate.do_nothing_baseline` (default on), a baseline row: the normal
                 inputs of one image-to-image model's samples, unmodified (`metrics.data.
                 load_do_nothing`; the first such model of generate.models). A model whose fid_domain
                 is not below this row's has not made its inputs look more like real defects.
  noise,         with `evaluate.reference_rows` (default on), two more rows, overall only:
  real_vs_real   `noise` = uniform random images of the real images' shape (seeded), as many as
                 the largest set, vs every real defect image: what a realism metric must call
                 fake; `real_vs_real` = the real defect images halved, stratified by class
                 (seeded): one half is the set, the other its reference: the floor at that size.
  c2st           the classifier two-sample test (two_sample.py; Lopez-Paz & Oquab 2017): held-out
                 accuracy of a classifier telling a set from real defect images. Issue 27: the
                 domain features of fid_domain are trained to separate the real classes, not real
                 from fake, and rank colour noise above doing nothing; c2st asks the question itself.
                 Expected: noise ~1.0, real_vs_real ~0.5. It fits the registry's per-(real, fake)
                 signature, so it is registered like the others (overall_only: not per class); the
                 reference rows are what needs handling here: they are built as sets and given
                 their own real reference explicitly (the noise: every real defect; real_vs_real:
                 the other half), so every requested metric scores them the same way.
                 A row (model or noise) whose c2st is above do_nothing's is flagged:
                 `overall.c2st_worse_than_do_nothing: true` in metrics.json (false otherwise,
                 absent when either value is missing) and "(worse than doing nothing)" in table.md.
  feature_net.pt the cached domain feature network (reused when data and settings match)
MLflow: through `pipeline.tracking.log_evaluation(metrics, artifacts)`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.console import progress
from pipeline.errors import DataError
from pipeline.fsutil import atomic_dir, file_sha256, json_safe
from pipeline.metrics.data import (DEFECT_LABEL, DO_NOTHING, ImageSet, PreparedInfo, SyntheticSet,
                                   find_model_folders, load_do_nothing, load_real, load_synthetic,
                                   read_prepared_info)
from pipeline.metrics.fidelity import DOMAIN_CLASS_SPACE
from pipeline.metrics.registry import MetricContext, MetricSpec, compute_metric, validate_metric_names

MIN_IMAGES = 2     # per side; fewer and a comparison is reported as null
NOISE = "noise"                  # reference row: uniform random images
REAL_VS_REAL = "real_vs_real"    # reference row: half the real defect images vs the other half
REFERENCE_ROWS = (DO_NOTHING, NOISE, REAL_VS_REAL)
WORSE_FLAG = "c2st_worse_than_do_nothing"   # overall flag: c2st above the do_nothing row's


def needed_spaces(specs: list[MetricSpec], params) -> set[str]:
    """Feature spaces to compute: what the metrics declare, plus domain features for the
    diversity metrics when `evaluate.duplicate_space` is `features`."""
    needs = set().union(*(s.needs for s in specs)) if specs else set()
    if params.duplicate_space == "features" and \
            {s.name for s in specs} & {"duplicate_rate", "mean_pairwise_distance"}:
        needs.add("domain")
    return needs


def comparison_groups(fake: SyntheticSet, real_labels: np.ndarray,
                      classes: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(group name, real indices, fake indices)]: "overall" first, then one per generated label.

    "overall" is a defect set against real *defect* images only: the samples asked for a defect
    (any label but normal) vs the real images of the defect classes they were asked for (every
    real defect for "defect" samples, or when no sample names a defect class). A sample labelled
    normal is compared with real normals in its own per-class group, never in "overall"."""
    normal = classes[0]                                    # PreparedInfo: classes[0] == "normal"
    names = [c for c in classes if c in set(fake.label_names)]
    if DEFECT_LABEL in set(fake.label_names) and DEFECT_LABEL not in names:
        names.append(DEFECT_LABEL)

    def real_of(name: str) -> np.ndarray:
        if name == DEFECT_LABEL and name not in classes:   # "no class chosen": every real defect
            return np.nonzero(real_labels >= 1)[0]
        return np.nonzero(real_labels == classes.index(name))[0]

    defect_names = [n for n in names if n != normal]
    overall_real = (np.unique(np.concatenate([real_of(n) for n in defect_names])) if defect_names
                    else np.nonzero(real_labels >= 1)[0])
    groups = [("overall", overall_real, np.nonzero(fake.label_names != normal)[0])]
    groups += [(n, real_of(n), np.nonzero(fake.label_names == n)[0]) for n in names]
    return groups


def noise_set(shape: tuple[int, ...], n: int, seed: int) -> SyntheticSet:
    """`n` images of `shape` (C, H, W), every pixel uniform in 0..255 (seeded), labelled "defect"
    (compared with every real defect image), empty masks, no regions: the `noise` row."""
    images = np.random.default_rng([seed, 27]).integers(0, 256, (n, *shape), dtype=np.uint8)
    empty = np.zeros((n, 1, *shape[1:]), np.uint8)
    return SyntheticSet(model=NOISE, path=Path(NOISE), images=images, masks=empty, regions=empty,
                        has_region=np.zeros(n, bool), label_names=np.asarray([DEFECT_LABEL] * n),
                        label_idx=np.full(n, -1, np.int64))


def real_halves(real: ImageSet, classes: list[str], seed: int) -> tuple[np.ndarray, SyntheticSet]:
    """The `real_vs_real` row: the real defect images (label >= 1) split in two halves, stratified by
    class (seeded; the first half takes the odd image). (indices of the first half in `real`, the
    reference; the second half as a set, with its real labels and masks, no regions)."""
    rng = np.random.default_rng([seed, 28])
    first, second = [], []
    for k in np.unique(real.labels[real.labels >= 1]):
        idx = rng.permutation(np.nonzero(real.labels == k)[0])
        first.append(idx[:(len(idx) + 1) // 2])
        second.append(idx[(len(idx) + 1) // 2:])
    ref = np.sort(np.concatenate(first)) if first else np.zeros(0, np.int64)
    other = np.sort(np.concatenate(second)) if second else np.zeros(0, np.int64)
    labels = real.labels[other]
    half = SyntheticSet(model=REAL_VS_REAL, path=Path(REAL_VS_REAL), images=real.images[other],
                        masks=real.masks[other], regions=np.zeros_like(real.masks[other]),
                        has_region=np.zeros(len(other), bool),
                        label_names=np.asarray([classes[k] for k in labels]), label_idx=labels.astype(np.int64))
    return ref, half


def flag_worse_than_do_nothing(results: dict[str, Any], metric: str = "c2st") -> list[str]:
    """Set `overall.<metric>_worse_than_do_nothing` on every row but do_nothing and real_vs_real whose
    `metric` (lower is better) is above the do_nothing row's; the rows flagged True. Nothing is set
    where either value is missing (metric not computed, no do_nothing row, too few images)."""
    base = results.get(DO_NOTHING, {}).get("overall", {}).get(metric)
    if not _is_number(base):
        return []
    flagged = []
    for model, entry in results.items():
        value = entry["overall"].get(metric)
        if model in (DO_NOTHING, REAL_VS_REAL) or not _is_number(value):
            continue
        entry["overall"][f"{metric}_worse_than_do_nothing"] = bool(value > base)
        if value > base:
            flagged.append(model)
    return flagged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def score_group(specs: list[MetricSpec], params, real: ImageSet, fake: SyntheticSet,
                real_idx: np.ndarray, fake_idx: np.ndarray,
                features: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """All metrics for one (real subset, fake subset) comparison."""
    out: dict[str, Any] = {"n_real": int(len(real_idx)), "n_fake": int(len(fake_idx))}
    if len(real_idx) < MIN_IMAGES or len(fake_idx) < MIN_IMAGES:
        out.update({s.name: math.nan for s in specs})
        out["note"] = f"too few images (need {MIN_IMAGES} real and {MIN_IMAGES} synthetic)"
        return out
    ctx = MetricContext(
        params=params, seed=params.seed,
        features={space: (r[real_idx], f[fake_idx]) for space, (r, f) in features.items()},
        fake_masks=fake.masks[fake_idx], fake_regions=fake.regions[fake_idx],
        has_region=fake.has_region[fake_idx], fake_labels=fake.label_idx[fake_idx])
    for spec in specs:
        out.update(compute_metric(spec, real.images[real_idx], fake.images[fake_idx], ctx))
    return out


def _feature_spaces(needs: set[str], params, prepared_dir: Path, info: PreparedInfo, real: ImageSet,
                    synth: dict[str, SyntheticSet], cache_in: Path, cache_out: Path
                    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """(real features by space, fake features by model and space, feature network info)."""
    real_f: dict[str, np.ndarray] = {}
    fake_f: dict[str, dict[str, np.ndarray]] = {m: {} for m in synth}
    meta: dict[str, Any] = {}
    if needs & {"domain", DOMAIN_CLASS_SPACE}:
        from pipeline.metrics import features as fx

        train = load_real(prepared_dir, ["train"])
        if len(train) < 2:
            raise DataError(f"{prepared_dir} has {len(train)} training image(s); the domain feature network "
                            "needs at least 2. Prepare more data or drop the *_domain metrics.")
        net, net_info = fx.domain_feature_net(
            train.images, train.labels, len(info.classes),
            data_digest=file_sha256(Path(prepared_dir) / "images.parquet"),
            epochs=params.feature_epochs, seed=params.seed, batch_size=params.feature_batch_size,
            min_steps=params.feature_min_steps, cache_in=cache_in, cache_out=cache_out)
        bs = params.feature_batch_size
        if "domain" in needs:
            real_f["domain"] = fx.extract_features(net, real.images, bs)
            for model, s in synth.items():
                fake_f[model]["domain"] = fx.extract_features(net, s.images, bs)
        real_pred = fx.predict(net, real.images, bs)
        if DOMAIN_CLASS_SPACE in needs:
            real_f[DOMAIN_CLASS_SPACE] = real_pred
            for model, s in synth.items():
                fake_f[model][DOMAIN_CLASS_SPACE] = fx.predict(net, s.images, bs)
        heldout_acc = float(np.mean(real_pred == real.labels))
        meta["domain"] = {"network": "DomainFeatureNet (small CNN trained on the real training split; "
                                     "NOT Inception)", "cached": net_info.cached, "key": net_info.key,
                          "heldout_accuracy": heldout_acc,
                          **classifier_on_test(net, load_real(prepared_dir, ["test"]), info.classes, bs),
                          **net_info.config}
    if "inception" in needs:
        from pipeline.metrics.inception import inception_features, load_inception

        module = load_inception(params.inception_weights)
        real_f["inception"] = inception_features(module, real.images, params.inception_size)
        for model, s in synth.items():
            fake_f[model]["inception"] = inception_features(module, s.images, params.inception_size)
        meta["inception"] = {"weights": str(params.inception_weights), "size": params.inception_size}
    return real_f, fake_f, meta


def classifier_on_test(net, test: ImageSet, classes: list[str], batch_size: int) -> dict[str, Any]:
    """How far the domain network can be trusted as a classifier: its accuracy, balanced
    accuracy (mean recall over the classes present) and per-class recall on the real test split.
    A class's recall is the class_accuracy_domain its real test images would get."""
    from pipeline.downstream.scores import per_class_recall
    from pipeline.metrics import features as fx

    if len(test) == 0:
        return {"test_n": 0, "test_accuracy": math.nan, "test_balanced_accuracy": math.nan, "test_recall": {}}
    pred = fx.predict(net, test.images, batch_size)
    recall = per_class_recall(test.labels, pred, len(classes))
    return {"test_n": len(test), "test_accuracy": float(np.mean(pred == test.labels)),
            "test_balanced_accuracy": float(np.nanmean(recall)),
            "test_recall": {c: float(r) for c, r in zip(classes, recall)}}


def do_nothing_baseline(synth: dict[str, SyntheticSet], prepared_dir: Path) -> tuple[SyntheticSet | None, str]:
    """The do-nothing row from the samples of the first evaluated model (in `generate.models` order:
    params.yaml lists Defect-GAN first) that takes a normal input; (None, why) when none does."""
    for model in synth:
        baseline = load_do_nothing(synth[model], prepared_dir)
        if baseline is not None:
            return baseline, (f"{DO_NOTHING}: the unmodified normal inputs of {model}'s {len(baseline)} samples "
                              "(same labels and regions, empty masks): the baseline a generator must beat.")
    return None, f"{DO_NOTHING}: no evaluated model takes a normal input image; no baseline row."


def run_evaluate(params, prepared_dir: Path, synthetic_root: Path, out_dir: Path,
                 models: list[str]) -> dict:
    """Score each model's synthetic set against held-out real images; write metrics.json + table.md."""
    prepared_dir, synthetic_root, out_dir = Path(prepared_dir), Path(synthetic_root), Path(out_dir)
    # ---- everything that can be wrong is checked before any work
    specs = validate_metric_names(list(params.metrics))
    needs = needed_spaces(specs, params)
    if "inception" in needs:
        from pipeline.metrics.inception import check_inception_weights

        check_inception_weights(params.inception_weights)
    info = read_prepared_info(prepared_dir)
    found, notes = find_model_folders(synthetic_root, models)
    synth = {m: load_synthetic(p, info, m) for m, p in found.items()}
    if params.do_nothing_baseline and synth:
        baseline, note = do_nothing_baseline(synth, prepared_dir)
        notes.append(note)
        if baseline is not None:
            synth[DO_NOTHING] = baseline
    for m, s in synth.items():
        if not s.has_region.any() and "mask_in_region" in params.metrics:
            notes.append(f"{m}: no sample carries a placement region; mask_in_region is null.")
    real = load_real(prepared_dir, list(params.real_splits)) if synth else None
    if real is not None and len(real) == 0:
        raise DataError(f"{prepared_dir} has no images in splits {list(params.real_splits)}; "
                        "set evaluate.real_splits to splits that hold images (e.g. [train]).")
    # Reference rows, scored against real defect images like every set (explicit groups below).
    reference_groups: dict[str, np.ndarray] = {}
    if params.reference_rows and synth:
        n_noise = max(len(s) for s in synth.values())
        synth[NOISE] = noise_set(real.images.shape[1:], n_noise, params.seed)
        reference_groups[NOISE] = np.nonzero(real.labels >= 1)[0]
        reference_groups[REAL_VS_REAL], synth[REAL_VS_REAL] = real_halves(real, info.classes, params.seed)
        notes.append(f"{NOISE}: {n_noise} images of uniform random pixels (seed {params.seed}) vs every real "
                     "defect image: a realism metric must call them fake (c2st near 1.0).")
        notes.append(f"{REAL_VS_REAL}: {len(synth[REAL_VS_REAL])} real defect images vs the other "
                     f"{len(reference_groups[REAL_VS_REAL])} (halves stratified by class): the floor at that "
                     "sample size (c2st near 0.5; distances are biased up at small samples).")
    overall_specs = specs
    class_specs = [s for s in specs if not s.overall_only]

    cache_in = out_dir / "feature_net.pt"
    with atomic_dir(out_dir) as tmp:
        results: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        if synth:
            real_f, fake_f, meta = _feature_spaces(needs, params, prepared_dir, info, real, synth,
                                                   cache_in, tmp / "feature_net.pt")
            with progress("evaluate models", total=len(synth), unit="model") as models_bar:
                for model in synth:
                    s = synth[model]
                    feats = {sp: (real_f[sp], fake_f[model][sp]) for sp in real_f}
                    if model in reference_groups:          # overall only, against its own reference
                        groups = [("overall", reference_groups[model], np.arange(len(s)))]
                    else:
                        groups = comparison_groups(s, real.labels, info.classes)
                    if not params.per_class_tables:
                        groups = groups[:1]
                    entry: dict[str, Any] = {"n_samples": len(s), "class_labelled": s.class_labelled}
                    for name, r_idx, f_idx in groups:
                        scores = score_group(overall_specs if name == "overall" else class_specs,
                                             params, real, s, r_idx, f_idx, feats)
                        if name == "overall":
                            entry["overall"] = scores
                        else:
                            entry.setdefault("per_class", {})[name] = scores
                    results[model] = entry
                    models_bar.advance(1, note=model)
            flagged = flag_worse_than_do_nothing(results)
            if flagged:
                notes.append(f"c2st worse than doing nothing: {', '.join(flagged)} (real defect images are told "
                             f"apart from these sets more easily than from {DO_NOTHING}'s unmodified inputs).")
        else:
            notes.append("no synthetic sets found: nothing to evaluate.")
        metrics = {
            "metrics": [s.name for s in specs],
            "real": {"splits": list(params.real_splits), "n": 0 if real is None else len(real)},
            "features": meta,
            "models": results,
            "notes": notes,
        }
        (tmp / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
        (tmp / "table.md").write_text(render_table(metrics, specs))
    _log_to_tracking(metrics, [out_dir / "metrics.json", out_dir / "table.md"])
    return metrics


# --------------------------------------------------------------------------- outputs

def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.4g}"


def render_table(metrics: dict, specs: list[MetricSpec]) -> str:
    """Markdown: models x metrics (overall), then one models x classes table per metric."""
    arrow = {s.name: "↓" if s.lower_is_better else "↑" for s in specs}
    names = [s.name for s in specs]
    lines = ["# Synthetic data evaluation", "",
             f"Real reference: {metrics['real']['n']} images from splits "
             f"{', '.join(metrics['real']['splits'])}. ↓ lower is better, ↑ higher is better "
             "(mean_pairwise_distance: compare with the real value).", ""]
    models = metrics["models"]
    if models:
        lines += ["| model | n | " + " | ".join(f"{n} {arrow[n]}" for n in names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for model, entry in models.items():
            ov = entry["overall"]
            mark = " (worse than doing nothing)" if ov.get(WORSE_FLAG) else ""
            lines.append(f"| {model}{mark} | {ov['n_fake']} | " + " | ".join(_fmt(ov.get(n)) for n in names) + " |")
        lines.append("")
        if any(e["overall"].get(WORSE_FLAG) for e in models.values()):
            lines += [f"(worse than doing nothing): c2st above the {DO_NOTHING} row's: a classifier tells real "
                      "defect images from this set more easily than from the unmodified normal inputs.", ""]
        if any(m in models for m in REFERENCE_ROWS):
            lines += [f"Reference rows: {DO_NOTHING} = the unmodified normal inputs (the score to beat), "
                      f"{NOISE} = uniform random pixels (what a realism metric must call fake), {REAL_VS_REAL} = "
                      "half the real defect images vs the other half (the floor at that sample size).", ""]
        details = sorted({k for e in models.values() for k, v in e["overall"].items()
                          if k not in names and k not in ("n_real", "n_fake", "note") and not isinstance(v, bool)})
        if details:
            lines += ["Details (overall):", "",
                      "| model | " + " | ".join(details) + " |", "|---|" + "---:|" * len(details)]
            for model, entry in models.items():
                lines.append(f"| {model} | " + " | ".join(_fmt(entry["overall"].get(k)) for k in details) + " |")
            lines.append("")
        classes = [c for e in models.values() for c in e.get("per_class", {})]
        classes = list(dict.fromkeys(classes))
        if classes:
            lines += ["## Per class (synthetic class k vs real class k; 'defect' vs all real defects)", ""]
            for n in (s.name for s in specs if not s.overall_only):
                lines += [f"### {n} {arrow[n]}", "", "| model | " + " | ".join(classes) + " |",
                          "|---|" + "---:|" * len(classes)]
                for model, entry in models.items():
                    pc = entry.get("per_class", {})
                    lines.append(f"| {model} | " + " | ".join(_fmt(pc.get(c, {}).get(n)) for c in classes) + " |")
                lines.append("")
    feats = metrics.get("features", {})
    lines += ["## What the metrics measure", ""]
    lines += [f"- `{s.name}` {arrow[s.name]}: {s.description}." for s in specs]
    if "domain" in feats:
        d = feats["domain"]
        lines += ["", "`*_domain` metrics use features of a small CNN trained by this pipeline on the real "
                      "training images (not Inception): compare them between models and runs on the same "
                      "data only, never with published FID/KID values. "
                      f"Its accuracy on the real reference images: {d['heldout_accuracy']:.3f} "
                      f"({d['epochs']} epochs, seed {d['seed']}{', loaded from cache' if d['cached'] else ''}); "
                      f"on the real test split ({d['test_n']} images): accuracy {_fmt(d['test_accuracy'])}, "
                      f"balanced accuracy {_fmt(d['test_balanced_accuracy'])}, recall per class "
                      + ", ".join(f"{c} {_fmt(r)}" for c, r in d["test_recall"].items())
                      + ". `class_accuracy_domain` of class k cannot be trusted beyond that class's recall."]
    if metrics["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in metrics["notes"]]
    return "\n".join(lines) + "\n"


def flat_metrics(metrics: dict) -> dict[str, float]:
    """{"<model>/<overall|class>/<metric>": value} of the finite numbers, for MLflow."""
    flat: dict[str, float] = {}
    for model, entry in metrics["models"].items():
        groups = {"overall": entry["overall"], **entry.get("per_class", {})}
        for group, scores in groups.items():
            for key, value in scores.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    flat[f"{model}/{group}/{key}"] = float(value)
    return flat


def _log_to_tracking(metrics: dict, artifacts: list[Path]) -> None:
    from pipeline.tracking import log_evaluation

    log_evaluation(flat_metrics(metrics), artifacts)
