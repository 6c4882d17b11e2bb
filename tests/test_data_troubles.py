"""Real-world file troubles through the `folder` importer: never a silently wrong row.

Each test builds the troubled folder itself (tiny images) and checks what prepare writes, skips
(stats.json `skipped`) or notes (stats.json `notes`).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import BadInput
from pipeline.data.prepare import run_prepare
from test_data_helpers import decode, make_folder_dataset, prepare_params, rand_image, read_rows, save, square_mask


def _prepare(tmp_path, root, **kw):
    folder = {"root": str(root), **kw.pop("folder", {})}
    return run_prepare(prepare_params(source="folder", folder=folder, **kw), tmp_path / "out")


def _rows(tmp_path):
    return {r["id"]: r for r in read_rows(tmp_path / "out")}


def _note(stats, *needles):
    hits = [n for n in stats["notes"] if all(x in n for x in needles)]
    assert hits, (needles, stats["notes"])
    return hits[0]


# --------------------------------------------------------------------------- 1. orphan mask

def test_mask_without_its_image_is_skipped_not_imported(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    orphan = save(root / "scratch" / "orphan_mask.png", square_mask())         # no scratch/orphan.png
    stats = _prepare(tmp_path, root)
    assert "scratch/orphan_mask.png" not in _rows(tmp_path)
    assert stats["images"]["by_class"]["scratch"]["total"] == 4                  # s0..s3 only
    [skip] = stats["skipped"]
    assert skip["path"] == str(orphan) and "named like a mask" in skip["reason"]
    assert str(root / "scratch" / "orphan") in skip["reason"]                    # the image it looked for
    with pytest.raises(BadInput, match="orphan_mask.png.*named like a mask"):
        _prepare(tmp_path, root, strict=True)


def test_orphan_mask_in_a_masks_subfolder(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "src"
    for i in range(3):
        save(root / "normal" / f"n{i}.png", rand_image(rng))
        save(root / "crack" / f"c{i}.png", rand_image(rng))
        save(root / "crack" / "masks" / f"c{i}.png", square_mask())
    save(root / "crack" / "masks" / "gone.png", square_mask())                 # its crack/gone.* is missing
    stats = _prepare(tmp_path, root, folder={"mask_pattern": "masks/{stem}.png"})
    rows = _rows(tmp_path)
    assert sorted(r for r in rows if r.startswith("crack/")) == ["crack/c0.png", "crack/c1.png", "crack/c2.png"]
    assert all(rows[f"crack/c{i}.png"]["has_mask"] for i in range(3))
    assert [s["path"] for s in stats["skipped"]] == [str(root / "crack" / "masks" / "gone.png")]


def test_same_name_mask_pattern_keeps_a_lone_png_as_an_image(tmp_path):
    """`{stem}.png` beside JPEG images: a PNG without a JPEG cannot be told from an image by name."""
    rng = np.random.default_rng(2)
    root = tmp_path / "src"
    for i in range(3):
        save(root / "normal" / f"n{i}.jpg", rand_image(rng))
        save(root / "dent" / f"d{i}.jpg", rand_image(rng))
        save(root / "dent" / f"d{i}.png", square_mask())
    save(root / "dent" / "lone.png", rand_image(rng))
    stats = _prepare(tmp_path, root, folder={"mask_pattern": "{stem}.png"})
    assert "dent/lone.png" in _rows(tmp_path) and not stats["skipped"]


# --------------------------------------------------------------------------- 2. mask that marks nothing

def test_empty_masks_are_not_known_masks(tmp_path):
    root = make_folder_dataset(tmp_path / "src", size=(32, 32))
    zero = save(root / "scratch" / "s0_mask.png", np.zeros((32, 32), np.uint8))
    label01 = np.zeros((32, 32), np.uint8)
    label01[8:20, 8:20] = 1                                                     # a 0/1 label mask
    low = save(root / "scratch" / "s1_mask.png", label01)
    speck = np.zeros((32, 32), np.uint8)
    speck[5, 6] = 255                      # one pixel: at 16 px, NEAREST samples odd rows/cols only
    tiny = save(root / "scratch" / "s2_mask.png", speck)
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert [rows[f"scratch/s{i}.png"]["has_mask"] for i in range(4)] == [False, False, False, True]
    assert decode(rows["scratch/s3.png"]["mask_png"]).max() == 255
    assert str(zero) in _note(stats, "all zero")
    assert str(low) in _note(stats, "prepare.mask_threshold: 0")
    assert str(tiny) in _note(stats, "too small to survive the resize to 16 px")
    assert stats["images"]["with_mask"] == 4 + 1                                 # normals + s3
    # the 0/1 mask is usable with the threshold its note names
    stats = _prepare(tmp_path, root, mask_threshold=0)
    assert _rows(tmp_path)["scratch/s1.png"]["has_mask"] is True


# --------------------------------------------------------------------------- 3. EXIF orientation

def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_exif_orientation_is_applied_before_the_mask_check(tmp_path):
    root = make_folder_dataset(tmp_path / "src", n_scratch=3)
    stored = np.full((48, 64, 3), 30, np.uint8)        # stored 64 wide x 48 high
    stored[4:16, 40:60] = 230                          # a bright block in the stored pixels
    path = root / "scratch" / "phone.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=_exif(6))
    # Orientation 6: viewers turn the stored image 90 degrees clockwise (displayed 48 x 64).
    displayed = np.rot90(stored, k=-1)
    assert displayed.shape[:2] == (64, 48)
    mask = np.where(displayed[..., 0] > 128, 255, 0).astype(np.uint8)   # drawn as a viewer shows it
    save(root / "scratch" / "phone_mask.png", mask)
    stats = _prepare(tmp_path, root, resize="stretch")
    row = _rows(tmp_path)["scratch/phone.jpg"]
    assert row["has_mask"] and not stats["skipped"]
    img, m = decode(row["image_png"]), decode(row["mask_png"]) > 0
    red = img[..., 0].astype(int)
    assert m.any() and red[m].mean() > 190 and red[~m].mean() < 45      # image and mask agree
    assert str(path) in _note(stats, "EXIF orientation applied")


def test_exif_orientation_without_a_mask(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255                               # left half white when stored
    Image.fromarray(stored).save(root / "spot" / "turned.jpg", quality=95, exif=_exif(3))   # 3: turned 180
    _prepare(tmp_path, root, resize="stretch")
    img = decode(_rows(tmp_path)["spot/turned.jpg"]["image_png"])[..., 0].astype(int)
    assert img[:, :6].mean() < 40 and img[:, -6:].mean() > 215      # displayed: the white half is on the right


# --------------------------------------------------------------------------- 4. same pixels, two labels

def test_same_pixels_under_two_labels_are_left_out(tmp_path):
    root = make_folder_dataset(tmp_path / "src", n_normal=5)
    copy = root / "scratch" / "looks_fine.png"
    copy.write_bytes((root / "normal" / "n0.png").read_bytes())          # a normal image filed as scratch
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert "normal/n0.png" not in rows and "scratch/looks_fine.png" not in rows
    skipped = {s["path"]: s for s in stats["skipped"]}
    assert set(skipped) == {str(root / "normal" / "n0.png"), str(copy)}
    assert skipped[str(copy)]["label"] == "scratch" and "same pixels as" in skipped[str(copy)]["reason"]
    assert str(root / "normal" / "n0.png") in skipped[str(copy)]["reason"]
    assert stats["images"]["by_class"]["normal"]["total"] == 4 and stats["images"]["by_class"]["scratch"]["total"] == 4
    with pytest.raises(BadInput, match="same pixels"):
        _prepare(tmp_path, root, strict=True)


def test_a_mask_marking_the_defect_decides_the_label(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    stray = root / "normal" / "stray.png"
    stray.write_bytes((root / "scratch" / "s1.png").read_bytes())        # a scratch image (with mask) in normal/
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert "scratch/s1.png" in rows and "normal/stray.png" not in rows
    [skip] = stats["skipped"]
    assert skip["path"] == str(stray) and "kept as 'scratch'" in skip["reason"]


def test_same_label_duplicates_are_still_kept_together(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    (root / "spot" / "again.jpg").write_bytes((root / "spot" / "p0.jpg").read_bytes())
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert rows["spot/again.jpg"]["split"] == rows["spot/p0.jpg"]["split"] and not stats["skipped"]


# --------------------------------------------------------------------------- 5. multi-frame files

def test_animated_gif_uses_its_first_frame_with_a_note(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    frames = [np.zeros((20, 20, 3), np.uint8) for _ in range(3)]
    frames[0][:, :10] = (255, 0, 0)
    frames[1][:, 10:] = (0, 255, 0)
    frames[2][:] = (0, 0, 255)
    gif = root / "spot" / "blink.gif"
    pil = [Image.fromarray(f) for f in frames]
    pil[0].save(gif, save_all=True, append_images=pil[1:], duration=100, loop=0)
    assert Image.open(gif).n_frames == 3
    stats = _prepare(tmp_path, root, resolution=20)
    got = decode(_rows(tmp_path)["spot/blink.gif"]["image_png"])
    assert np.array_equal(got, frames[0])
    assert f"{gif} (3 frames)" in _note(stats, "multi-frame", "first frame")


def test_multi_page_tiff_uses_its_first_page(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    pages = [Image.fromarray(np.full((20, 20), v, np.uint8)) for v in (40, 200)]
    tif = root / "normal" / "stack.tif"
    pages[0].save(tif, save_all=True, append_images=pages[1:])
    stats = _prepare(tmp_path, root, resolution=20, channels=1)
    assert int(decode(_rows(tmp_path)["normal/stack.tif"]["image_png"]).max()) == 40
    assert f"{tif} (2 frames)" in _note(stats, "multi-frame")


# --------------------------------------------------------------------------- the sweep: other real-folder troubles

def test_masks_saved_with_another_extension_or_case_are_masks(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    for i in range(4):                                   # the default pattern says s<i>_mask.png
        (root / "scratch" / f"s{i}_mask.png").rename(root / "scratch" / f"s{i}_mask.PNG")
    (root / "scratch" / "s3_mask.PNG").unlink()
    Image.fromarray(square_mask()).save(root / "scratch" / "s3_mask.jpg", quality=70)
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert sorted(r for r in rows if r.startswith("scratch/")) == [f"scratch/s{i}.png" for i in range(4)]
    assert all(rows[f"scratch/s{i}.png"]["has_mask"] for i in range(4))
    expected = np.asarray(Image.fromarray(square_mask()).resize((16, 16), Image.NEAREST)) > 0
    assert np.array_equal(decode(rows["scratch/s3.png"]["mask_png"]) > 0, expected)     # JPEG noise thresholded
    assert "scratch/s3_mask.jpg for s3_mask.png" in _note(stats, "4 mask(s) found with another image extension")


def test_links_hidden_files_nested_folders_and_odd_names(tmp_path):
    rng = np.random.default_rng(5)
    root = make_folder_dataset(tmp_path / "src")
    elsewhere = tmp_path / "batch2"
    save(elsewhere / "b.png", rand_image(rng))
    (root / "scratch" / "batch2").symlink_to(elsewhere, target_is_directory=True)      # followed
    (root / "scratch" / "loop").symlink_to(root / "scratch", target_is_directory=True)  # read once
    (root / "scratch" / "dangling.png").symlink_to(tmp_path / "gone.png")               # broken
    (root / "scratch" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    save(root / "scratch" / "._s0.png", rand_image(rng))                                 # AppleDouble
    save(root / "scratch" / "line 1" / "tag 2" / "ünï 名前.png", rand_image(rng))
    (root / "spot" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    raw = bytes(root / "spot") + b"/caf\xe9.png"                                          # not UTF-8
    with open(raw, "wb") as fh:
        Image.fromarray(rand_image(rng)).save(fh, format="PNG")
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert {"scratch/batch2/b.png", "scratch/line 1/tag 2/ünï 名前.png", "spot/caf\\xe9.png"} <= set(rows)
    assert not [r for r in rows if "loop/" in r or "/._" in r or "DS_Store" in r]
    assert stats["images"]["by_class"]["scratch"]["total"] == 6
    [skip] = stats["skipped"]
    assert skip["path"] == str(root / "scratch" / "dangling.png") and "broken link" in skip["reason"]
    assert "spot/Thumbs.db" in _note(stats, "non-image file(s) ignored")


def _rgba(background_rgb, stroke_rgba):
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., :3] = background_rgb                          # alpha 0: transparent
    a[5:12, 5:12] = stroke_rgba
    return a


@pytest.mark.parametrize("mask", [
    _rgba((255, 255, 255), (255, 0, 0, 255)),            # red strokes on a transparent white layer
    _rgba((0, 0, 0), (0, 0, 0, 255)),                    # black strokes: only alpha marks them
    np.where(square_mask() > 0, 255, 0).astype(np.uint16),   # 8-bit values in a 16-bit PNG
    np.where(square_mask() > 0, 65535, 0).astype(np.uint16),
], ids=["rgba-white-transparent", "rgba-black-strokes", "16bit-0-255", "16bit-0-65535"])
def test_mask_encodings(tmp_path, mask):
    root = make_folder_dataset(tmp_path / "src", n_scratch=3)
    save(root / "scratch" / "enc.png", rand_image(np.random.default_rng(6)))
    save(root / "scratch" / "enc_mask.png", mask)
    _prepare(tmp_path, root, resolution=20)
    row = _rows(tmp_path)["scratch/enc.png"]
    assert row["has_mask"] and np.array_equal(decode(row["mask_png"]) > 0, square_mask() > 0)


def test_one_picture_saved_in_two_formats_is_one_source(tmp_path):
    root = make_folder_dataset(tmp_path / "src", n_scratch=6)
    picture = np.asarray(Image.open(root / "scratch" / "s0.png"))
    Image.fromarray(picture).save(root / "scratch" / "s0.jpg", quality=90)   # not byte-identical after decoding
    stats = _prepare(tmp_path, root)
    rows = _rows(tmp_path)
    assert rows["scratch/s0.png"]["source_id"] == rows["scratch/s0.jpg"]["source_id"] == "scratch/s0"
    assert rows["scratch/s0.png"]["split"] == rows["scratch/s0.jpg"]["split"]
    assert rows["scratch/s0.jpg"]["has_mask"]                                # s0_mask.png serves both
    _note(stats, "2 image(s) share folder and name")
