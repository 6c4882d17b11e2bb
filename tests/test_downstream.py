"""Downstream classifier: scores and intervals on hand-computed values, class-balanced sampling,
early stopping and model selection, copy-paste, the degenerate flag, and the whole comparison
(real / classical / copy-paste / synthetic / synthetic + classical, CAS) on a tiny data set."""

from __future__ import annotations

import io
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import DownstreamParams, ParamsError, from_dict
from pipeline.downstream import scores, stats
from pipeline.downstream.classifier import StopRule, balanced_sampling_weights, predict, train_classifier
from pipeline.downstream.copy_paste import classes_without_masks, copy_paste
from pipeline.downstream.run import aggregate, aggregate_segmentation, few_shot_indices, run_downstream
from pipeline.errors import PipelineError

CLASSES = ["normal", "scratch", "spot"]
RES = 16
T_975_2DF = 4.302652729911275         # Student's t, 97.5 % quantile, 2 degrees of freedom (tables)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def draw(label: int, rng: np.random.Generator, res: int = RES) -> tuple[np.ndarray, np.ndarray]:
    """Textured surface; scratch = bright line, spot = dark blob (HxWx3 image, HxW 0/1 mask)."""
    img = np.clip(120 + rng.normal(0, 12, (res, res, 1)) + rng.normal(0, 4, (res, res, 3)), 0, 255)
    mask = np.zeros((res, res), np.uint8)
    if label == 1:
        r, c0 = rng.integers(2, res - 2), rng.integers(0, res // 3)
        mask[r, c0:c0 + res // 2] = 1
    elif label == 2:
        cy, cx = rng.integers(4, res - 4, 2)
        yy, xx = np.mgrid[:res, :res]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 6] = 1
    img[mask == 1] = 230 if label == 1 else 30
    return img.astype(np.uint8), mask


def make_prepared(root: Path, counts=None, seed: int = 0, constant: bool = False, masks: bool = True) -> Path:
    """images.parquet + classes.json + preview.png following the prepared-data contract.
    constant: every image is the same grey square (nothing to learn); masks False: no defect masks."""
    counts = counts or {"train": 8, "val": 3, "test": 4}
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in counts.items():
        for k, name in enumerate(CLASSES):
            for i in range(n):
                img, mask = draw(k, rng)
                if constant:
                    img = np.full_like(img, 128)
                if not masks:
                    mask = np.zeros_like(mask)
                rows.append(dict(schema_version=1, id=f"{split}-{name}-{i}", split=split, label=name,
                                 label_idx=k, image_png=_png(img), mask_png=_png(mask * 255),
                                 has_mask=bool(k > 0 and masks), unpaired_pool=False, width=RES, height=RES,
                                 channels=3, source_path=f"{name}/{i}.png", source_id=f"{name}-{i}",
                                 content_hash=f"{split}{k}{i}"))
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows).replace_schema_metadata({b"schema_version": b"1"}),
                   root / "images.parquet")
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "resolution": RES, "channels": 3,
                                                   "schema_version": 1}))
    Image.new("RGB", (32, 16), (128, 128, 128)).save(root / "preview.png")
    return root


def make_synthetic(root: Path, model: str, labels: list[str], per_label: int = 6, seed: int = 1,
                   res: int = RES) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for name in labels:
        k = CLASSES.index(name) if name in CLASSES else 1
        for i in range(per_label):
            img, mask = draw(min(k, 2), rng, res)
            rows.append(dict(id=f"{model}-{name}-{i}", label=name,
                             label_idx=CLASSES.index(name) if name in CLASSES else -1,
                             image_png=_png(img), mask_png=_png(mask * 255), region_png=None, model=model))
    folder = root / model
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
    (folder / "manifest.json").write_text(json.dumps({"model": model, "classes": CLASSES}))
    Image.new("RGB", (32, 16), (90, 90, 90)).save(folder / "preview.png")
    return folder


@pytest.fixture(autouse=True)
def tracking_calls(monkeypatch):
    """Every test here logs into this list, never into a real MLflow store."""
    calls = []
    fake = types.ModuleType("pipeline.tracking")
    fake.log_evaluation = lambda metrics, artifacts: calls.append(("evaluation", metrics, artifacts))
    fake.log_downstream = lambda metrics, artifacts: calls.append(("downstream", metrics, artifacts))
    monkeypatch.setitem(sys.modules, "pipeline.tracking", fake)
    return calls


TINY = dict(seeds=[0, 1], shots=[2, 4], batch_size=16, lr=3e-3, synthetic_per_class=4, width=8,
            eval_every=5, patience=2, min_steps=10, max_steps=30, segmenter_max_steps=30, workers=1)


# --------------------------------------------------------------------------- scores and intervals

def test_scores_on_hand_made_predictions():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    cm = scores.confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert scores.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    recall = scores.per_class_recall(y_true, y_pred, 4)
    assert recall[:3].tolist() == [0.5, 1.0, 0.5] and np.isnan(recall[3])     # class 3: no test images
    assert scores.balanced_accuracy(y_true, y_pred, 4) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # F1_k = 2TP / (2TP + FP + FN): normal 2/4, scratch 4/5, spot 2/3; class 3 absent -> not averaged
    assert scores.macro_f1(y_true, y_pred, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A class predicted but never true counts with F1 = 0.
    assert scores.macro_f1(np.array([0, 0]), np.array([0, 1]), 2) == pytest.approx((2 / 3 + 0) / 2)


def test_majority_classifier_is_degenerate_and_scores_the_floor():
    y_true = np.array([0] * 6 + [1] * 2 + [2] * 2)
    always_normal = np.zeros(10, np.int64)
    assert scores.is_degenerate(always_normal) and not scores.is_degenerate(np.array([0, 0, 1]))
    assert scores.accuracy(y_true, always_normal) == pytest.approx(0.6)            # the class share
    assert scores.balanced_accuracy(y_true, always_normal, 3) == pytest.approx(1 / 3)   # 1/K whatever the shares
    assert scores.macro_f1(y_true, always_normal, 3) == pytest.approx((2 * 6 / (12 + 4)) / 3)


def test_paired_t_interval_matches_hand_computation():
    mean, low, high = stats.paired_t_interval([0.1, 0.2, 0.3], 0.95)
    half = T_975_2DF * 0.1 / math.sqrt(3)                 # sd of (0.1, 0.2, 0.3) is 0.1
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert stats.verdict(low, high) == "no detectable difference"     # -0.048 .. 0.448
    assert stats.verdict(0.01, 0.2) == "helped" and stats.verdict(-0.3, -0.01) == "hurt"
    one = stats.paired_t_interval([0.4])
    assert one[0] == 0.4 and math.isnan(one[1]) and stats.verdict(one[1], one[2]) == "no interval (one seed)"


def _run(seed, cond, f1, *, shots=5, degenerate=False):
    return {"kind": "downstream", "shots": shots, "seed": seed, "condition": cond, "accuracy": f1,
            "balanced_accuracy": f1, "macro_f1": f1, "recall": [f1, f1], "degenerate": degenerate,
            "n_train": 10, "steps": 100}


def test_aggregate_pairs_by_seed_and_flags_degenerate():
    base = [0.5, 0.6, 0.7]
    better = [0.6, 0.8, 0.9]                                   # per-seed differences 0.1, 0.2, 0.2
    runs = [_run(s, "real_only", f) for s, f in enumerate(base)]
    runs += [_run(s, "real_x", f, degenerate=(s == 1)) for s, f in reversed(list(enumerate(better)))]
    m = aggregate(runs, ["normal", "scratch"], [5], ["real_only", "real_x"])
    sd = np.std([0.1, 0.2, 0.2], ddof=1)
    half = T_975_2DF * sd / math.sqrt(3)
    assert m["shots_5/real_x/macro_f1_delta_mean"] == pytest.approx(0.5 / 3)
    assert m["shots_5/real_x/macro_f1_delta_ci_low"] == pytest.approx(0.5 / 3 - half)
    assert m["shots_5/real_x/macro_f1_delta_ci_high"] == pytest.approx(0.5 / 3 + half)
    assert m["shots_5/real_x/macro_f1_delta_ci_low"] > 0                       # 0.023: helped
    assert m["shots_5/real_x/macro_f1_mean"] == pytest.approx(np.mean(better))
    assert m["shots_5/real_x/degenerate"] == 1.0 and m["shots_5/real_x/degenerate_seeds"] == 1.0
    assert m["shots_5/real_only/degenerate"] == 0.0
    assert m["shots_5/real_only/macro_f1_delta_mean"] == 0.0


def _seg_run(seed, cond, ap, *, shots=5, degenerate=False):
    return {"kind": "segment", "shots": shots, "seed": seed, "condition": cond, "pixel_ap": ap, "pixel_f1": ap,
            "image_auroc": ap, "mean_iou": ap, "iou_scratch": ap, "degenerate": degenerate, "n_train": 10,
            "steps": 100}


def test_segmenter_figures_use_the_same_paired_statistics_as_the_classifier():
    base, better, paste = [0.5, 0.6, 0.7], [0.6, 0.8, 0.9], [0.55, 0.85, 0.7]
    runs = [_seg_run(s, "real_only", f) for s, f in enumerate(base)]
    runs += [_seg_run(s, "real_synth_x", f, degenerate=(s == 2)) for s, f in enumerate(better)]
    runs += [_seg_run(s, "real_copy_paste", f) for s, f in enumerate(paste)]
    runs += [_run(s, "real_only", 0.1) for s in range(3)]                       # classifier runs: not mixed in
    m = aggregate_segmentation(runs, ["normal", "scratch"], [5], ["real_only", "real_synth_x", "real_copy_paste"])
    half = T_975_2DF * np.std([0.1, 0.2, 0.2], ddof=1) / math.sqrt(3)          # differences 0.1, 0.2, 0.2
    key = "segment/shots_5/real_synth_x"
    assert m[f"{key}/pixel_ap_delta_mean"] == pytest.approx(0.5 / 3)
    assert (m[f"{key}/pixel_ap_delta_ci_low"], m[f"{key}/pixel_ap_delta_ci_high"]) == \
        pytest.approx((0.5 / 3 - half, 0.5 / 3 + half))
    assert m[f"{key}/iou_scratch_mean"] == pytest.approx(np.mean(better))
    assert m[f"{key}/degenerate"] == 1.0 and m["segment/shots_5/real_only/degenerate"] == 0.0
    # against copy-paste, paired per seed: 0.05, -0.05, 0.2
    vs = stats.paired_t_interval([0.05, -0.05, 0.2])
    assert (m[f"{key}/pixel_ap_vs_copy_paste_mean"], m[f"{key}/pixel_ap_vs_copy_paste_ci_low"]) == \
        pytest.approx(vs[:2])
    assert not any(k.startswith("shots_") for k in m)


# --------------------------------------------------------------------------- training

def test_few_shot_caps_defects_not_normals():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3)
    idx = few_shot_indices(labels, 2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 2, 2]
    assert np.bincount(labels[few_shot_indices(labels, 5, seed=0, cap_normals=True)]).tolist() == [5, 5, 3]
    assert few_shot_indices(labels, 2, seed=0).tolist() == idx.tolist()
    assert few_shot_indices(labels, 2, seed=1).tolist() != idx.tolist()


def test_balanced_sampling_draws_every_class_equally():
    labels = np.array([0] * 8 + [1] * 2 + [2] * 1)
    w = balanced_sampling_weights(labels)
    assert w[:8].tolist() == [1 / 8] * 8 and w[8:10].tolist() == [0.5, 0.5] and w[10] == 1.0
    draws = labels[torch.multinomial(w, 30000, replacement=True, generator=torch.Generator().manual_seed(0))]
    assert np.allclose(np.bincount(draws) / 30000, 1 / 3, atol=0.02)


def _easy_set(rng, n_per_class, res=RES):
    """Normal grey vs a bright square (class 1) vs a dark square (class 2); (images, labels)."""
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_class)])
    x = np.clip(rng.normal(120, 10, (len(labels), 3, res, res)), 0, 255)
    for i, k in enumerate(labels):
        if k:
            y0, x0 = rng.integers(0, res - 6, 2)
            x[i, :, y0:y0 + 6, x0:x0 + 6] = 240 if k == 1 else 10
    return x.astype(np.uint8), labels


def test_imbalanced_training_learns_the_rare_classes_and_selects_on_val():
    rng = np.random.default_rng(0)
    x, y = _easy_set(rng, (60, 3, 3))                              # 20:1 imbalance, as in the issue
    vx, vy = _easy_set(rng, (10, 5, 5))
    tx, ty = _easy_set(rng, (20, 10, 10))
    stop = StopRule(eval_every=10, patience=3, min_steps=30, max_steps=300)
    model, log = train_classifier(x, y, 3, val_images=vx, val_labels=vy, stop=stop, batch_size=16, lr=3e-3,
                                  seed=0, width=8)
    pred = predict(model, tx)
    assert not scores.is_degenerate(pred)
    assert scores.balanced_accuracy(ty, pred, 3) > 0.8
    # The returned weights are the best validated ones: rescoring val gives the logged best.
    assert scores.balanced_accuracy(vy, predict(model, vx), 3) == pytest.approx(log.best_val_balanced_accuracy)
    best = max(log.history, key=lambda h: (h[1], -h[2]))
    assert best[0] == log.best_step
    if log.stopped_by == "patience":               # stopped `patience` evaluations after the best
        assert log.steps == max(log.best_step + stop.patience * stop.eval_every,
                                math.ceil(stop.min_steps / stop.eval_every) * stop.eval_every)
    else:
        assert log.steps == stop.max_steps


def test_training_is_deterministic_and_bf16_runs():
    rng = np.random.default_rng(0)
    x, y = _easy_set(rng, (6, 3, 3))
    stop = StopRule(eval_every=2, patience=1, min_steps=2, max_steps=4)
    state = torch.random.get_rng_state()
    a, la = train_classifier(x, y, 3, val_images=x, val_labels=y, stop=stop, batch_size=8, lr=1e-3, seed=5, width=8)
    b, lb = train_classifier(x, y, 3, val_images=x, val_labels=y, stop=stop, batch_size=8, lr=1e-3, seed=5, width=8)
    assert torch.equal(torch.random.get_rng_state(), state)          # global RNG untouched
    assert la.history == lb.history
    for (_, pa_), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa_, pb)
    c, _ = train_classifier(x, y, 3, val_images=x, val_labels=y, stop=stop, batch_size=8, lr=1e-3, seed=5,
                            width=8, precision="bf16")
    assert predict(c, x, precision="bf16").shape == (len(y),)


def test_strong_classical_is_seeded_in_range_and_leaves_the_input_alone():
    from pipeline.downstream.augment import strong_classical

    x = torch.rand(64, 3, 16, 16) * 2 - 1
    before = x.clone()
    a = strong_classical(x, torch.Generator().manual_seed(1))
    b = strong_classical(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(x, before) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1
    changed = (a - x).abs().flatten(1).amax(1) > 1e-6
    # 1 - 0.5^5 of the images get at least one of the five transforms (binomial, 64 draws).
    assert 50 <= int(changed.sum()) <= 64


# --------------------------------------------------------------------------- copy-paste

def test_copy_paste_moves_the_masked_defect_onto_a_normal_image():
    res = 32
    normal = np.full((1, 3, res, res), 10, np.uint8)
    defect = np.full((1, 3, res, res), 60, np.uint8)
    mask = np.zeros((1, 1, res, res), np.uint8)
    mask[0, 0, 4:8, 4:12] = 1                                        # a 4 x 8 bar in one corner
    defect[0][:, mask[0, 0] == 1] = 250
    images, masks = np.concatenate([normal, defect]), np.concatenate([np.zeros_like(mask), mask])
    labels = np.array([0, 1])
    out, out_labels, out_masks = copy_paste(images, masks, labels, per_class=6, seed=3, blend_sigma=0.0)
    assert out.shape == (6, 3, res, res) and out_labels.tolist() == [1] * 6
    assert out_masks.shape == (6, 1, res, res) and set(np.unique(out_masks)) <= {0, 1}
    for img, pasted in zip(out, out_masks):
        bright = img[0] > 130
        # Bilinear rotation keeps the defect's area (32 px) up to edge pixels, and all of it inside.
        assert 20 <= bright.sum() <= 44
        # The returned mask is where the defect landed: it covers the bright pixels, little else.
        iou = (bright & (pasted[0] == 1)).sum() / (bright | (pasted[0] == 1)).sum()
        assert iou > 0.7
        # Hard cut: only the defect's footprint changes; the rest is the normal image itself.
        assert (img[0] == 10).sum() >= res * res - 70
    positions = {tuple(np.argwhere(img[0] > 130).mean(axis=0).round()) for img in out}
    assert len(positions) > 3                                        # random placement
    blended, _, _ = copy_paste(images, masks, labels, per_class=1, seed=3, blend_sigma=1.5)
    rim = (blended[0, 0] > 10) & (blended[0, 0] < 250)
    assert rim.sum() > 0                                            # a feathered rim, not a seam
    again, _, again_masks = copy_paste(images, masks, labels, per_class=6, seed=3, blend_sigma=0.0)
    assert np.array_equal(out, again) and np.array_equal(out_masks, again_masks)


def test_copy_paste_skips_classes_without_masks():
    images = np.zeros((3, 1, 16, 16), np.uint8)
    masks = np.zeros((3, 1, 16, 16), np.uint8)
    masks[1, 0, 5:9, 5:9] = 1
    labels = np.array([0, 1, 2])
    assert classes_without_masks(masks, labels, 3) == [2]
    out, out_labels, out_masks = copy_paste(images, masks, labels, per_class=2, seed=0)
    assert out_labels.tolist() == [1, 1] and len(out_masks) == 2


# --------------------------------------------------------------------------- the comparison end to end

def test_downstream_end_to_end(tmp_path, tracking_calls):
    prepared = make_prepared(tmp_path / "data" / "prepared")
    syn = tmp_path / "data" / "synthetic"
    make_synthetic(syn, "stargan", ["scratch", "spot"])
    make_synthetic(syn, "cyclegan", ["defect"], seed=2)
    out = tmp_path / "reports"
    (out / "evaluate").mkdir(parents=True)
    (out / "evaluate" / "table.md").write_text("# Synthetic data evaluation\n\n| model | swd |\n|---|---:|\n"
                                               "| stargan | 12.5 |\n")
    (out / "evaluate" / "metrics.json").write_text(json.dumps({"models": {
        "stargan": {"overall": {"c2st": 0.91, "c2st_worse_than_do_nothing": True}},
        "do_nothing": {"overall": {"c2st": 0.8}}, "noise": {"overall": {"c2st": 1.0}}}}))
    params = DownstreamParams(**TINY)
    metrics = run_downstream(params, prepared, syn, out, ["stargan", "cyclegan", "progan"])

    saved = json.loads((out / "downstream.json").read_text())
    assert saved == pytest.approx(metrics)
    conditions = ["real_only", "real_classical", "real_copy_paste", "real_synth_stargan",
                  "real_synth_stargan_classical"]
    for s in (2, 4):
        for c in conditions:
            for m in ["accuracy", "balanced_accuracy", "macro_f1"] + [f"recall_{k}" for k in CLASSES]:
                for stat in ("mean", "std"):
                    value = saved[f"shots_{s}/{c}/{m}_{stat}"]
                    assert value is None or 0.0 <= value <= 1.0
            for m in ("macro_f1", "balanced_accuracy"):
                low, high = saved[f"shots_{s}/{c}/{m}_delta_ci_low"], saved[f"shots_{s}/{c}/{m}_delta_ci_high"]
                assert low <= saved[f"shots_{s}/{c}/{m}_delta_mean"] <= high
            assert saved[f"shots_{s}/{c}/degenerate"] in (0.0, 1.0)
        assert saved[f"shots_{s}/real_only/macro_f1_delta_mean"] == 0.0
    # cyclegan's samples carry no class: no classifier condition (the segmenter uses them, below)
    assert not any(("cyclegan" in k and not k.startswith("segment/")) or "progan" in k for k in saved)
    assert saved["shots_2/real_synth_stargan/n_train"] == saved["shots_2/real_only/n_train"] + 8
    assert saved["shots_2/real_copy_paste/n_train"] == saved["shots_2/real_only/n_train"] + 8
    for source in ("real", "stargan"):                                   # CAS per class
        assert 0 <= saved[f"cas/{source}/recall_scratch_mean"] <= 1
        assert 0 <= saved[f"cas/{source}/balanced_accuracy_mean"] <= 1

    runs = json.loads((out / "downstream_runs.json").read_text())
    down = [r for r in runs["runs"] if r["kind"] == "downstream"]
    assert len(down) == 2 * 2 * 5 and len([r for r in runs["runs"] if r["kind"] == "cas"]) == 2 * 2
    assert all(r["n_real"] == 8 + 2 * r["shots"] for r in down)   # 8 normals + shots per defect class
    assert all(r["stopped_by"] in ("patience", "max_steps") and 10 <= r["steps"] <= 30 for r in runs["runs"])
    assert any("cyclegan" in n and "defect" in n for n in runs["notes"])
    assert any("progan" in n for n in runs["notes"])

    # The segmenter: same protocol, its own conditions (DRAEM; a "defect"-only set with masks counts)
    seg_conditions = ["real_only", "real_classical", "real_copy_paste", "real_draem", "real_synth_stargan",
                      "real_synth_cyclegan"]
    seg = [r for r in runs["runs"] if r["kind"] == "segment"]
    assert len(seg) == 2 * 2 * len(seg_conditions)
    for s in (2, 4):
        for c in seg_conditions:
            key = f"segment/shots_{s}/{c}"
            for m in ("pixel_ap", "pixel_f1", "image_auroc", "iou_scratch", "iou_spot"):
                assert 0.0 <= saved[f"{key}/{m}_mean"] <= 1.0
            low, high = saved[f"{key}/pixel_ap_delta_ci_low"], saved[f"{key}/pixel_ap_delta_ci_high"]
            assert low <= saved[f"{key}/pixel_ap_delta_mean"] <= high
        # paired against copy-paste, per seed, like every other comparison
        assert (saved[f"segment/shots_{s}/real_synth_stargan/pixel_ap_vs_copy_paste_ci_low"]
                <= saved[f"segment/shots_{s}/real_synth_stargan/pixel_ap_vs_copy_paste_mean"])
    by = {(r["shots"], r["seed"], r["condition"]): r for r in seg}
    # every segmenter of one (shots, seed) sees the same real images with their masks: 8 normals + shots per class
    assert all(r["n_real"] == 8 + 2 * r["shots"] for r in seg)
    assert by[2, 0, "real_draem"]["n_train"] == by[2, 0, "real_only"]["n_train"] + 8      # 4 per defect class
    assert by[2, 0, "real_synth_cyclegan"]["n_train"] == by[2, 0, "real_only"]["n_train"] + 6   # all it has

    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert {"balanced_accuracy_vs_shots.png", "macro_f1_vs_shots.png", "delta_vs_real_only.png",
            "segmenter_pixel_ap_vs_shots.png", "segmenter_delta_vs_real_only.png"} <= set(pngs)
    assert "confusion_shots_2_real_copy_paste.png" in pngs and len(pngs) == 3 + 2 * 5 + 4
    for name in pngs:
        with Image.open(out / "plots" / name) as img:
            assert img.format == "PNG" and img.width > 50

    md = (out / "summary.md").read_text()
    # It opens with the verdict: one table per task, and a sentence against copy-paste
    assert md.startswith("# Does synthetic data help? The verdict")
    top = md.split("# Downstream defect classifier")[0]
    assert "**Classification** (macro-F1" in top and "**Segmentation** (pixel AP" in top
    assert "copy-paste at 2 shots" in top and "| real_draem |" in top
    assert "stargan 0.91, do_nothing 0.80, noise 1.00" in top and "Worse than doing nothing: stargan." in top
    assert f"{saved['segment/shots_4/real_synth_stargan/pixel_ap_delta_mean']:+.3f}" in top
    assert "# Downstream defect segmenter" in md and "## Pixel AP" in md and "## Segmenter: IoU per defect class" in md
    assert "## Balanced accuracy" in md and "## Macro-F1" in md and "## Accuracy" in md and "## Per-class recall" in md
    assert "## Paired difference vs real_only (mean [95% t interval])" in md
    ci = saved["shots_4/real_synth_stargan/macro_f1_delta_ci_low"]
    assert f"{ci:+.3f}" in md                                           # the interval is printed
    assert "| real_synth_stargan_classical | 4 |" in md and "real_copy_paste" in md
    assert "## Classification accuracy score" in md and "| stargan" in md
    assert "Floor: always predicting the majority class scores accuracy 0.333" in md
    assert "![delta_vs_real_only](plots/delta_vs_real_only.png)" in md
    assert "../data/prepared/preview.png" in md and "../data/synthetic/stargan/preview.png" in md
    assert "## Synthetic data evaluation" in md and "| stargan | 12.5 |" in md     # embedded, heading shifted

    (kind, logged, artifacts), = tracking_calls
    assert kind == "downstream" and logged["shots_2/real_only/macro_f1_mean"] == saved["shots_2/real_only/macro_f1_mean"]
    assert all(Path(a).is_file() for a in artifacts)


def test_a_classifier_that_cannot_learn_is_flagged_degenerate(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 6, "val": 2, "test": 3}, constant=True)
    params = DownstreamParams(**{**TINY, "shots": [3]})
    metrics = run_downstream(params, prepared, tmp_path / "none", tmp_path / "out", [])
    assert metrics["shots_3/real_only/degenerate"] == 1.0
    assert metrics["shots_3/real_only/degenerate_seeds"] == 2.0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "**degenerate**" in md and "## Degenerate classifiers" in md
    assert "real_only, 3 shots, seed 0: predicts only" in md
    assert "degenerate, not a result" in md                        # no verdict read off a degenerate run


def test_no_masks_means_no_copy_paste_and_the_report_says_so(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 4, "val": 2, "test": 2}, masks=False)
    params = DownstreamParams(**{**TINY, "shots": [2], "seeds": [0]})
    metrics = run_downstream(params, prepared, tmp_path / "none", tmp_path / "out", [])
    assert not any("copy_paste" in k for k in metrics)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "copy-paste needs defect masks" in md and "one seed: no interval" in md
    assert "segmenter needs defect images with pixel masks" in md and not any(k.startswith("segment/") for k in metrics)


def test_defect_only_samples_count_as_the_one_defect_class():
    from pipeline.downstream.run import build_conditions
    from pipeline.metrics.data import SyntheticSet

    z = np.zeros((2, 1, 4, 4), np.uint8)
    s = SyntheticSet("cyclegan", Path("x"), z, z, z, np.zeros(2, bool), np.array(["defect"] * 2), np.array([-1, -1]))
    notes: list[str] = []
    one = build_conditions({"cyclegan": s}, False, notes, defect_classes=1)
    assert [c.name for c in one][-2:] == ["real_synth_cyclegan", "real_synth_cyclegan_classical"]
    assert one[-1].synthetic.label_idx.tolist() == [1, 1] and "count as that class" in notes[0]
    two = build_conditions({"cyclegan": s}, False, notes, defect_classes=2)
    assert [c.name for c in two] == ["real_only", "real_classical"]          # ambiguous: skipped


@pytest.mark.slow
def test_worker_processes_give_the_same_results(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 4, "val": 2, "test": 2})
    syn = tmp_path / "syn"
    make_synthetic(syn, "stargan", ["scratch", "spot"])           # + the synthetic + classical phase
    one = run_downstream(DownstreamParams(**{**TINY, "shots": [2]}), prepared, syn, tmp_path / "a", ["stargan"])
    two = run_downstream(DownstreamParams(**{**TINY, "shots": [2], "workers": 2}), prepared, syn,
                         tmp_path / "b", ["stargan"])
    assert "shots_2/real_synth_stargan_classical/macro_f1_mean" in two
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_workers_die_with_a_killed_stage(tmp_path):
    import contextlib
    import os
    import signal
    import subprocess
    import time

    psutil = pytest.importorskip("psutil")
    prepared = make_prepared(tmp_path / "prepared", {"train": 8, "val": 2, "test": 2})
    script = (f"import pipeline\nfrom pipeline.config import DownstreamParams\n"
              f"from pipeline.downstream.run import run_downstream\n"
              f"run_downstream(DownstreamParams(seeds=[0, 1, 2], shots=[4], width=8, eval_every=50, patience=50, "
              f"min_steps=100000, max_steps=100000, workers=2), '{prepared}', '{tmp_path / 'none'}', "
              f"'{tmp_path / 'out'}', [])\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    children = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(children) < 2:
            time.sleep(0.5)
            children = psutil.Process(proc.pid).children()
        assert len(children) >= 2, "the worker processes did not start"
        time.sleep(2)                                       # the workers are training
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"orphaned workers still running: {[c.pid for c in alive]}"
    finally:
        for p in [proc, *children]:                         # never leave a process behind
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()


def test_synthetic_classical_goes_to_the_best_model_on_val():
    from pipeline.downstream.classifier import TrainLog
    from pipeline.downstream.run import Condition, _best_on_val

    conds = [Condition(f"real_synth_{m}", "", added="synthetic") for m in ("a", "b", "c")]
    val = {"a": [0.5, 0.7], "b": [0.7, 0.6], "c": [0.6, 0.7]}          # means 0.6, 0.65, 0.65
    results = {("downstream", 5, seed, f"real_synth_{m}"): {"log": TrainLog(best_val_balanced_accuracy=v[seed])}
               for m, v in val.items() for seed in (0, 1)}
    params = DownstreamParams(seeds=[0, 1], shots=[5])
    assert _best_on_val(conds, results, params).name == "real_synth_b"      # a tie goes to the earlier model


# --------------------------------------------------------------------------- bad input

def test_params_errors_name_the_key():
    with pytest.raises(ParamsError, match=r"downstream\.min_steps"):
        from_dict(DownstreamParams, {"min_steps": 50, "max_steps": 10}, "downstream")
    with pytest.raises(ParamsError, match=r"downstream\.ci_level"):
        from_dict(DownstreamParams, {"ci_level": 95}, "downstream")
    with pytest.raises(ParamsError, match=r"downstream\.epochs"):          # removed key: a clear error
        from_dict(DownstreamParams, {"epochs": 3}, "downstream")


def test_no_val_split_is_an_error(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 3, "test": 2})
    with pytest.raises(PipelineError, match=r"no val images.*prepare\.split\.val"):
        run_downstream(DownstreamParams(**TINY), prepared, tmp_path / "none", tmp_path / "out", [])
    assert not (tmp_path / "out").exists()


def test_wrong_class_set_is_an_error_naming_the_file(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 3, "val": 1, "test": 2})
    syn = tmp_path / "syn"
    folder = make_synthetic(syn, "stargan", ["scratch"])
    rows = pq.read_table(folder / "samples.parquet").to_pylist()
    rows[0]["label"], rows[0]["label_idx"] = "crack", 3
    pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
    with pytest.raises(PipelineError, match=r"stargan/samples\.parquet: labels \['crack'\] are not classes"):
        run_downstream(DownstreamParams(**TINY), prepared, syn, tmp_path / "out", ["stargan"])
    assert not (tmp_path / "out").exists()


def test_wrong_resolution_is_an_error_naming_the_file(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 3, "val": 1, "test": 2})
    syn = tmp_path / "syn"
    make_synthetic(syn, "defectgan", ["scratch"], res=32)
    with pytest.raises(PipelineError, match=r"defectgan/samples\.parquet: sample .* is 32x32 .* 16x16"):
        run_downstream(DownstreamParams(**TINY), prepared, syn, tmp_path / "out", ["defectgan"])
