"""The embedded synthetic source and the output layout it produces."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.prepare import run_prepare
from test_data_helpers import decode, png_mode, prepare_params, read_rows

IMAGE_COLS = ["schema_version", "id", "split", "label", "label_idx", "image_png", "mask_png", "has_mask",
              "unpaired_pool", "width", "height", "channels", "source_path", "source_id", "content_hash"]
PAIRED_COLS = ["schema_version", "id", "split", "label", "label_idx", "a_png", "b_png", "mask_png", "has_mask",
               "width", "height", "channels", "source_path", "source_id", "content_hash"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "prepared"
    stats = run_prepare(prepare_params(), out)
    return out, stats


def test_layout_schema_and_counts(prepared):
    out, stats = prepared
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "images.parquet", "paired.parquet",
                                                     "preview.png", "stats.json"]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"classes": ["normal", "scratch", "spot", "crack", "pit"], "resolution": 16,
                       "channels": 3, "schema_version": 1}
    for name, cols in (("images.parquet", IMAGE_COLS), ("paired.parquet", PAIRED_COLS)):
        schema = pq.read_schema(out / name)
        assert schema.names == cols
        assert schema.metadata[b"schema_version"] == b"1"
    rows = read_rows(out)
    assert len(rows) == 12 + 4 * 6
    counts = {c: sum(r["label"] == c for r in rows) for c in classes["classes"]}
    assert counts == {"normal": 12, "scratch": 6, "spot": 6, "crack": 6, "pit": 6}
    assert all(r["label_idx"] == classes["classes"].index(r["label"]) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["images"]["by_class"]["scratch"]["total"] == 6
    assert on_disk["paired"]["total"] == 8
    assert sum(on_disk["images"]["by_split"].values()) == len(rows)
    assert on_disk["skipped"] == [] and isinstance(on_disk["notes"], list)
    assert stats["images"] == on_disk["images"]


def test_images_masks_and_hashes(prepared):
    out, _ = prepared
    for r in read_rows(out):
        img, mask = decode(r["image_png"]), decode(r["mask_png"])
        assert img.shape == (16, 16, 3) and png_mode(r["image_png"]) == "RGB"
        assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 255}
        assert (r["width"], r["height"], r["channels"], r["schema_version"]) == (16, 16, 3, 1)
        assert r["content_hash"] == hashlib.sha256(r["image_png"]).hexdigest()
        assert r["has_mask"] is True
        if r["label"] == "normal":
            assert mask.max() == 0
        else:
            assert mask.max() == 255, r["id"]


def test_surfaces_and_classes_cover_textures(prepared):
    out, _ = prepared
    rows = read_rows(out)
    textures = {r["source_path"].split("/")[2] for r in rows}
    assert textures == {"brushed_metal", "woven_fabric", "speckled"}
    for cls in ("scratch", "spot", "crack", "pit"):
        assert {r["source_path"].split("/")[2] for r in rows if r["label"] == cls} == textures


def test_pairs_differ_exactly_inside_the_mask(prepared):
    out, _ = prepared
    pairs = read_rows(out, "paired.parquet")
    assert len(pairs) == 8 and {p["label"] for p in pairs} == {"scratch", "spot", "crack", "pit"}
    for p in pairs:
        a, b, m = decode(p["a_png"]), decode(p["b_png"]), decode(p["mask_png"]) > 0
        changed = (a != b).any(axis=2)
        assert m.any()
        assert np.array_equal(changed, m), p["id"]   # the mask is exactly the changed pixels
        assert p["content_hash"] == hashlib.sha256(p["a_png"] + p["b_png"]).hexdigest()


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    params = prepare_params(synthetic={"per_class": 3, "normal": 6, "paired": 4}, split={"train": 0.34, "val": 0.33, "test": 0.33})
    run_prepare(params, tmp_path / "a")
    run_prepare(params, tmp_path / "b")
    for name in ("images.parquet", "paired.parquet", "classes.json", "stats.json", "preview.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run_prepare(prepare_params(seed=1, synthetic={"per_class": 3, "normal": 6, "paired": 4},
                               split={"train": 0.34, "val": 0.33, "test": 0.33}), tmp_path / "c")
    a = [r["content_hash"] for r in read_rows(tmp_path / "a")]
    c = [r["content_hash"] for r in read_rows(tmp_path / "c")]
    assert set(a).isdisjoint(c)


def test_counts_of_one_class_do_not_change_other_images(tmp_path):
    run_prepare(prepare_params(synthetic={"per_class": 3, "normal": 3, "paired": 0},
                               split={"train": 1.0, "val": 0.0, "test": 0.0}), tmp_path / "a")
    run_prepare(prepare_params(synthetic={"per_class": 4, "normal": 3, "paired": 0},
                               split={"train": 1.0, "val": 0.0, "test": 0.0}), tmp_path / "b")
    a = {r["id"]: r["content_hash"] for r in read_rows(tmp_path / "a")}
    b = {r["id"]: r["content_hash"] for r in read_rows(tmp_path / "b")}
    assert all(b[k] == v for k, v in a.items())
    assert len(b) == len(a) + 4


def test_grayscale_and_class_aliases(tmp_path):
    stats = run_prepare(prepare_params(channels=1, synthetic={"classes": ["stain", "dent"], "textures": ["granular"],
                                                              "per_class": 3, "normal": 3, "paired": 3}),
                        tmp_path / "g")
    assert stats["classes"] == ["normal", "stain", "dent"]
    for r in read_rows(tmp_path / "g"):
        assert png_mode(r["image_png"]) == "L" and decode(r["image_png"]).shape == (16, 16)
        assert r["channels"] == 1


def test_default_params_prepare_is_fast(tmp_path):
    from pipeline.config import load_params, REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml").prepare
    assert params.source == "synthetic" and params.resolution == 32
    start = time.perf_counter()
    stats = run_prepare(params, tmp_path / "default")
    assert time.perf_counter() - start < 30
    assert stats["images"]["total"] == params.synthetic.normal + params.synthetic.per_class * len(params.synthetic.classes)
    assert stats["paired"]["total"] == params.synthetic.paired


# --------------------------------------------------------------------------- production preset

PRODUCTION = {"preset": "production",
              "production": {"per_class": {"crack": 12, "pit": 10, "stain": 8}, "normal": 30, "paired": 6}}


def production_params(**overrides):
    return prepare_params(resolution=64, channels=1, synthetic=PRODUCTION, **overrides)


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    out = tmp_path_factory.mktemp("prod") / "prepared"
    params = production_params()
    return out, run_prepare(params, out), params


def rendered(params, resolution=64, channels=1):
    """(spec, clean, mask, defective) of every defect image and pair, through the importer's renderer."""
    from pipeline.data.synthetic import render_spec, specs

    for spec in specs(params.synthetic, params.seed):
        if spec.kind != "normal":
            yield (spec, *render_spec(spec, resolution, channels))


def test_production_class_counts_order_and_grayscale(production):
    out, stats, _ = production
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == ["normal", "crack", "pit", "stain"] and classes["channels"] == 1
    rows = read_rows(out)
    counts = {c: sum(r["label"] == c for r in rows) for c in classes["classes"]}
    assert counts == {"normal": 30, "crack": 12, "pit": 10, "stain": 8}
    assert len(read_rows(out, "paired.parquet")) == 6
    assert {r["source_path"].split("/")[2] for r in rows} == {"brushed_steel", "cast_matte", "machined"}
    for r in rows:
        assert png_mode(r["image_png"]) == "L" and decode(r["image_png"]).shape == (64, 64)
    assert any("production preset" in n for n in stats["notes"])


def test_production_class_order_follows_the_mapping(tmp_path):
    params = prepare_params(resolution=32, channels=1, split={"train": 1.0, "val": 0.0, "test": 0.0},
                            synthetic={"preset": "production",
                                       "production": {"per_class": {"stain": 2, "crack": 3}, "normal": 4,
                                                      "paired": 0}})
    stats = run_prepare(params, tmp_path / "p")
    assert stats["classes"] == ["normal", "stain", "crack"]
    assert {k: v["total"] for k, v in stats["images"]["by_class"].items()} == {"normal": 4, "stain": 2, "crack": 3}


def test_production_masks_are_exactly_the_changed_pixels(production):
    out, _, params = production
    n = 0
    for spec, clean, mask, bad in rendered(params):
        assert mask.any(), spec
        assert np.array_equal(mask > 0, (bad != clean).any(axis=2)), spec
        n += 1
    assert n == 12 + 10 + 8 + 6
    for p in read_rows(out, "paired.parquet"):          # and in the prepared pairs
        a, b, m = decode(p["a_png"]), decode(p["b_png"]), decode(p["mask_png"]) > 0
        assert m.any() and np.array_equal(a != b, m), p["id"]


def _mean_change_in_mask(clean, mask, bad):
    """Mean |defective - clean| over the mask, as a fraction of full scale."""
    diff = np.abs(bad.astype(np.int16) - clean.astype(np.int16)).max(axis=2)
    return diff[mask > 0].mean() / 255.0, diff.max() / 255.0


def test_production_defects_are_faint_but_visible_unlike_classic(production):
    _, _, params = production
    faint = {}
    for spec, clean, mask, bad in rendered(params):
        mean, peak = _mean_change_in_mask(clean, mask, bad)
        texture = clean.std() / 255.0
        assert mean <= 0.15, (spec, mean)                 # low contrast: at most ~38 grey levels on average
        assert peak >= 4 * 0.01, (spec, peak)             # ... but 4x the strongest sensor noise somewhere
        faint.setdefault(spec.label, []).append(mean / texture)
    # Against the surface's own variation the defects stand out about as much as real faint
    # defects do: about 1-6 standard deviations of the clean image.
    for label, ratios in faint.items():
        assert 1.0 <= np.median(ratios) <= 6.0, (label, np.median(ratios))
    classic = prepare_params(resolution=64, channels=1, synthetic={"per_class": 6, "normal": 1, "paired": 0})
    bold = [_mean_change_in_mask(c, m, b)[0] for _, c, m, b in rendered(classic)]
    assert np.median(bold) > 0.15                         # the measure separates the presets


def test_production_cracks_are_thin_and_pits_small(production):
    from scipy import ndimage

    _, _, params = production
    for spec, clean, mask, bad in rendered(params):
        m = mask > 0
        if spec.label == "crack":
            # Distance to the nearest background pixel: 1 for every pixel of a 1-2 px line; more
            # only where a diagonal step or a branch joins.
            depth = ndimage.distance_transform_edt(m)[m]
            assert depth.max() <= 2.0 and (depth > 1.5).mean() <= 0.05, spec
        elif spec.label == "pit":
            ys, xs = np.nonzero(m)                        # 2-5 px dark core + 1 px rim
            assert 2 <= np.ptp(ys) + 1 <= 7 and 2 <= np.ptp(xs) + 1 <= 7, spec
            core = clean[m].astype(int).mean() - bad[m].astype(int).mean()
            assert core > 0, spec                         # a dark dot overall, despite the lighter rim
            assert (bad[m].astype(int) > clean[m].astype(int)).any(), spec   # the rim is lighter


def test_production_same_seed_is_byte_identical_other_seed_differs(tmp_path):
    run_prepare(production_params(), tmp_path / "a")
    run_prepare(production_params(), tmp_path / "b")
    for name in ("images.parquet", "paired.parquet", "classes.json", "stats.json", "preview.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    run_prepare(production_params(seed=1), tmp_path / "c")
    a = [r["content_hash"] for r in read_rows(tmp_path / "a")]
    c = [r["content_hash"] for r in read_rows(tmp_path / "c")]
    assert set(a).isdisjoint(c)


def test_production_with_three_channels_is_grey(tmp_path):
    params = prepare_params(resolution=32, channels=3, synthetic={
        "preset": "production", "production": {"per_class": {"pit": 2, "crack": 2}, "normal": 2, "paired": 0}},
        split={"train": 1.0, "val": 0.0, "test": 0.0})
    run_prepare(params, tmp_path / "rgb")
    for r in read_rows(tmp_path / "rgb"):
        img = decode(r["image_png"])
        assert img.shape == (32, 32, 3) and (img == img[:, :, :1]).all()


@pytest.mark.parametrize("production, expected", [
    ({"per_class": {"crak": 3}}, ["prepare.synthetic.production.per_class", "'crak'", "Did you mean 'crack'"]),
    ({"per_class": {"pit": 0}}, ["prepare.synthetic.production.per_class.pit", "greater than 0"]),
    ({"per_class": {}}, ["prepare.synthetic.production.per_class", "at least one"]),
    ({"per_class": [3]}, ["prepare.synthetic.production.per_class", "mapping"]),
    ({"textures": ["brushed_metal"]}, ["prepare.synthetic.production.textures", "brushed_steel"]),
    ({"normal": 0}, ["prepare.synthetic.production.normal", "greater than 0"]),
])
def test_production_params_errors_name_the_key(production, expected):
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError) as err:
        prepare_params(synthetic={"preset": "production", "production": production})
    for text in expected:
        assert text in str(err.value)


def test_unknown_preset_is_an_error_naming_the_choices():
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError) as err:
        prepare_params(synthetic={"preset": "prodution"})
    msg = str(err.value)
    assert "prepare.synthetic.preset" in msg and "'classic'" in msg and "Did you mean 'production'" in msg
