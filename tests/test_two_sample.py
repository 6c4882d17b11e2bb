"""The classifier two-sample test (pipeline/metrics/two_sample.py) and the evaluate rows around it:
noise is detected, two halves of one set are not, the figure is deterministic per seed, the
"worse than doing nothing" flag follows the do_nothing row, and overall references hold real
defect images only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import EvaluateParams
from pipeline.metrics.data import DO_NOTHING, SyntheticSet
from pipeline.metrics.evaluate import (NOISE, REAL_VS_REAL, WORSE_FLAG, comparison_groups, flag_worse_than_do_nothing,
                                       run_evaluate)
from pipeline.metrics.two_sample import C2STSettings, c2st

from test_metrics import CLASSES, RES, _png, make_prepared, textures, tracking_calls  # noqa: F401  (autouse fixture)

FAST = C2STSettings(max_steps=100)      # 16 px images learn within 100 steps


def _noise(n: int, seed: int, res: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, res, res), dtype=np.uint8)


def test_noise_is_detected_and_two_halves_of_one_set_are_not():
    structured = textures(80, seed=0, res=16)
    detected = c2st(structured[:40], _noise(40, seed=1), seed=0, settings=FAST)
    assert detected.accuracy > 0.9
    assert detected.n_per_side == 40 and detected.n_test == 20 and len(detected.accuracies) == 3
    same = c2st(structured[::2], structured[1::2], seed=0, settings=FAST)
    assert 0.3 < same.accuracy < 0.7
    assert same.std >= 0 and len(same.steps) == 3


def test_the_larger_side_is_subsampled_so_chance_stays_one_half():
    """40 real vs 200 fake: 40 a side, test split balanced (10 + 10)."""
    result = c2st(textures(40, seed=2, res=16), textures(200, seed=3, res=16), seed=0,
                  settings=C2STSettings(splits=1, max_steps=50))
    assert result.n_per_side == 40 and result.n_test == 20


def test_c2st_is_deterministic_per_seed():
    real, fake = textures(30, seed=4, res=16), textures(30, seed=5, res=16)
    settings = C2STSettings(splits=2, max_steps=50)
    first = c2st(real, fake, seed=7, settings=settings)
    assert c2st(real, fake, seed=7, settings=settings).accuracies == first.accuracies
    assert c2st(real, fake, seed=7, settings=settings).steps == first.steps


def test_too_few_images_is_nan_not_an_error():
    result = c2st(textures(3, seed=0, res=16), _noise(50, seed=0), seed=0, settings=FAST)
    assert math.isnan(result.accuracy) and result.n_per_side == 3


def test_worse_than_do_nothing_flag_is_set_when_and_only_when_above_do_nothing():
    def row(value):
        return {"overall": {"c2st": value}}

    results = {"above": row(0.9), "equal": row(0.8), "below": row(0.6), "missing": row(None),
               NOISE: row(1.0), DO_NOTHING: row(0.8), REAL_VS_REAL: row(0.95)}
    assert flag_worse_than_do_nothing(results) == ["above", NOISE]
    assert results["above"]["overall"][WORSE_FLAG] is True and results[NOISE]["overall"][WORSE_FLAG] is True
    assert results["equal"]["overall"][WORSE_FLAG] is False and results["below"]["overall"][WORSE_FLAG] is False
    for name in ("missing", DO_NOTHING, REAL_VS_REAL):          # nothing to compare / the references themselves
        assert WORSE_FLAG not in results[name]["overall"]
    without = {"above": row(0.9), DO_NOTHING: row(float("nan"))}
    assert flag_worse_than_do_nothing(without) == [] and WORSE_FLAG not in without["above"]["overall"]


def _set(labels: list[str]) -> SyntheticSet:
    n = len(labels)
    z = np.zeros((n, 1, RES, RES), np.uint8)
    return SyntheticSet("m", Path("x"), np.zeros((n, 3, RES, RES), np.uint8), z, z, np.zeros(n, bool),
                        np.asarray(labels), np.asarray([CLASSES.index(x) if x in CLASSES else -1 for x in labels]))


def test_overall_reference_is_real_defects_only_even_when_samples_are_labelled_normal():
    real_labels = np.asarray([0, 1, 2, 0, 1, 2, 0])
    groups = {g: (r, f) for g, r, f in comparison_groups(_set(["normal", "scratch", "scratch", "normal"]),
                                                         real_labels, CLASSES)}
    assert list(groups["overall"][0]) == [1, 4] and list(groups["overall"][1]) == [1, 2]   # scratch only
    assert list(groups["normal"][0]) == [0, 3, 6]               # normals are compared in their own group
    groups = {g: (r, f) for g, r, f in comparison_groups(_set(["normal", "normal"]), real_labels, CLASSES)}
    assert list(groups["overall"][0]) == [1, 2, 4, 5] and len(groups["overall"][1]) == 0
    groups = {g: (r, f) for g, r, f in comparison_groups(_set(["defect", "normal"]), real_labels, CLASSES)}
    assert list(groups["overall"][0]) == [1, 2, 4, 5] and list(groups["overall"][1]) == [0]


def test_evaluate_rows_c2st_flags_and_defect_only_references(tmp_path, tracking_calls):
    """Issue 27's case: a "generator" whose samples are colour noise (+ a few labelled normal),
    whose do_nothing row holds real training defects (its `normal_id`s point at them), noise and
    real_vs_real: c2st on every row, the colour noise flagged worse than doing nothing in
    metrics.json and table.md, and no overall reference holding a real normal image."""
    prepared = make_prepared(tmp_path / "prepared", {"train": 10, "val": 4, "test": 6})
    table = pq.read_table(prepared / "images.parquet").to_pylist()
    normals = [r for r in table if r["split"] == "train" and r["label_idx"] == 0]
    defects = [r for r in table if r["split"] == "train" and r["label_idx"] > 0]
    picked = defects + normals[:4]                                   # 4 samples labelled normal
    colour_noise = _noise(len(picked), seed=3).transpose(0, 2, 3, 1)
    rows = [dict(id=f"g{i}", label=d["label"], label_idx=d["label_idx"], image_png=_png(colour_noise[i]),
                 mask_png=d["mask_png"], region_png=None, model="defectgan",
                 normal_id=defects[i % len(defects)]["id"]) for i, d in enumerate(picked)]
    (tmp_path / "syn" / "defectgan").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "syn" / "defectgan" / "samples.parquet")

    params = EvaluateParams(metrics=["c2st", "duplicate_rate"], c2st_max_steps=100)
    out = tmp_path / "out"
    res = run_evaluate(params, prepared, tmp_path / "syn", out, ["defectgan"])["models"]
    assert list(res) == ["defectgan", DO_NOTHING, NOISE, REAL_VS_REAL]
    n_real_defects = 2 * (4 + 6)                                     # scratch + spot in val + test
    for model in ("defectgan", DO_NOTHING, NOISE):
        ov = res[model]["overall"]
        assert ov["n_real"] == n_real_defects, model                 # never the 10 real normals
        assert 0.0 <= ov["c2st"] <= 1.0 and ov["c2st_std"] >= 0.0
    assert res["defectgan"]["overall"]["n_fake"] == len(defects)     # its normal-labelled samples left out
    assert res["defectgan"]["per_class"]["normal"]["n_real"] == 10   # ... and compared with normals there
    assert "c2st" not in res["defectgan"]["per_class"]["scratch"]    # overall only
    assert res[REAL_VS_REAL]["overall"]["n_real"] + res[REAL_VS_REAL]["overall"]["n_fake"] == n_real_defects
    assert res[NOISE]["overall"]["c2st"] > 0.9 and res["defectgan"]["overall"]["c2st"] > 0.9
    assert res[DO_NOTHING]["overall"]["c2st"] < 0.9                  # real defects as the "inputs"

    saved = json.loads((out / "metrics.json").read_text())["models"]
    text = (out / "table.md").read_text()
    for model in ("defectgan", NOISE):
        assert saved[model]["overall"][WORSE_FLAG] is True
        assert f"| {model} (worse than doing nothing) |" in text
    for model in (DO_NOTHING, REAL_VS_REAL):
        assert WORSE_FLAG not in saved[model]["overall"] and f"| {model} |" in text
