"""Downstream classifier: scores on hand-made predictions, few-shot caps, determinism, input checks,
and the whole real / augmentation / synthetic comparison on a tiny data set."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import AugmentParams, DownstreamParams
from pipeline.downstream import scores
from pipeline.downstream.classifier import predict, train_classifier
from pipeline.downstream.run import few_shot_indices, run_downstream
from pipeline.errors import PipelineError

CLASSES = ["normal", "scratch", "spot"]
RES = 16


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


def make_prepared(root: Path, counts=None, seed: int = 0) -> Path:
    """images.parquet + classes.json + preview.png following the prepared-data contract."""
    counts = counts or {"train": 8, "val": 1, "test": 4}
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in counts.items():
        for k, name in enumerate(CLASSES):
            for i in range(n):
                img, mask = draw(k, rng)
                rows.append(dict(schema_version=1, id=f"{split}-{name}-{i}", split=split, label=name,
                                 label_idx=k, image_png=_png(img), mask_png=_png(mask * 255), has_mask=k > 0,
                                 unpaired_pool=False, width=RES, height=RES, channels=3,
                                 source_path=f"{name}/{i}.png", source_id=f"{name}-{i}",
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


TINY = dict(seeds=[0], shots=[2, 4], epochs=1, batch_size=16, lr=3e-3, synthetic_per_class=4, width=8, min_steps=0)


# --------------------------------------------------------------------------- scores

def test_scores_on_hand_made_predictions():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    cm = scores.confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert scores.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    recall = scores.per_class_recall(y_true, y_pred, 4)
    assert recall[:3].tolist() == [0.5, 1.0, 0.5] and np.isnan(recall[3])     # class 3: no test images
    # F1_k = 2TP / (2TP + FP + FN): normal 2/4, scratch 4/5, spot 2/3; class 3 absent -> not averaged
    assert scores.macro_f1(y_true, y_pred, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A class predicted but never true counts with F1 = 0.
    assert scores.macro_f1(np.array([0, 0]), np.array([0, 1]), 2) == pytest.approx((2 / 3 + 0) / 2)


def test_few_shot_caps_defects_not_normals():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 3)
    idx = few_shot_indices(labels, 2, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 2, 2]
    assert np.bincount(labels[few_shot_indices(labels, 5, seed=0, cap_normals=True)]).tolist() == [5, 5, 3]
    assert few_shot_indices(labels, 2, seed=0).tolist() == idx.tolist()
    assert few_shot_indices(labels, 2, seed=1).tolist() != idx.tolist()


def test_training_is_deterministic_and_bf16_runs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 3, RES, RES), dtype=np.uint8)
    y = np.arange(12) % 3
    state = torch.random.get_rng_state()
    a = train_classifier(x, y, 3, steps=3, batch_size=8, lr=1e-3, seed=5, width=8)
    b = train_classifier(x, y, 3, steps=3, batch_size=8, lr=1e-3, seed=5, width=8)
    assert torch.equal(torch.random.get_rng_state(), state)          # global RNG untouched
    for (_, pa_), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa_, pb)
    c = train_classifier(x, y, 3, steps=2, batch_size=8, lr=1e-3, seed=5, width=8, precision="bf16")
    assert predict(c, x, precision="bf16").shape == (12,)


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
    params = DownstreamParams(**TINY)
    metrics = run_downstream(params, AugmentParams(hflip=0.5), prepared, syn, out,
                             ["stargan", "cyclegan", "progan"])

    saved = json.loads((out / "downstream.json").read_text())
    assert saved == pytest.approx(metrics)
    conditions = ["real_only", "real_aug", "real_strong_aug", "real_synth_stargan"]
    for s in (2, 4):
        for c in conditions:
            for m in ["accuracy", "macro_f1"] + [f"recall_{k}" for k in CLASSES]:
                for stat in ("mean", "std"):
                    value = saved[f"shots_{s}/{c}/{m}_{stat}"]
                    assert value is None or 0.0 <= value <= 1.0
            assert saved[f"shots_{s}/{c}/accuracy_std"] == 0.0              # one seed
    assert not any("cyclegan" in k or "progan" in k for k in saved)
    assert saved["shots_2/real_synth_stargan/n_train"] == saved["shots_2/real_only/n_train"] + 8

    runs = json.loads((out / "downstream_runs.json").read_text())
    assert len(runs["runs"]) == 2 * 4
    assert all(r["n_real"] == 8 + 2 * r["shots"] for r in runs["runs"])   # 8 normals + shots per defect class
    assert len({r["steps"] for r in runs["runs"] if r["shots"] == 2}) == 1   # same budget per condition
    assert any("cyclegan" in n and "defect" in n for n in runs["notes"])
    assert any("progan" in n for n in runs["notes"])

    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert "accuracy_vs_shots.png" in pngs and "macro_f1_vs_shots.png" in pngs
    assert "confusion_shots_2_real_synth_stargan.png" in pngs and len(pngs) == 2 + 2 * 4
    for name in pngs:
        with Image.open(out / "plots" / name) as img:
            assert img.format == "PNG" and img.width > 50

    md = (out / "summary.md").read_text()
    assert "## Accuracy" in md and "## Macro-F1" in md and "## Per-class recall" in md
    assert "| real_synth_stargan |" in md and "± 0.000" in md
    assert ("did not help" in md) or ("helped" in md)
    assert "![accuracy_vs_shots](plots/accuracy_vs_shots.png)" in md
    assert "../data/prepared/preview.png" in md and "../data/synthetic/stargan/preview.png" in md
    assert "## Synthetic data evaluation" in md and "| stargan | 12.5 |" in md     # embedded, heading shifted

    (kind, logged, artifacts), = tracking_calls
    assert kind == "downstream" and logged["shots_2/real_only/accuracy_mean"] == saved["shots_2/real_only/accuracy_mean"]
    assert all(Path(a).is_file() for a in artifacts)


def test_did_not_help_is_said_explicitly():
    from pipeline.downstream.report import verdicts

    m = {"shots_5/real_only/accuracy_mean": 0.8, "shots_5/real_only/accuracy_std": 0.01,
         "shots_5/real_only/macro_f1_mean": 0.7,
         "shots_5/real_synth_a/accuracy_mean": 0.75, "shots_5/real_synth_a/accuracy_std": 0.01,
         "shots_5/real_synth_a/macro_f1_mean": 0.6,
         "shots_5/real_synth_b/accuracy_mean": 0.9, "shots_5/real_synth_b/accuracy_std": 0.01,
         "shots_5/real_synth_b/macro_f1_mean": 0.8}
    lines, not_helped = verdicts(m, [5], ["real_only", "real_synth_a", "real_synth_b"])
    assert not_helped == ["real_synth_a at 5 shots"]
    assert "**did not help**" in lines[0] and "-0.050" in lines[0] and "helped on average" in lines[1]


# --------------------------------------------------------------------------- bad synthetic sets

def test_wrong_class_set_is_an_error_naming_the_file(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 3, "val": 1, "test": 2})
    syn = tmp_path / "syn"
    folder = make_synthetic(syn, "stargan", ["scratch"])
    rows = pq.read_table(folder / "samples.parquet").to_pylist()
    rows[0]["label"], rows[0]["label_idx"] = "crack", 3
    pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
    with pytest.raises(PipelineError, match=r"stargan/samples\.parquet: labels \['crack'\] are not classes"):
        run_downstream(DownstreamParams(**TINY), AugmentParams(), prepared, syn, tmp_path / "out", ["stargan"])
    assert not (tmp_path / "out").exists()


def test_wrong_resolution_is_an_error_naming_the_file(tmp_path):
    prepared = make_prepared(tmp_path / "prepared", {"train": 3, "val": 1, "test": 2})
    syn = tmp_path / "syn"
    make_synthetic(syn, "defectgan", ["scratch"], res=32)
    with pytest.raises(PipelineError, match=r"defectgan/samples\.parquet: sample .* is 32x32 .* 16x16"):
        run_downstream(DownstreamParams(**TINY), AugmentParams(), prepared, syn, tmp_path / "out", ["defectgan"])
