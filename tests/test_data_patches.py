"""Patch mode (`prepare.resize: patches`) and the segmentation source, on generated data.

Tiny images (12-96 px) and 16 px patches: the machine is shared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_params
from pipeline.data.datasets import decode_images, read_classes, unpaired_normal_mask
from pipeline.data.prepare import run_prepare
from pipeline.errors import DataError, ParamsError
from test_data_helpers import decode, prepare_params, read_rows, save, write_params

REPO = Path(__file__).resolve().parent.parent
CLASSES = {1: "spot", 2: "scratch", 3: "crack"}
ALL_TRAIN = {"train": 1.0, "val": 0.0, "test": 0.0}


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(40, 200, (height, width), dtype=np.uint8)


def _segmentation(root: Path, images: dict[str, tuple[np.ndarray, np.ndarray]], split: str = "train") -> Path:
    """root/img_dir/<split>/<name>.png (grey) + root/ann_dir/<split>/<name>.png (class indices)."""
    for name, (image, mask) in images.items():
        save(root / "img_dir" / split / f"{name}.png", image)
        save(root / "ann_dir" / split / f"{name}.png", mask.astype(np.uint8))
    return root


def _params(root: Path, classes=(1, 2, 3), **over):
    base = dict(source="segmentation", resize="patches", resolution=16, channels=1, split=ALL_TRAIN,
                segmentation={"root": str(root), "class_names": {k: CLASSES[k] for k in classes}})
    patches = over.pop("patches", {})
    return prepare_params(**{**base, **over, "patches": patches})


def _source(root: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """The row's source image (grey) and class-index mask, read here independently of the code."""
    image = np.asarray(Image.open(root / row["source_image"]).convert("L"))
    mask_rel = Path(row["source_image"]).relative_to("img_dir").with_suffix(".png")
    return image, np.asarray(Image.open(root / "ann_dir" / mask_rel))


def _crop(a: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
    """a[y:y+size, x:x+size] of `a` reflect-padded, centred, where it is smaller than `size`."""
    height, width = a.shape
    top, left = max(0, size - height) // 2, max(0, size - width) // 2
    padded = np.pad(a, ((top, max(0, size - height) - top), (left, max(0, size - width) - left)), mode="reflect")
    return padded[y + top:y + top + size, x + left:x + left + size]


def _check_link(root: Path, row: dict, size: int = 16) -> None:
    image, mask = _source(root, row)
    x, y = row["patch_x"], row["patch_y"]
    assert np.array_equal(decode(row["image_png"]), _crop(image, x, y, size)), row["id"]
    assert np.array_equal(decode(row["mask_png"]) > 127, _crop(mask, x, y, size) > 0), row["id"]


# --------------------------------------------------------------------------- links, edges, thin defects

def test_patches_keep_source_link_and_position(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for i in range(4):
        mask = np.zeros((40, 56), np.uint8)
        mask[5 + i:9 + i, 30:34] = 1               # a spot
        mask[20:36, 10 + i] = 2                    # a 1 px vertical scratch
        images[f"im{i}"] = (_texture(rng, 40, 56), mask)
    small = np.zeros((12, 30), np.uint8)           # smaller than the patch in height: reflect-padded
    small[9:12, 26:30] = 1                         # a defect in the corner
    images["small"] = (_texture(rng, 12, 30), small)
    images["clean"] = (_texture(rng, 40, 40), np.zeros((40, 40), np.uint8))   # all-zero mask: a normal image
    root = _segmentation(tmp_path / "data", images)
    stats = run_prepare(_params(root, (1, 2), patches={"normal_per_image": 2}), tmp_path / "out", quiet=True)
    rows = read_rows(tmp_path / "out")
    assert {r["source_image"] for r in rows} == {f"img_dir/train/{n}.png" for n in images}
    for r in rows:
        _check_link(root, r)
        assert r["scale"] == 1.0 and r["schema_version"] == 2 and (r["width"], r["height"]) == (16, 16)
        assert r["id"] == f"{r['source_image']}#x{r['patch_x']}y{r['patch_y']}"
        assert r["source_path"] == r["source_image"] and r["unpaired_pool"]
    small_rows = [r for r in rows if r["source_image"].endswith("small.png")]
    assert small_rows and all(r["patch_y"] == -2 for r in small_rows)       # (16 - 12) // 2 rows of padding
    assert any(r["label"] == "spot" and (decode(r["mask_png"]) > 0).any() for r in small_rows)
    assert stats["patches"]["source_images"]["padded"] == 1
    assert stats["patches"]["source_images"]["normal"] == 1
    assert stats["patches"]["normal_from"]["normal_images"] == 2      # the clean image's two patches
    assert stats["patches"]["defect_images_without_patch"] == 0
    info = read_classes(tmp_path / "out")
    assert info["schema_version"] == 2 and info["classes"] == ["normal", "spot", "scratch"]
    assert decode_images(tmp_path / "out", "train")["image"].shape[1:] == (1, 16, 16)


def test_edge_defect_and_one_pixel_scratch_survive(tmp_path):
    rng = np.random.default_rng(1)
    edge = np.zeros((96, 96), np.uint8)
    edge[0:3, 93:96] = 1                           # 3x3 spot in the top-right corner
    scratch = np.zeros((96, 96), np.uint8)
    scratch[40:52, 60] = 2                         # a 1 px wide, 12 px long scratch
    diagonal = np.zeros((96, 96), np.uint8)
    diagonal[np.arange(90), np.arange(90)] = 3     # a 1 px diagonal crack longer than the patch
    images = {"edge": (_texture(rng, 96, 96), edge), "scratch": (_texture(rng, 96, 96), scratch),
              "diagonal": (_texture(rng, 96, 96), diagonal)}
    for name, (img, mask) in images.items():       # the defects are visible in the pixels too
        img[mask > 0] = 255
    root = _segmentation(tmp_path / "data", images)
    stats = run_prepare(_params(root), tmp_path / "out", quiet=True)
    rows = read_rows(tmp_path / "out")
    by_source = {n: [r for r in rows if r["source_image"] == f"img_dir/train/{n}.png" and r["label"] != "normal"]
                 for n in images}
    for name, label in (("edge", "spot"), ("scratch", "scratch"), ("diagonal", "crack")):
        (row,) = by_source[name]
        patch_mask = decode(row["mask_png"]) > 127
        assert row["label"] == label and patch_mask.any()
        assert (decode(row["image_png"])[patch_mask] == 255).all()
        _check_link(root, row)
    (edge_row,) = by_source["edge"]
    assert decode(edge_row["mask_png"]).astype(bool).sum() == 9      # the whole corner spot inside
    (scratch_row,) = by_source["scratch"]
    scratch_mask = decode(scratch_row["mask_png"]) > 127
    assert len(np.flatnonzero(scratch_mask.any(axis=0))) == 1 and scratch_mask.sum() == 12   # whole, 1 px wide
    assert stats["patches"]["components"]["larger_than_patch"] == 1    # the diagonal: a patch on part of it

    # The same images shrunk whole to 16 px (resize: crop) lose the thin scratch: why patches exist.
    whole = run_prepare(_params(root, resize="crop"), tmp_path / "whole", quiet=True)
    lost = [r for r in read_rows(tmp_path / "whole") if r["id"].endswith("scratch.png")]
    assert not lost[0]["has_mask"] and any("too small to survive" in n for n in whole["notes"])


def test_scale_keeps_thin_defects_and_positions_are_scaled(tmp_path):
    rng = np.random.default_rng(2)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 33] = 2                            # 1 px scratch on an odd column
    root = _segmentation(tmp_path / "data", {"a": (_texture(rng, 64, 64), mask)})
    run_prepare(_params(root, (2,), patches={"scale": 0.5}), tmp_path / "out", quiet=True)
    (row,) = [r for r in read_rows(tmp_path / "out") if r["label"] == "scratch"]
    assert row["scale"] == 0.5 and (decode(row["mask_png"]) > 127).any()
    assert 0 <= row["patch_x"] <= 32 - 16 and 0 <= row["patch_y"] <= 32 - 16   # in the 32 px scaled image


# --------------------------------------------------------------------------- classes, normals, split

def test_multi_class_components_take_their_majority_class(tmp_path):
    rng = np.random.default_rng(3)
    mask = np.zeros((80, 80), np.uint8)
    mask[5:9, 5:9] = 1                             # a spot
    mask[60:75, 60] = 3                            # a crack
    mask[30:40, 30:40] = 2                         # scratch pixels (100) ...
    mask[40:42, 30:40] = 1                         # ... touching spot pixels (20): one component, scratch
    root = _segmentation(tmp_path / "data", {"a": (_texture(rng, 80, 80), mask)})
    stats = run_prepare(_params(root, patches={"normal_per_image": 0}), tmp_path / "out", quiet=True)
    rows = read_rows(tmp_path / "out")
    assert sorted(r["label"] for r in rows) == ["crack", "scratch", "spot"]
    for r in rows:
        _check_link(root, r)
        if r["label"] == "scratch":                # its mask: the whole mixed component, both classes
            assert (decode(r["mask_png"]) > 127).sum() == 120
    assert stats["patches"]["components"]["by_class"] == {"spot": 1, "scratch": 1, "crack": 1}

    # A whole-image row takes the class with the most pixels (scratch: 100 px); spot and crack are
    # no image's majority class, which whole-image mode says, pointing to patch mode.
    with pytest.raises(DataError, match="class 'spot' .* never the class with the most pixels.*resize: patches"):
        run_prepare(_params(root, resize="crop"), tmp_path / "whole", quiet=True)
    spot, crack = np.zeros((80, 80), np.uint8), np.zeros((80, 80), np.uint8)
    spot[1:5, 1:5], crack[50:70, 3] = 1, 3
    _segmentation(root, {"b": (_texture(rng, 80, 80), spot), "c": (_texture(rng, 80, 80), crack)})
    run_prepare(_params(root, resize="crop"), tmp_path / "whole", quiet=True)
    assert {r["id"]: r["label"] for r in read_rows(tmp_path / "whole")} == {
        "img_dir/train/a.png": "scratch", "img_dir/train/b.png": "spot", "img_dir/train/c.png": "crack"}


def test_normal_patches_from_defect_images_hold_no_mask_pixel(tmp_path):
    """No normal image at all: the normal patches come from defect-free regions of defect images,
    with prepare.patches.normal_margin px of clearance, and feed the unpaired normal pool."""
    rng = np.random.default_rng(4)
    images = {}
    for i in range(6):
        mask = np.zeros((64, 64), np.uint8)
        mask[rng.integers(0, 60), :] = 2           # a scratch across the image
        mask[rng.integers(0, 60):, rng.integers(0, 60)] = 1
        images[f"im{i}"] = (_texture(rng, 64, 64), mask)
    root = _segmentation(tmp_path / "data", images)
    margin = 3
    stats = run_prepare(_params(root, (1, 2), patches={"normal_per_image": 3, "normal_margin": margin}),
                        tmp_path / "out", quiet=True)
    normals = [r for r in read_rows(tmp_path / "out") if r["label"] == "normal"]
    assert normals and stats["patches"]["normal_from"] == {"normal_images": 0, "defect_images": len(normals)}
    for r in normals:
        _check_link(root, r)
        assert not decode(r["mask_png"]).any()
        _, mask = _source(root, r)
        x, y = r["patch_x"], r["patch_y"]
        grown = mask[max(0, y - margin):y + 16 + margin, max(0, x - margin):x + 16 + margin]
        assert not grown.any(), r["id"]
    assert unpaired_normal_mask(tmp_path / "out", "train").any()      # Defect-GAN's normal pool is not empty


def test_patches_of_one_source_never_span_two_splits(tmp_path):
    rng = np.random.default_rng(5)
    images = {}
    for i in range(24):
        mask = np.zeros((48, 48), np.uint8)
        mask[rng.integers(0, 44):, rng.integers(0, 44)] = 1 + i % 3
        mask[rng.integers(0, 44), rng.integers(0, 40):] = 1 + i % 3
        images[f"im{i:02d}"] = (_texture(rng, 48, 48), mask)
    root = _segmentation(tmp_path / "data", images)
    p = _params(root, split={"train": 0.5, "val": 0.25, "test": 0.25},
                patches={"defect_per_component": 2, "normal_per_image": 2})
    run_prepare(p, tmp_path / "out", quiet=True)
    rows = read_rows(tmp_path / "out")
    splits: dict[str, set] = {}
    for r in rows:
        splits.setdefault(r["source_image"], set()).add(r["split"])
        assert r["source_id"] == r["source_image"]
    assert all(len(s) == 1 for s in splits.values())
    assert {next(iter(s)) for s in splits.values()} == {"train", "val", "test"}
    assert max(sum(r["source_image"] == k for r in rows) for k in splits) > 2   # several patches per source


def test_caps_share_splits_and_spread_over_images(tmp_path):
    rng = np.random.default_rng(6)
    images = {}
    for i in range(20):
        mask = np.zeros((64, 64), np.uint8)
        for k in range(4):                         # four separate spots per image
            mask[4 + 15 * k:7 + 15 * k, 4 + 15 * k:7 + 15 * k] = 1
        images[f"im{i:02d}"] = (_texture(rng, 64, 64), mask)
    root = _segmentation(tmp_path / "data", images)
    p = _params(root, (1,), split={"train": 0.6, "val": 0.2, "test": 0.2},
                patches={"max_defect_per_class": 20, "max_normal": 10, "normal_per_image": 2})
    stats = run_prepare(p, tmp_path / "out", quiet=True)
    by_class = stats["images"]["by_class"]
    assert by_class["spot"] == {"train": 12, "val": 4, "test": 4, "total": 20}
    assert by_class["normal"] == {"train": 6, "val": 2, "test": 2, "total": 10}
    assert stats["patches"]["candidates"]["spot"]["total"] == 80
    train = [r for r in read_rows(tmp_path / "out") if r["split"] == "train" and r["label"] == "spot"]
    assert len({r["source_image"] for r in train}) == 12          # 12 train images: one patch from each


def test_folder_source_patches_and_images_without_patch(tmp_path):
    """Patch mode with 0/255 masks (folder source): the class is the folder's; a defect image without
    a mask gives no defect patch, named with its reason; a normal image gives normal patches."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    for i in range(3):
        save(root / "normal" / f"n{i}.png", _texture(rng, 40, 40))
        mask = np.zeros((40, 40), np.uint8)
        mask[39, 10:30] = 255                       # a 1 px scratch along the bottom edge
        save(root / "scratch" / f"s{i}.png", _texture(rng, 40, 40))
        save(root / "scratch" / f"s{i}_mask.png", mask)
    save(root / "scratch" / "nomask.png", _texture(rng, 40, 40))
    p = prepare_params(source="folder", resize="patches", resolution=16, channels=1, split=ALL_TRAIN,
                       folder={"root": str(root)})
    stats = run_prepare(p, tmp_path / "out", quiet=True)
    rows = read_rows(tmp_path / "out")
    scratches = [r for r in rows if r["label"] == "scratch"]
    assert len(scratches) == 3 and all(r["patch_y"] == 40 - 16 for r in scratches)
    assert all((decode(r["mask_png"])[15] > 127).any() for r in scratches)   # the bottom row of the patch
    assert stats["patches"]["defect_images_without_patch"] == 1
    (without,) = stats["patches"]["without_patch"]
    assert without["path"].endswith("nomask.png") and "has no mask" in without["reason"]
    assert stats["patches"]["normal_from"]["normal_images"] == 3


def test_patch_output_is_deterministic(tmp_path):
    rng = np.random.default_rng(8)
    mask = np.zeros((50, 50), np.uint8)
    mask[20:24, 20:40] = 3
    root = _segmentation(tmp_path / "data", {"a": (_texture(rng, 50, 50), mask), "b": (_texture(rng, 50, 50), mask)})
    digests = []
    for out in ("one", "two"):
        run_prepare(_params(root, (3,), patches={"normal_per_image": 2, "defect_per_component": 3}), tmp_path / out,
                    quiet=True)
        digests.append(hashlib.sha256((tmp_path / out / "images.parquet").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# --------------------------------------------------------------------------- whole-image path untouched

def test_shipped_params_output_matches_dvc_lock(tmp_path):
    """The built-in data (params.yaml as shipped) prepares byte for byte what dvc.lock recorded:
    the whole-image path is unchanged by patch mode. Skipped when params.yaml's prepare section
    differs from what dvc.lock recorded (dvc.lock not reproduced yet)."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]["prepare"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in lock["params"]["params.yaml"].items():
        node = params
        for part in key.split("."):
            node = node[part]
        if node != value:
            pytest.skip(f"params.yaml {key} differs from dvc.lock: run `dvc repro prepare` first")
    cfg = load_params(REPO / "params.yaml", families=False)
    run_prepare(cfg.prepare, tmp_path / "prepared", quiet=True)
    for out in lock["outs"]:
        name = Path(out["path"]).name
        if name in ("images.parquet", "paired.parquet", "classes.json"):
            got = hashlib.md5((tmp_path / "prepared" / name).read_bytes()).hexdigest()
            assert got == out["md5"], name


# --------------------------------------------------------------------------- bad input

runner = CliRunner()


def _bad_dataset(tmp_path, damage: str) -> Path:
    rng = np.random.default_rng(9)
    images = {}
    for i in range(3):
        mask = np.zeros((32, 32), np.uint8)
        mask[10:14, 10:14] = 1
        images[f"im{i}"] = (_texture(rng, 32, 32), mask)
    root = _segmentation(tmp_path / "data", images)
    bad_mask = root / "ann_dir" / "train" / "im1.png"
    if damage == "unknown index":
        mask = np.zeros((32, 32), np.uint8)
        mask[3:6, 3:6] = 7
        save(bad_mask, mask)
    elif damage == "missing mask":
        bad_mask.unlink()
    elif damage == "size mismatch":
        save(bad_mask, np.zeros((20, 32), np.uint8))
    return root


@pytest.mark.parametrize("resize", ["patches", "crop"])
@pytest.mark.parametrize("damage, needles", [
    ("unknown index", ["ann_dir/train/im1.png", "class index 7", "prepare.segmentation.class_names"]),
    ("missing mask", ["img_dir/train/im1.png", "has no mask", "ann_dir/train/im1.png",
                      "prepare.segmentation.masks_dir"]),
    ("size mismatch", ["ann_dir/train/im1.png", "mask is 32x20", "is 32x32"]),
])
def test_bad_segmentation_input(tmp_path, damage, needles, resize):
    root = _bad_dataset(tmp_path, damage)
    prepare = {"source": "segmentation", "resize": resize, "resolution": 16, "channels": 1, "strict": True,
               "split": ALL_TRAIN, "segmentation": {"root": str(root), "class_names": {1: "spot"}}}
    out = tmp_path / "out"
    result = runner.invoke(app, ["prepare", "--params", str(write_params(tmp_path / "p.yaml", prepare)),
                                 "--out", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    text = " ".join(result.output.split())          # rich wraps long lines
    for needle in needles:
        assert needle in text, (needle, result.output)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # strict: false skips the file and names it in stats.json; the other images are prepared.
    prepare["strict"] = False
    result = runner.invoke(app, ["prepare", "--params", str(write_params(tmp_path / "p.yaml", prepare)),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert [s["path"].endswith("im1.png") for s in stats["skipped"]] == [True]
    assert "im1.png" not in " ".join(r["source_path"] for r in read_rows(out))


def test_empty_or_wrong_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no img_dir/ folder \(prepare.segmentation.images_dir\)"):
        run_prepare(_params(tmp_path / "empty"), tmp_path / "out", quiet=True)
    (tmp_path / "empty" / "img_dir" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "ann_dir").mkdir()
    with pytest.raises(DataError, match="no image files under"):
        run_prepare(_params(tmp_path / "empty"), tmp_path / "out", quiet=True)
    with pytest.raises(DataError, match="prepare.segmentation.root: .* does not exist"):
        run_prepare(_params(tmp_path / "nowhere"), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prepare, needle", [
    ({"resize": "patches"}, "prepare.resize' is 'patches'"),                        # synthetic source
    ({"resize": "patches", "source": "cyclegan", "cyclegan": {"root": "x"}}, "not 'cyclegan'"),
    ({"source": "segmentation", "segmentation": {"root": "x"}}, "prepare.segmentation.class_names' must map"),
    ({"source": "segmentation", "segmentation": {"root": "x", "class_names": {0: "a"}}}, "0 is background"),
    ({"segmentation": {"class_names": {1: "a", 2: "a"}}}, "names a class twice"),
    ({"segmentation": {"class_names": {1: "normal"}}}, "not 'normal'"),
    ({"patches": {"jitter": 2}}, "prepare.patches.jitter"),
    ({"patches": {"scale": 0}}, "prepare.patches.scale"),
    ({"patches": {"max_normal": -1}}, "prepare.patches.max_normal"),
    ({"patches": {"normal_per_imag": 1}}, "Did you mean 'prepare.patches.normal_per_image'"),
])
def test_patch_and_segmentation_params_are_validated(tmp_path, prepare, needle):
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path / "p.yaml", prepare), families=False)
    assert needle in str(err.value)


def test_neu_seg_preset_is_a_complete_params_file():
    """presets/neu-seg.yaml validates like params.yaml (every section) and sets what it says:
    the segmentation source in patch mode, Defect-GAN only, the CPU preset for 64 px grey data."""
    preset = load_params(REPO / "presets" / "neu-seg.yaml", families=False)
    shipped = load_params(REPO / "params.yaml", families=False)
    p = preset.prepare
    assert (p.source, p.resize, p.channels, p.resolution) == ("segmentation", "patches", 1, 64)
    assert p.segmentation.root == "../shared/data/neu-seg"
    assert p.segmentation.class_names == {1: "inclusion", 2: "patches", 3: "scratches"}
    assert preset.generate.models == ["defectgan"]
    assert preset.train["common"]["kimg"] == 4 and preset.train["defectgan"]["d_warmup_kimg"] == 0.8
    assert set(preset.train) == set(shipped.train)
