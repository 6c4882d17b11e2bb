"""Pseudo-masks for defect images without masks (prepare.pseudo_masks; pipeline/data/pseudo_masks.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.prepare import run_prepare
from pipeline.data.pseudo_masks import normal_reference_masks
from pipeline.errors import DataError
from test_data_helpers import decode, prepare_params, read_rows, save


def _surfaces(rng, n, size=16):
    """n grey surfaces of two kinds (like mono / poly cells): a horizontal or a vertical bar
    pattern, plus mild pixel noise."""
    y, x = np.mgrid[:size, :size]
    kinds = [(np.sin(y / 2.0) > 0), (np.sin(x / 2.0) > 0)]
    out = []
    for i in range(n):
        base = 110 + 60 * kinds[i % 2].astype(np.float32)
        out.append(np.clip(base + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8))
    return np.stack(out)


def test_marks_the_dark_square_and_nothing_on_a_clean_surface():
    rng = np.random.default_rng(0)
    normals = _surfaces(rng, 40)
    defects = _surfaces(rng, 6)
    defects[:4, 4:9, 6:11] = 10             # a dark 5x5 patch on four of them; two stay clean
    found = normal_reference_masks(defects, normals, neighbours=3, quantile=0.995)
    patch = np.zeros((16, 16), bool)
    patch[4:9, 6:11] = True
    grown = np.zeros((16, 16), bool)          # the 3x3 blur can reach one pixel past the patch
    grown[3:10, 5:12] = True
    for mask in found.masks[:4]:
        assert (mask & patch).sum() == patch.sum()
        assert (mask & ~grown).sum() <= 6      # a stray cluster at most (see below)
    # The clean ones: at most a stray pixel or two (about 0.5 % of normal pixels pass by design,
    # and speckle is removed).
    assert found.masks[4:].sum() <= 4
    assert 0 < found.threshold < 100 / 255
    # min_area drops masks smaller than a share of the image: speckle goes, the patch stays.
    sized = normal_reference_masks(defects, normals, neighbours=3, quantile=0.995, min_area=0.1)
    assert np.array_equal(sized.masks[:3], found.masks[:3]) and not sized.masks[4:].any()
    assert not normal_reference_masks(defects, normals, neighbours=3, min_area=0.5).masks.any()


def test_threshold_is_the_quantile_of_normal_deviations():
    """Calibrated on normals against their *other* nearest normals: about (1 - quantile) of normal
    pixels lie above the threshold, so a looser quantile gives a lower threshold and larger masks."""
    rng = np.random.default_rng(1)
    normals = _surfaces(rng, 30)
    defects = _surfaces(rng, 3)
    defects[:, 2:12, 2:6] = np.clip(defects[:, 2:12, 2:6].astype(int) - 40, 0, 255)   # a faint stain
    strict = normal_reference_masks(defects, normals, neighbours=3, quantile=0.999)
    loose = normal_reference_masks(defects, normals, neighbours=3, quantile=0.9)
    assert loose.threshold < strict.threshold
    assert loose.masks.sum() >= strict.masks.sum()
    # A normal image scored against the others is mostly empty at the shipped quantile.
    alone = normal_reference_masks(normals[:5], normals[5:], neighbours=3, quantile=0.995)
    assert alone.masks.mean() < 0.02


def test_needs_more_normals_than_neighbours():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="need more"):
        normal_reference_masks(_surfaces(rng, 2), _surfaces(rng, 3), neighbours=3)


def _folder_without_masks(root, rng, n_normal=24, n_defect=6):
    for i, img in enumerate(_surfaces(rng, n_normal)):
        save(root / "normal" / f"n{i:02d}.png", img)
    defects = _surfaces(rng, n_defect)
    defects[:-1, 3:8, 3:8] = 5               # the last defect image shows nothing visible
    for i, img in enumerate(defects):
        save(root / "crack" / f"c{i}.png", img)
    return root


def test_prepare_fills_masks_for_defects_without_one(tmp_path):
    root = _folder_without_masks(tmp_path / "src", np.random.default_rng(3))
    params = dict(source="folder", folder={"root": str(root)}, resolution=16, channels=1,
                  split={"train": 0.6, "val": 0.2, "test": 0.2})
    plain = run_prepare(prepare_params(**params), tmp_path / "plain", quiet=True)
    assert plain["pseudo_masks"] is None
    assert not any(r["has_mask"] for r in read_rows(tmp_path / "plain") if r["label"] == "crack")

    stats = run_prepare(prepare_params(**params, pseudo_masks={"method": "normal_reference", "neighbours": 3}),
                        tmp_path / "out", quiet=True)
    rows = {r["id"]: r for r in read_rows(tmp_path / "out")}
    for i in range(5):
        row = rows[f"crack/c{i}.png"]
        assert row["has_mask"] is True
        assert decode(row["mask_png"])[3:8, 3:8].mean() > 200          # the dark patch is marked
    assert rows["crack/c5.png"]["has_mask"] is False                    # nothing found: stays unknown
    assert all(r["has_mask"] and decode(r["mask_png"]).max() == 0 for r in rows.values() if r["label"] == "normal")
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())["pseudo_masks"]
    assert on_disk == stats["pseudo_masks"]
    assert on_disk["method"] == "normal_reference" and on_disk["masked"] == 5 and on_disk["empty"] == 1
    # Same params, same bytes.
    run_prepare(prepare_params(**params, pseudo_masks={"method": "normal_reference", "neighbours": 3}),
                tmp_path / "again", quiet=True)
    assert (tmp_path / "again" / "images.parquet").read_bytes() == (tmp_path / "out" / "images.parquet").read_bytes()


def test_prepare_says_when_there_are_too_few_normals(tmp_path):
    root = _folder_without_masks(tmp_path / "src", np.random.default_rng(4), n_normal=6, n_defect=6)
    params = prepare_params(source="folder", folder={"root": str(root)}, resolution=16, channels=1,
                            pseudo_masks={"method": "normal_reference", "neighbours": 5})
    with pytest.raises(DataError, match=r"prepare\.pseudo_masks\.neighbours"):
        run_prepare(params, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
