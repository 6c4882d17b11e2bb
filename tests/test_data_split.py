"""Split rules: stratified by class, grouped by source, disjoint normal pool, seeded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.data.prepare import run_prepare
from pipeline.data.split import assign_splits, split_counts
from pipeline.errors import DataError
from test_data_helpers import prepare_params, rand_image, read_rows, save


def test_split_counts():
    f = {"train": 0.7, "val": 0.15, "test": 0.15}
    assert split_counts(40, f) == {"train": 28, "val": 6, "test": 6}
    assert split_counts(3, f) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(10, {"train": 1.0, "val": 0.0, "test": 0.0}) == {"train": 10, "val": 0, "test": 0}
    assert split_counts(4, {"train": 0.5, "val": 0.5, "test": 0.0}) == {"train": 2, "val": 2, "test": 0}


def test_assign_splits_is_stratified_seeded_and_checks_size():
    f = {"train": 0.6, "val": 0.2, "test": 0.2}
    groups = {f"a{i}": "a" for i in range(10)} | {f"b{i}": "b" for i in range(5)}
    s0 = assign_splits(groups, {}, f, seed=0)
    assert Counter(s0[g] for g in groups if g.startswith("a")) == {"train": 6, "val": 2, "test": 2}
    assert Counter(s0[g] for g in groups if g.startswith("b")) == {"train": 3, "val": 1, "test": 1}
    assert assign_splits(groups, {}, f, seed=0) == s0
    assert any(assign_splits(groups, {}, f, seed=s) != s0 for s in range(1, 5))
    # adding a class does not move another class's groups
    more = groups | {f"c{i}": "c" for i in range(4)}
    s1 = assign_splits(more, {}, f, seed=0)
    assert all(s1[g] == s0[g] for g in groups)
    with pytest.raises(DataError, match="class 'tiny' has 2 usable"):
        assign_splits({"t0": "tiny", "t1": "tiny"}, {"tiny": 2}, f, seed=0)
    lenient = assign_splits({"t0": "p", "t1": "p"}, {}, f, seed=0, lenient=frozenset({"p"}))
    assert sorted(lenient.values()) == ["train", "val"]


def test_synthetic_split_is_stratified_and_grouped(tmp_path):
    run_prepare(prepare_params(synthetic={"per_class": 10, "normal": 20, "paired": 12}), tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    pairs = read_rows(tmp_path / "out", "paired.parquet")
    for cls in ("normal", "scratch", "spot", "crack", "pit"):
        n = Counter(r["split"] for r in rows if r["label"] == cls)
        total = sum(n.values())
        assert set(n) == {"train", "val", "test"}, cls
        assert n["train"] == total - 2 * round(total * 0.15 + 1e-9), (cls, n)
    splits_of = {}
    for r in rows + pairs:
        splits_of.setdefault(r["source_id"], set()).add(r["split"])
    assert all(len(v) == 1 for v in splits_of.values())
    assert {r["source_id"] for r in rows}.isdisjoint({p["source_id"] for p in pairs})
    assert set(Counter(p["split"] for p in pairs)) == {"train", "val", "test"}
    # synthetic normals are independent surfaces: all of them are in the unpaired pool
    assert all(r["unpaired_pool"] for r in rows)


def _write_folder(root, rng, duplicate=False):
    for i in range(6):
        save(root / "normal" / f"n{i}.png", rand_image(rng))
    for i in range(6):
        img = rand_image(rng)
        save(root / "scratch" / f"s{i}.png", img)
        if duplicate and i == 0:
            save(root / "scratch" / "copy_of_s0.png", img)     # same bytes, different name


def test_duplicates_stay_in_one_split(tmp_path):
    rng = np.random.default_rng(0)
    _write_folder(tmp_path / "src", rng, duplicate=True)
    for seed in range(4):
        stats = run_prepare(prepare_params(seed=seed, source="folder", folder={"root": str(tmp_path / "src")}),
                            tmp_path / "out")
        rows = {r["id"]: r for r in read_rows(tmp_path / "out")}
        assert rows["scratch/s0.png"]["split"] == rows["scratch/copy_of_s0.png"]["split"]
        assert any("byte-identical" in n for n in stats["notes"])


def test_normal_pool_is_disjoint_from_defect_sources(tmp_path):
    """A normal and a defect view of the same part share a source id: same split, not in the pool."""
    rng = np.random.default_rng(1)
    root = tmp_path / "src"
    for part in range(8):
        save(root / "normal" / f"part{part}-ok.png", rand_image(rng))
        save(root / ("scratch" if part % 2 else "spot") / f"part{part}-bad.png", rand_image(rng))
    for i in range(4):
        save(root / "normal" / f"free{i}.png", rand_image(rng))
    params = prepare_params(source="folder", folder={"root": str(root), "source_regex": "^(part\\d+)-"},
                            split={"train": 0.5, "val": 0.25, "test": 0.25})
    run_prepare(params, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    defect_sources = {r["source_id"] for r in rows if r["label"] != "normal"}
    pool = [r for r in rows if r["label"] == "normal" and r["unpaired_pool"]]
    assert sorted(r["id"] for r in pool) == [f"normal/free{i}.png" for i in range(4)]
    assert defect_sources.isdisjoint(r["source_id"] for r in pool)
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_source.values())
    # the same pool through the torch views
    from pipeline.data.datasets import UnpairedDataset, decode_images, unpaired_normal_mask

    for split in ("train", "val", "test"):
        data, pool_mask = decode_images(tmp_path / "out", split), unpaired_normal_mask(tmp_path / "out", split)
        split_rows = [r for r in rows if r["split"] == split]
        assert pool_mask.tolist() == [r["label"] == "normal" and r["unpaired_pool"] for r in split_rows]
        assert len(pool_mask) == len(data["label"])
    ds = UnpairedDataset(tmp_path / "out", "train")
    assert len(ds.a) == sum(1 for r in pool if r["split"] == "train")
