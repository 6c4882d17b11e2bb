"""Real-data importers (folder, mvtec, cyclegan, paired, elpv) and mode conversion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.prepare import run_prepare
from test_data_helpers import (decode, make_folder_dataset, png_mode, prepare_params, rand_image, read_rows, save,
                               square_mask)

SPLIT_ALL_TRAIN = {"train": 1.0, "val": 0.0, "test": 0.0}


def _by_id(rows):
    return {r["id"]: r for r in rows}


# --------------------------------------------------------------------------- folder

def test_folder_classes_masks_and_labels(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    stats = run_prepare(prepare_params(source="folder", folder={"root": str(root)}), tmp_path / "out")
    assert stats["classes"] == ["normal", "scratch", "spot"]          # sorted folder order
    rows = _by_id(read_rows(tmp_path / "out"))
    assert set(rows) == {f"normal/n{i}.png" for i in range(4)} | {f"scratch/s{i}.png" for i in range(4)} \
        | {f"spot/p{i}.jpg" for i in range(4)}                           # *_mask.png are not images
    s0 = rows["scratch/s0.png"]
    assert s0["label_idx"] == 1 and s0["has_mask"] is True
    mask = decode(s0["mask_png"])
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 255}
    # The 20 px source is centre-cropped (already square) and resized to 16: box 5..12 -> 4..9.6
    expected = np.asarray(Image.fromarray(square_mask()).resize((16, 16), Image.NEAREST)) > 0
    assert np.array_equal(mask > 0, expected)
    assert rows["spot/p0.jpg"]["has_mask"] is False and decode(rows["spot/p0.jpg"]["mask_png"]).max() == 0
    assert rows["normal/n0.png"]["has_mask"] is True and rows["normal/n0.png"]["label"] == "normal"
    assert read_rows(tmp_path / "out", "paired.parquet") == []


def test_folder_mapping_regex_good_and_mask_beside_jpg(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "src"
    for i in range(3):
        save(root / "good" / f"g{i}.png", rand_image(rng))
        save(root / "cls_scratch" / f"a{i}.jpg", rand_image(rng))
        save(root / "cls_scratch" / f"a{i}.png", square_mask())            # {stem}.png beside a .jpg
        save(root / "cls_dent" / f"b{i}.jpg", rand_image(rng))
        save(root / "cls_dent" / f"b{i}.png", square_mask())
    save(root / "junk" / "x.png", rand_image(rng))                          # does not match the regex
    params = prepare_params(source="folder", folder={"root": str(root), "mask_pattern": "{stem}.png",
                                                      "class_regex": "^cls_(\\w+)$",
                                                      "class_map": {"cls_dent": "pit"}})
    stats = run_prepare(params, tmp_path / "out")
    assert stats["classes"] == ["normal", "pit", "scratch"]      # cls_dent (-> pit) sorts before cls_scratch
    rows = read_rows(tmp_path / "out")
    assert {r["label"] for r in rows} == {"normal", "pit", "scratch"}
    assert all(r["has_mask"] for r in rows) and len(rows) == 9
    assert any("junk" in n for n in stats["notes"])


def test_folder_parallel_masks_tree(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "src"
    for i in range(3):
        save(root / "normal" / f"n{i}.png", rand_image(rng))
        save(root / "crack" / f"c{i}.png", rand_image(rng))
        save(root / "masks" / "crack" / f"c{i}.png", square_mask())
    params = prepare_params(source="folder", folder={"root": str(root), "mask_pattern": "{root}/masks/{class}/{stem}.png"})
    stats = run_prepare(params, tmp_path / "out")
    assert stats["classes"] == ["normal", "crack"]                          # masks/ is not a class
    rows = [r for r in read_rows(tmp_path / "out") if r["label"] == "crack"]
    assert len(rows) == 3 and all(r["has_mask"] and decode(r["mask_png"]).max() == 255 for r in rows)


def test_mask_threshold_and_crop_alignment(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(3)
    for i in range(3):
        save(root / "normal" / f"n{i}.png", rand_image(rng, (40, 20)))
    # 40x20 image: white box in the centre square; mask with 100 (below threshold) and 200 (above)
    img = np.zeros((20, 40, 3), np.uint8)
    img[4:12, 14:22] = 255
    mask = np.zeros((20, 40), np.uint8)
    mask[4:12, 14:22] = 200
    mask[14:18, 24:28] = 100
    for i in range(3):
        img[19, 10 + i] = 50          # distinct files (identical ones would be grouped as duplicates)
        save(root / "scratch" / f"s{i}.png", img)
        save(root / "scratch" / f"s{i}_mask.png", mask)
    run_prepare(prepare_params(source="folder", folder={"root": str(root)}, resolution=20), tmp_path / "out")
    row = next(r for r in read_rows(tmp_path / "out") if r["label"] == "scratch")
    got_img, got_mask = decode(row["image_png"]), decode(row["mask_png"])
    assert got_img.shape == (20, 20, 3)                 # centre crop: columns 10..30 of the source
    assert np.array_equal(got_mask > 0, mask[:, 10:30] > 127)
    assert np.array_equal(got_img[..., 0] > 127, got_mask > 0)    # image and mask stay aligned


def test_source_regex_groups_and_normal_pool(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "src"
    for part in range(6):
        save(root / "normal" / f"part{part}_before.png", rand_image(rng))
        save(root / "scratch" / f"part{part}_after.png", rand_image(rng))
    for extra in range(6):
        save(root / "normal" / f"other{extra}.png", rand_image(rng))
    params = prepare_params(source="folder", folder={"root": str(root), "source_regex": "^(part\\d+)_"},
                            split={"train": 0.5, "val": 0.25, "test": 0.25})
    stats = run_prepare(params, tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_source.values())
    for r in rows:
        if r["label"] == "normal":
            assert r["unpaired_pool"] is (not r["id"].startswith("normal/part")), r["id"]
    defect_sources = {r["source_id"] for r in rows if r["label"] != "normal"}
    pool_sources = {r["source_id"] for r in rows if r["label"] == "normal" and r["unpaired_pool"]}
    assert defect_sources and pool_sources and defect_sources.isdisjoint(pool_sources)
    assert stats["images"]["unpaired_normal_pool"] == 6


# --------------------------------------------------------------------------- mvtec

def test_mvtec_layout(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "bottle"
    for i in range(3):
        save(root / "train" / "good" / f"{i:03d}.png", rand_image(rng))
        save(root / "test" / "good" / f"{i:03d}.png", rand_image(rng))
        for defect in ("contamination", "broken_large"):
            save(root / "test" / defect / f"{i:03d}.png", rand_image(rng))
            save(root / "ground_truth" / defect / f"{i:03d}_mask.png", square_mask())
    stats = run_prepare(prepare_params(source="mvtec", mvtec={"root": str(root)}), tmp_path / "out")
    assert stats["classes"] == ["normal", "broken_large", "contamination"]
    rows = _by_id(read_rows(tmp_path / "out"))
    assert len(rows) == 12
    r = rows["test/contamination/001.png"]
    assert r["label_idx"] == 2 and r["has_mask"] and decode(r["mask_png"]).max() == 255
    assert rows["train/good/000.png"]["label"] == "normal" and decode(rows["train/good/000.png"]["mask_png"]).max() == 0


def test_mvtec_root_pointing_at_all_categories_is_explained(tmp_path):
    from pipeline.errors import DataError

    rng = np.random.default_rng(6)
    save(tmp_path / "mv" / "bottle" / "test" / "good" / "0.png", rand_image(rng))
    with pytest.raises(DataError, match="point at one of them"):
        run_prepare(prepare_params(source="mvtec", mvtec={"root": str(tmp_path / "mv")}), tmp_path / "out")


# --------------------------------------------------------------------------- cyclegan

def test_cyclegan_layout(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "cg"
    for sub, n in (("trainA", 4), ("testA", 2), ("trainB", 4), ("testB", 2)):
        for i in range(n):
            save(root / sub / f"{i}.jpg", rand_image(rng))
    stats = run_prepare(prepare_params(source="cyclegan", cyclegan={"root": str(root)}), tmp_path / "out")
    assert stats["classes"] == ["normal", "defect"]
    rows = read_rows(tmp_path / "out")
    assert sorted(r["label"] for r in rows) == ["defect"] * 6 + ["normal"] * 6
    assert all(r["label"] == ("normal" if "A/" in r["id"] else "defect") for r in rows)
    assert all(r["has_mask"] is (r["label"] == "normal") for r in rows)


# --------------------------------------------------------------------------- paired

def _pair_images(rng):
    a = rand_image(rng)
    b = a.copy()
    b[5:12, 5:12] = 255 - b[5:12, 5:12]
    return a, b


def test_paired_split_layout_with_masks(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "pp"
    for i in range(4):
        a, b = _pair_images(rng)
        save(root / "A" / f"{i}.png", a)
        save(root / "B" / f"{i}.png", b)
        save(root / "masks" / f"{i}.png", square_mask(box=(5, 5, 12, 12)))
    save(root / "A" / "orphan.png", rand_image(rng))
    stats = run_prepare(prepare_params(source="paired", paired={"root": str(root)}, resolution=20), tmp_path / "out")
    pairs = read_rows(tmp_path / "out", "paired.parquet")
    assert len(pairs) == 4 and all(p["has_mask"] for p in pairs)
    for p in pairs:
        a, b, m = decode(p["a_png"]), decode(p["b_png"]), decode(p["mask_png"]) > 0
        assert np.array_equal((a != b).any(axis=2), m)
    images = read_rows(tmp_path / "out")
    assert sorted(r["label"] for r in images) == ["defect"] * 4 + ["normal"] * 4
    assert not any(r["unpaired_pool"] for r in images if r["label"] == "normal")   # same source as a defect
    assert [s["path"] for s in stats["skipped"]] == [str(root / "A" / "orphan.png")]
    splits = {p["source_id"]: p["split"] for p in pairs}
    assert all(splits[r["source_id"]] == r["split"] for r in images)


def test_paired_ab_layout_with_diff_masks(tmp_path):
    rng = np.random.default_rng(9)
    root = tmp_path / "ab"
    for i in range(4):
        a, b = _pair_images(rng)
        save(root / "train" / f"{i}.png", np.concatenate([a, b], axis=1))
    params = prepare_params(source="paired", paired={"root": str(root), "layout": "AB", "diff_mask_threshold": 10},
                            resolution=20)
    run_prepare(params, tmp_path / "out")
    pairs = read_rows(tmp_path / "out", "paired.parquet")
    assert len(pairs) == 4
    for p in pairs:
        a, b, m = decode(p["a_png"]), decode(p["b_png"]), decode(p["mask_png"]) > 0
        assert p["has_mask"] and np.array_equal(m, np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 10)
        assert m[5:12, 5:12].mean() > 0.8 and m.sum() <= 49


# --------------------------------------------------------------------------- elpv

def test_elpv_small_cap(tmp_path):
    pytest.importorskip("elpv_dataset")
    params = prepare_params(source="elpv", elpv={"per_class": 6}, channels=1, resolution=32)
    stats = run_prepare(params, tmp_path / "out")
    assert stats["classes"] == ["normal", "defect"]
    rows = read_rows(tmp_path / "out")
    assert sorted(r["label"] for r in rows) == ["defect"] * 6 + ["normal"] * 6
    assert all(decode(r["image_png"]).shape == (32, 32) for r in rows)
    assert all(r["has_mask"] is (r["label"] == "normal") for r in rows)
    assert len({r["source_id"] for r in rows}) == 12
    img = decode(rows[0]["image_png"])
    assert img.std() > 5      # a real cell image, not a blank
    assert any("elpv" in n for n in stats["notes"])


# --------------------------------------------------------------------------- modes

def _mode_images(rng):
    rgb = rand_image(rng)
    gray = rgb[..., 0]
    return {
        "L": Image.fromarray(gray),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full(gray.shape, 7, np.uint8)])),
        "P": Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "LA": Image.fromarray(np.dstack([gray, gray])),
        "1": Image.fromarray(gray > 127),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_mode_conversion(tmp_path, channels):
    rng = np.random.default_rng(10)
    root = tmp_path / "src"
    sources = {}
    for cls in ("normal", "scratch"):
        for mode, img in _mode_images(rng).items():
            name = f"{cls}_{mode.replace(';', '')}.png"
            (root / cls).mkdir(parents=True, exist_ok=True)
            img.save(root / cls / name)
            sources[f"{cls}/{name}"] = img
    for mode, img in sources.items():
        assert Image.open(root / mode).mode == img.mode      # the files really are in these modes
    stats = run_prepare(prepare_params(source="folder", folder={"root": str(root)}, resolution=20,
                                       channels=channels), tmp_path / "out")
    rows = _by_id(read_rows(tmp_path / "out"))
    assert len(rows) == 14
    for rid, src in sources.items():
        got = decode(rows[rid]["image_png"])
        assert png_mode(rows[rid]["image_png"]) == ("L" if channels == 1 else "RGB")
        assert got.shape == ((20, 20) if channels == 1 else (20, 20, 3))
        if src.mode == "I;16":            # 16-bit scaled, not clipped: 257*v -> v
            expect = np.asarray(src, np.uint32) // 257
            ch0 = got if channels == 1 else got[..., 0]
            assert np.array_equal(ch0, expect.astype(np.uint8))
        if src.mode == "RGBA" and channels == 3:   # alpha dropped, colour kept
            assert np.array_equal(got, np.asarray(src)[..., :3])
    notes = " ".join(stats["notes"])
    assert "RGBA converted to RGB (alpha dropped)" in notes
    assert "I;16" in notes and "palette" in notes
    assert ("converted to L" in notes) if channels == 1 else ("L converted to RGB" in notes)


# --------------------------------------------------------------------------- paired: suffix layout + boxes

def _box_mask(size, *boxes):
    """0/255 mask with pixel columns x0..x1-1 and rows y0..y1-1 of each (x0, y0, x1, y1) set."""
    m = np.zeros((size, size), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = 255
    return m


def _suffix_pair(folder, pair_id, rng, boxes_text, *, box_dir=None, ext="png"):
    a = rand_image(rng)
    b = a.copy()
    b[8:12, 8:12] = 255 - b[8:12, 8:12]               # B differs from A (the content does not matter here)
    save(folder / f"{pair_id}_temp.{ext}", a)
    save(folder / f"{pair_id}_test.{ext}", b)
    if boxes_text is not None:
        txt = (box_dir or folder) / f"{pair_id}.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text(boxes_text)


def _paired(root, **paired):
    return prepare_params(source="paired", resolution=20, split=SPLIT_ALL_TRAIN,
                          paired={"root": str(root), "layout": "suffix", **paired})


def test_paired_suffix_layout_with_box_annotations(tmp_path):
    rng = np.random.default_rng(11)
    root = tmp_path / "pcb"
    _suffix_pair(root / "board1", "0001", rng, "2,3,8,9,open\n")
    _suffix_pair(root / "board1", "0002", rng, "1,1,5,5,open\n10,10,16,17,short\n")      # 16 vs 42 px
    # short: two overlapping 6x6 boxes cover 36+36-9 = 63 px (72 if overlaps counted twice); open: 8x8 = 64
    _suffix_pair(root / "board2", "0003", rng, "0,0,6,6,short\n3,3,9,9,short\n10,0,18,8,open\n")
    _suffix_pair(root / "board2", "0004", rng, "0,0,4,4,short\n\n# a tie: 16 px each\n10,10,14,14,open\n")
    stats = run_prepare(_paired(root, boxes={"pattern": "{id}.txt"}), tmp_path / "out")
    assert stats["classes"] == ["normal", "open", "short"]            # sorted, as found in the files
    assert not stats["skipped"]
    pairs = _by_id(read_rows(tmp_path / "out", "paired.parquet"))
    assert {k: p["label"] for k, p in pairs.items()} == {
        "board1/0001": "open", "board1/0002": "short", "board2/0003": "open", "board2/0004": "open"}
    expected = {"board1/0001": _box_mask(20, (2, 3, 8, 9)),
                "board1/0002": _box_mask(20, (1, 1, 5, 5), (10, 10, 16, 17)),
                "board2/0003": _box_mask(20, (0, 0, 6, 6), (3, 3, 9, 9), (10, 0, 18, 8)),
                "board2/0004": _box_mask(20, (0, 0, 4, 4), (10, 10, 14, 14))}
    for key, p in pairs.items():
        assert p["has_mask"] and np.array_equal(decode(p["mask_png"]), expected[key]), key
        assert p["source_path"] == f"{key}_temp.png|{key}_test.png"
    images = _by_id(read_rows(tmp_path / "out"))
    assert images["board1/0002/A"]["label"] == "normal" and images["board1/0002/B"]["label"] == "short"
    assert images["board1/0002/B"]["source_path"] == "board1/0002_test.png"
    assert any("3 pair(s) have boxes of several classes" in n for n in stats["notes"])   # 0002, 0003, 0004


def test_paired_boxes_yolo_style_format(tmp_path):
    rng = np.random.default_rng(12)
    root = tmp_path / "yolo"
    header = "class cx cy w h\n"
    # 20 px image: cx 0.5, cy 0.5, w 0.5, h 0.25 -> x 5..15, y 7.5..12.5 -> rows 7..12, columns 5..14
    _suffix_pair(root / "images", "a", rng, header + "1 0.5 0.5 0.5 0.25\n", box_dir=root / "labels")
    # a tie (0.2 x 0.2 each): goes to the class listed first in class_names, "short"
    _suffix_pair(root / "images", "b", rng, header + "1 0.1 0.1 0.2 0.2\n0   0.8 0.8 0.2 0.2\n",
                 box_dir=root / "labels")
    params = _paired(root, template_suffix="_temp", test_suffix="_test",
                     boxes={"pattern": "../labels/{id}.txt", "delimiter": None, "skip_lines": 1,
                            "columns": ["class", "cx", "cy", "w", "h"], "units": "fraction",
                            "class_names": {0: "short", 1: "open"}})
    stats = run_prepare(params, tmp_path / "out")
    assert stats["classes"] == ["normal", "short", "open"]              # class_names order
    pairs = _by_id(read_rows(tmp_path / "out", "paired.parquet"))
    assert pairs["images/a"]["label"] == "open" and pairs["images/b"]["label"] == "short"
    assert np.array_equal(decode(pairs["images/a"]["mask_png"]), _box_mask(20, (5, 7, 15, 13)))
    assert np.array_equal(decode(pairs["images/b"]["mask_png"]), _box_mask(20, (0, 0, 4, 4), (14, 14, 18, 18)))


def test_paired_suffix_and_box_troubles_are_skipped_with_reasons(tmp_path):
    rng = np.random.default_rng(13)
    root = tmp_path / "pcb"
    for i in range(3):
        _suffix_pair(root, f"ok{i}", rng, "1,1,6,6,open\n")
    save(root / "lonely_test.png", rand_image(rng))                         # no lonely_temp.*
    _suffix_pair(root, "twice", rng, "1,1,6,6,open\n")
    save(root / "twice_test.jpg", rand_image(rng))                          # a second test image
    save(root / "golden.png", rand_image(rng))                              # neither suffix
    _suffix_pair(root, "nobox", rng, None)
    _suffix_pair(root, "badline", rng, "1,1,6,6,open\n1,1,6,open\n")
    _suffix_pair(root, "notnum", rng, "1,1,six,6,open\n")
    _suffix_pair(root, "flat", rng, "4,1,4,6,open\n")
    _suffix_pair(root, "outside", rng, "30,30,40,40,open\n")
    _suffix_pair(root, "empty", rng, "# nothing found\n")
    _suffix_pair(root, "alien", rng, "1,1,6,6,7\n")
    params = _paired(root, boxes={"pattern": "{id}.txt", "class_names": {"open": "open"}})
    stats = run_prepare(params, tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in stats["skipped"]}
    assert set(reasons) == {str(root / n) for n in ("lonely_test.png", "twice_test.png", "nobox_test.png",
                                                     "badline.txt", "notnum.txt", "flat.txt", "outside.txt",
                                                     "empty.txt", "alien.txt")}
    assert "without its pair" in reasons[str(root / "lonely_test.png")] and "lonely_temp.*" in reasons[str(root / "lonely_test.png")]
    assert "second test image" in reasons[str(root / "twice_test.png")]      # .jpg sorts first and is kept
    assert "no box annotation file" in reasons[str(root / "nobox_test.png")]
    assert "line 2" in reasons[str(root / "badline.txt")] and "4 field(s)" in reasons[str(root / "badline.txt")]
    assert "'six', not a number" in reasons[str(root / "notnum.txt")]
    assert "no area" in reasons[str(root / "flat.txt")]
    assert "outside its 20x20 image" in reasons[str(root / "outside.txt")]
    assert "lists no boxes" in reasons[str(root / "empty.txt")]
    assert "class '7' is not in prepare.paired.boxes.class_names" in reasons[str(root / "alien.txt")]
    assert any("golden.png" in n and "neither '_temp' nor '_test'" in n for n in stats["notes"])
    pairs = read_rows(tmp_path / "out", "paired.parquet")
    assert sorted(p["id"] for p in pairs) == ["ok0", "ok1", "ok2", "twice"]
    # strict: the first bad file stops the run, named
    from pipeline.errors import DataError
    strict = prepare_params(source="paired", resolution=20, split=SPLIT_ALL_TRAIN, strict=True,
                            paired={"root": str(root), "layout": "suffix", "boxes": {"pattern": "{id}.txt"}})
    with pytest.raises(DataError, match="lonely_test.png"):
        run_prepare(strict, tmp_path / "out2")


@pytest.mark.parametrize("paired, needle", [
    ({"boxes": {"columns": ["x1", "y1", "x2", "class"]}}, "must give one box geometry"),
    ({"boxes": {"columns": ["x1", "y1", "x2", "y2", "x1"]}}, "names a column twice"),
    ({"boxes": {"columns": ["left", "y1", "x2", "y2"]}}, "unknown column name(s) ['left']"),
    ({"boxes": {"pattern": "labels.txt"}}, "must contain {id} or {stem}"),
    ({"boxes": {"pattern": "{name}.txt"}}, "unknown placeholder(s) ['name']"),
    ({"boxes": {"class_names": {"1": "normal"}}}, "prepare.paired.boxes.class_names.1"),
    ({"test_suffix": "_a", "template_suffix": "_b_a"}, "must not end with one another"),
    ({"test_suffix": ""}, "prepare.paired.test_suffix"),
    ({"layout": "suffixes"}, "Did you mean 'suffix'"),
])
def test_paired_params_are_validated(paired, needle):
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError) as err:
        prepare_params(source="paired", paired={"root": "/x", **paired})
    assert needle in str(err.value)
