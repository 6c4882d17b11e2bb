"""Torch views over a prepared dataset and the augmentation pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentParams
from pipeline.data.datasets import (LabelledDataset, PairedDataset, UnpairedDataset, build_augment, decode_images,
                                    decode_pairs, read_classes)
from pipeline.data.prepare import run_prepare
from pipeline.errors import DataError
from test_data_helpers import decode, make_folder_dataset, prepare_params, read_rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "prepared"
    run_prepare(prepare_params(synthetic={"per_class": 5, "normal": 10, "paired": 8}), out)
    return out


def test_read_classes_and_not_a_dataset(prepared, tmp_path):
    info = read_classes(prepared)
    assert info["classes"][0] == "normal" and info["resolution"] == 16 and info["channels"] == 3
    with pytest.raises(DataError, match="not a prepared dataset.*pipeline prepare"):
        read_classes(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        decode_images(tmp_path / "nope")


def test_decode_images_shapes_splits_and_shards(prepared):
    rows = read_rows(prepared)
    train = decode_images(prepared)
    n_train = sum(r["split"] == "train" for r in rows)
    assert set(train) == {"image", "mask", "label", "has_mask"}
    assert train["has_mask"].tolist() == [r["has_mask"] for r in rows if r["split"] == "train"]
    assert train["image"].shape == (n_train, 3, 16, 16) and train["image"].dtype == torch.uint8
    assert train["mask"].shape == (n_train, 1, 16, 16) and train["mask"].dtype == torch.uint8
    assert set(train["mask"].unique().tolist()) == {0, 1}
    assert train["label"].dtype == torch.int64
    everything = decode_images(prepared, split=None)
    assert len(everything["label"]) == len(rows)
    # row 0 of the file decodes to the same pixels
    first = decode(rows[0]["image_png"])
    assert torch.equal(everything["image"][0], torch.from_numpy(first).permute(2, 0, 1))
    s0, s1 = decode_images(prepared, None, shard=(0, 2)), decode_images(prepared, None, shard=(1, 2))
    assert torch.equal(s0["image"], everything["image"][0::2]) and torch.equal(s1["label"], everything["label"][1::2])
    assert len(s0["label"]) + len(s1["label"]) == len(rows)
    with pytest.raises(DataError, match="split"):
        decode_images(prepared, "training")
    with pytest.raises(DataError, match="shard"):
        decode_images(prepared, shard=(2, 2))


def test_decode_pairs_and_empty_pairs(prepared, tmp_path):
    pairs = decode_pairs(prepared, split=None)
    assert pairs["a"].shape == pairs["b"].shape == (8, 3, 16, 16)
    assert pairs["mask"].shape == (8, 1, 16, 16) and pairs["label"].min() >= 1
    changed = (pairs["a"] != pairs["b"]).any(dim=1, keepdim=True)
    assert torch.equal(changed.to(torch.uint8), pairs["mask"])
    root = make_folder_dataset(tmp_path / "src")
    run_prepare(prepare_params(source="folder", folder={"root": str(root)}), tmp_path / "folder")
    empty = decode_pairs(tmp_path / "folder")
    assert empty["a"].shape == (0, 3, 16, 16) and empty["label"].shape == (0,)
    with pytest.raises(DataError, match="no pairs"):
        PairedDataset(tmp_path / "folder", "train")


def test_augment_flips_image_and_mask_identically():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 1:9] = 1
    out = build_augment(AugmentParams(hflip=1.0), seed=0)(image=image, mask=mask)
    assert np.array_equal(out["image"], image[:, ::-1]) and np.array_equal(out["mask"], mask[:, ::-1])
    out = build_augment(AugmentParams(hflip=0.0, vflip=1.0), seed=0)(image=image, mask=mask)
    assert np.array_equal(out["image"], image[::-1]) and np.array_equal(out["mask"], mask[::-1])
    # random mix: whatever happened to the image happened to the mask
    aug = build_augment(AugmentParams(hflip=0.5, vflip=0.5, rotate90=0.5), seed=3)
    seen = set()
    for _ in range(40):
        out = aug(image=image, mask=mask)
        for k in range(4):
            for flip in (False, True):
                cand_i, cand_m = np.rot90(image, k), np.rot90(mask, k)
                if flip:
                    cand_i, cand_m = cand_i[:, ::-1], cand_m[:, ::-1]
                if np.array_equal(out["image"], cand_i):
                    assert np.array_equal(out["mask"], cand_m)
                    seen.add((k, flip))
    assert len(seen) >= 4            # several different transforms really happened


def test_augment_seed_reproducible_and_brightness_leaves_mask():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = (rng.random((16, 16)) > 0.5).astype(np.uint8)
    params = AugmentParams(hflip=0.5, vflip=0.5, rotate90=0.5, brightness_contrast=1.0)
    run = lambda aug: [aug(image=image, mask=mask) for _ in range(6)]  # noqa: E731
    a, b = run(build_augment(params, seed=7)), run(build_augment(params, seed=7))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    c = run(build_augment(params, seed=8))
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))
    only_bc = build_augment(AugmentParams(hflip=0.0, brightness_contrast=1.0), seed=0)
    outs = [only_bc(image=image, mask=mask) for _ in range(5)]
    assert all(np.array_equal(o["mask"], mask) for o in outs)
    assert any(not np.array_equal(o["image"], image) for o in outs)


def test_labelled_dataset(prepared):
    ds = LabelledDataset(prepared, "train")
    image, mask, label = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert mask.shape == (1, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(label, int)
    raw = decode_images(prepared, "train")
    assert torch.allclose(image, raw["image"][0].float() / 127.5 - 1)
    flipped = LabelledDataset(prepared, "train", augment=build_augment(AugmentParams(hflip=1.0), seed=0))
    i = int(np.flatnonzero(raw["label"].numpy() > 0)[0])
    fi, fm, fl = flipped[i]
    assert torch.equal(fm, raw["mask"][i].float().flip(-1)) and fl == int(raw["label"][i])
    assert torch.allclose(fi, raw["image"][i].float().flip(-1) / 127.5 - 1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[2].dtype == torch.int64


def test_paired_dataset_flips_a_b_mask_together(prepared):
    raw = decode_pairs(prepared, "train")
    ds = PairedDataset(prepared, "train", augment=AugmentParams(hflip=1.0))
    item = ds[0]
    assert set(item) == {"a", "b", "mask", "label"}
    assert torch.allclose(item["a"], raw["a"][0].float().flip(-1) / 127.5 - 1)
    assert torch.allclose(item["b"], raw["b"][0].float().flip(-1) / 127.5 - 1)
    assert torch.equal(item["mask"], raw["mask"][0].float().flip(-1))


def test_unpaired_dataset_pools(prepared):
    ds = UnpairedDataset(prepared, "train", seed=0)
    raw = decode_images(prepared, "train")
    normals = raw["image"][raw["label"] == 0].float() / 127.5 - 1
    defects = raw["image"][raw["label"] > 0].float() / 127.5 - 1
    assert len(ds) == max(len(normals), len(defects))
    seen_a = set()
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"a", "b", "label_b", "mask_b"}
        ia = [j for j in range(len(normals)) if torch.equal(normals[j], item["a"])]
        ib = [j for j in range(len(defects)) if torch.equal(defects[j], item["b"])]
        assert len(ia) == 1 and len(ib) == 1
        assert item["label_b"] >= 1 and item["mask_b"].sum() > 0
        seen_a.add(ia[0])
    assert len(seen_a) == len(normals)        # every normal is used once per pass
    first = [ds[i]["a"] for i in range(3)]
    ds.set_epoch(1)
    assert any(not torch.equal(x, ds[i]["a"]) for i, x in enumerate(first))
