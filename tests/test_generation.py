"""Generation stage: placement, per-sample seeding, quality filter, Ray Data run, outputs, bad inputs.

One tiny prepared dataset (16 px, 2 defect classes) and two tiny trained models per session:
defectgan (class-conditional, real masks, honours regions) and an unconditional dcgan (label
"defect", all-zero masks, filter skipped). Ray starts once per session with 2 CPUs.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import GenerateParams, PrepareParams, TrainCommonParams, from_dict
from pipeline.errors import DataError, ParamsError, PipelineError, TrainingError
from pipeline.generation import placement as P
from pipeline.generation import sampler as S
from pipeline.generation.writer import MANIFEST_FILE, SAMPLES_FILE

RES = 16
TINY = {
    "defectgan": dict(base_channels=4, max_channels=8, n_blocks=1, spade_hidden=4, d_base_channels=4,
                      d_layers=2, n_critic=1),
    "dcgan": dict(conditioning="none", z_dim=8, base_channels=4, d_base_channels=4),
}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    from pipeline.data.prepare import run_prepare

    out = tmp_path_factory.mktemp("gen") / "prepared"
    params = from_dict(PrepareParams, {"resolution": RES, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 6, "normal": 12, "paired": 0}}, "prepare")
    run_prepare(params, out)
    return out


@pytest.fixture(scope="session")
def models(prepared, tmp_path_factory) -> Path:
    """models/<family>/generator_ema.pt for each TINY family, trained for 0.03 kimg."""
    from pipeline.models import family_config_class
    from pipeline.training.loop import TrainJob, train

    root = tmp_path_factory.mktemp("models")
    common = from_dict(TrainCommonParams, {"kimg": 0.03, "batch_size": 4, "tick_kimg": 0.03,
                                           "snapshot_ticks": 100}, "train.common")
    for family, cfg in TINY.items():
        job = TrainJob(family, common, from_dict(family_config_class(family), cfg, f"train.{family}"),
                       prepared, root / family, root / "work" / family)
        train(job)
    return root


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch):
    """Record what the stage would log instead of writing an MLflow store."""
    import pipeline.generation.ray_generate as rg

    calls = []
    monkeypatch.setattr(rg, "_track", lambda *args: calls.append(args))
    return calls


def params(**kw) -> GenerateParams:
    base = dict(per_class=3, ray_batch_size=4, num_actors=2, cpus_per_actor=0.5)
    return GenerateParams(**{**base, **kw})


def generate(models, prepared, out, family="defectgan", **kw):
    from pipeline.generation.ray_generate import run_generate

    return run_generate(params(**kw), family, models / family, prepared, out)


def png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


# ---- pure parts ---------------------------------------------------------------------------------

def test_random_box_in_bounds_and_deterministic():
    for seed in range(50):
        region = P.random_box(seed, 20, 0.2, 0.5)
        ys, xs = np.nonzero(region)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 4 <= h <= 10 and 4 <= w <= 10
        assert region.sum() == h * w                       # one filled box
        assert np.array_equal(region, P.random_box(seed, 20, 0.2, 0.5))


def test_sample_seeds_are_distinct_and_stable():
    seeds = S.sample_seeds(7, np.arange(1000))
    assert len(set(seeds.tolist())) == 1000 and (seeds >= 0).all()
    assert S.sample_seed(7, 3) == seeds[3] and S.sample_seed(8, 3) != seeds[3]


def test_quality_filter_bounds():
    frac = np.array([0.0, 0.001, 0.1, 0.95, 1.0])
    assert S.keep(frac, 0.002, 0.9, True).tolist() == [False, False, True, False, False]
    assert S.keep(frac, 0.002, 0.9, False).all()   # maskless families skip the filter


def test_user_masks_wrong_size_names_file(tmp_path):
    Image.fromarray(np.full((RES, RES), 255, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 24), 255, np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b\.png is 24x20 px.*16x16"):
        P.load_user_masks(tmp_path, RES)
    (tmp_path / "b.png").unlink()
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"c\.png is not a readable PNG"):
        P.load_user_masks(tmp_path, RES)
    with pytest.raises(DataError, match="does not exist"):
        P.load_user_masks(tmp_path / "missing", RES)


def test_sampler_output_does_not_depend_on_batching(models, prepared):
    from pipeline.training.loop import load_trained

    family = load_trained(models / "defectgan")
    sampler = S.Sampler(family, P.Placement("random", RES, 0.2, 0.5))
    normal = np.random.default_rng(0).integers(0, 256, (5, 3, RES, RES), dtype=np.uint8)
    labels, idx = np.array([1, 2, 1, 2, 1]), np.arange(5)
    seeds = S.sample_seeds(0, idx)
    whole = sampler.generate(normal, labels, seeds, idx)
    torch.manual_seed(123)   # global RNG state before a call must not matter
    parts = [sampler.generate(normal[i:i + 2], labels[i:i + 2], seeds[i:i + 2], idx[i:i + 2]) for i in (0, 2, 4)]
    for key in ("images", "masks", "regions"):
        assert np.array_equal(whole[key], np.concatenate([p[key] for p in parts])), key
    assert whole["images"].shape == (5, RES, RES, 3) and set(np.unique(whole["masks"])) <= {0, 1}


def test_remote_pipeline_errors_surface_as_themselves():
    from pipeline.generation.ray_generate import _pipeline_errors

    class ActorDied(Exception):   # what Ray gives when an actor's __init__ raised: text only
        pass

    with pytest.raises(TrainingError, match="^no trained model at /x/generator_ema.pt.$"):
        with _pipeline_errors():
            raise ActorDied("Traceback ...\n  raise TrainingError(...)\n"
                            "pipeline.errors.TrainingError: no trained model at /x/generator_ema.pt.\n")
    with pytest.raises(DataError, match="bad png"):
        with _pipeline_errors():
            try:
                raise DataError("bad png")
            except DataError as inner:
                raise RuntimeError("wrapped") from inner
    with pytest.raises(ZeroDivisionError):   # bugs keep their traceback
        with _pipeline_errors():
            1 / 0


# ---- bad inputs (all fail before Ray starts or anything is written) -----------------------------

def test_zero_images_requested(models, prepared, tmp_path):
    with pytest.raises(ParamsError, match="generate.per_class.*zero images"):
        generate(models, prepared, tmp_path / "out", per_class=0)
    assert not (tmp_path / "out").exists()


def test_missing_or_corrupt_checkpoint(models, prepared, tmp_path):
    from pipeline.generation.ray_generate import run_generate

    with pytest.raises(TrainingError, match="no trained model"):
        run_generate(params(), "defectgan", tmp_path / "nowhere", prepared, tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generator_ema.pt").write_bytes(b"\x00garbage")
    with pytest.raises(TrainingError, match="corrupt"):
        run_generate(params(), "defectgan", bad, prepared, tmp_path / "out")
    with pytest.raises(TrainingError, match="holds a 'dcgan' generator, not 'defectgan'"):
        run_generate(params(), "defectgan", models / "dcgan", prepared, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["resolution", "classes"])
def test_model_data_mismatch_names_both(models, prepared, tmp_path, change):
    other = tmp_path / "prepared"
    shutil.copytree(prepared, other)
    info = json.loads((other / "classes.json").read_text())
    if change == "resolution":
        info["resolution"] = 32
    else:
        info["classes"] = ["normal", "scratch", "crack"]
    (other / "classes.json").write_text(json.dumps(info))
    with pytest.raises(DataError) as err:
        generate(models, other, tmp_path / "out")
    msg = str(err.value)
    assert "generator_ema.pt" in msg and "classes.json" in msg
    assert ("16 px" in msg and "32 px" in msg) if change == "resolution" else ("'crack'" in msg and "'spot'" in msg)


def test_refuses_to_replace_foreign_folder(models, prepared, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(PipelineError, match="not a previous generation output"):
        generate(models, prepared, out)
    assert (out / "precious.txt").read_text() == "user data"


def test_masks_placement_wrong_size(models, prepared, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(masks / "small.png")
    with pytest.raises(DataError, match=r"small\.png is 8x8 px.*16x16"):
        generate(models, prepared, tmp_path / "out", placement="masks", masks_dir=str(masks))
    assert not (tmp_path / "out").exists()


# ---- the Ray Data stage -----------------------------------------------------------------------

def _walk_imagefolder(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """class -> [(image, mask)] the way a classifier's ImageFolder loader would see it."""
    tree = {}
    for folder in sorted((root / "images").iterdir()):
        files = sorted(folder.glob("*.png"))
        images = [f for f in files if not f.stem.endswith("_mask")]
        tree[folder.name] = [(f, f.with_name(f"{f.stem}_mask.png")) for f in images]
        assert len(files) == 2 * len(images)
    return tree


@pytest.mark.slow
def test_generate_outputs_reproducible_and_replaced(models, prepared, tmp_path, ray_session, no_tracking):
    out = tmp_path / "synthetic" / "defectgan"
    result = generate(models, prepared, out, per_class=3, ray_batch_size=4, num_actors=2)

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["counts"] == {"scratch": 3, "spot": 3} and manifest["complete"]
    assert manifest["classes"] == ["scratch", "spot"] and manifest["quality_filter"] is True
    import hashlib
    assert manifest["checkpoint_sha256"] == hashlib.sha256(
        (models / "defectgan" / "generator_ema.pt").read_bytes()).hexdigest()
    assert manifest["params"]["per_class"] == 3 and result["img_per_s"] > 0
    assert (out / "preview.png").exists() and Image.open(out / "preview.png").size[0] > 0
    assert len(no_tracking) == 1

    table = pq.read_table(out / SAMPLES_FILE).to_pydict()
    assert set(table) >= {"id", "label", "label_idx", "image_png", "mask_png", "region_png", "model", "seed"}
    assert len(table["id"]) == 6 and len(set(table["id"])) == 6 and set(table["model"]) == {"defectgan"}
    for label, idx, image, mask, region in zip(table["label"], table["label_idx"], table["image_png"],
                                                table["mask_png"], table["region_png"]):
        assert {"scratch": 1, "spot": 2}[label] == idx
        assert png(image).shape == (RES, RES, 3)
        assert set(np.unique(png(mask))) <= {0, 255} and set(np.unique(png(region))) <= {0, 255}
        frac = (png(mask) > 127).mean()
        assert 0.002 <= frac <= 0.9                     # quality filter held

    tree = _walk_imagefolder(out)
    assert {k: len(v) for k, v in tree.items()} == {"scratch": 3, "spot": 3}
    by_id = dict(zip(table["id"], zip(table["label"], table["image_png"], table["mask_png"])))
    for label, pairs in tree.items():
        for image, mask in pairs:
            assert by_id[image.stem][0] == label      # folder == label
            assert image.read_bytes() == by_id[image.stem][1] and mask.read_bytes() == by_id[image.stem][2]
            Image.open(image).verify()
            Image.open(mask).verify()

    # Another split of the work (1 actor, batches of 1) -> the same pixels; the rerun replaces.
    (out / "images" / "scratch" / "stray.png").write_bytes(b"old")
    generate(models, prepared, out, per_class=3, ray_batch_size=1, num_actors=1)
    again = pq.read_table(out / SAMPLES_FILE).to_pydict()
    assert again["id"] == table["id"] and again["image_png"] == table["image_png"]
    assert again["mask_png"] == table["mask_png"] and again["seed"] == table["seed"]
    assert not (out / "images" / "scratch" / "stray.png").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp left behind


@pytest.mark.slow
def test_unconditional_maskless_family_and_user_masks(models, prepared, tmp_path, ray_session):
    # dcgan without conditioning: one "defect" class (label_idx -1), zero masks, no filter.
    out = tmp_path / "dcgan"
    generate(models, prepared, out, family="dcgan", per_class=4)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["counts"] == {"defect": 4} and manifest["quality_filter"] is False
    table = pq.read_table(out / SAMPLES_FILE).to_pydict()
    assert set(table["label"]) == {"defect"} and set(table["label_idx"]) == {-1}
    assert all(r is None for r in table["region_png"])
    assert {k: len(v) for k, v in _walk_imagefolder(out).items()} == {"defect": 4}

    # defectgan with user masks: the regions are the user's masks, cycled in file-name order.
    masks = tmp_path / "masks"
    masks.mkdir()
    a = np.zeros((RES, RES), np.uint8)
    a[2:8, 2:8] = 255
    b = np.zeros((RES, RES), np.uint8)
    b[8:14, 4:12] = 255
    Image.fromarray(a).save(masks / "a.png")
    Image.fromarray(b).save(masks / "b.png")
    out = tmp_path / "masked"
    generate(models, prepared, out, per_class=2, placement="masks", masks_dir=str(masks),
             min_mask_fraction=0.0)
    table = pq.read_table(out / SAMPLES_FILE).to_pydict()
    regions = [png(r) for r in table["region_png"]]
    assert all(np.array_equal(r, a) or np.array_equal(r, b) for r in regions)
    assert any(np.array_equal(r, b) for r in regions)


@pytest.mark.slow
def test_filter_drops_and_extra_rounds(models, prepared, tmp_path, ray_session):
    # A window holding no k/256 (16x16 masks): everything is dropped, extra rounds run, the
    # shortfall is reported.
    out = tmp_path / "filtered"
    result = generate(models, prepared, out, per_class=2, min_mask_fraction=0.5001,
                      max_mask_fraction=0.5038, max_rounds=2)
    assert result["rounds"] == 2 and result["dropped"] == result["generated"] > 4
    assert not result["complete"] and result["shortfall"] == {"scratch": 2, "spot": 2}
    assert pq.read_table(out / SAMPLES_FILE).num_rows == 0


def test_real_masks_placement_takes_a_jittered_mask_of_the_requested_class():
    res = 16
    line = np.zeros((1, res, res), np.uint8)
    line[0, 7, 4:12] = 1                                              # class 1: a 1 x 8 line
    blob = np.zeros((1, res, res), np.uint8)
    blob[0, 6:9, 6:9] = 1                                             # class 2: a 3 x 3 blob
    placement = P.Placement("real_masks", res, 0.25, 0.5, class_masks={1: line, 2: blob})
    seeds, indices = np.array([11, 12, 13, 14]), np.arange(4)
    regions = placement.regions(seeds, indices, np.array([1, 2, 1, 3]))
    assert regions[0].sum() == 3 * 10 and regions[2].sum() == 3 * 10   # the line, dilated by 1 px, inside
    assert regions[1].sum() == 5 * 5                                    # the blob, dilated
    box = regions[3]                                                    # class 3 has no mask: a box
    assert box.sum() == box.any(1).sum() * box.any(0).sum() >= 4 * 4
    again = placement.regions(seeds, indices, np.array([1, 2, 1, 3]))
    assert np.array_equal(regions, again)                               # a pure function of the seed
