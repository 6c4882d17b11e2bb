"""Metrics on known cases: identical vs shifted sets, hand-computed KID/FID, diversity, placement,
the registry's name check, Inception only from local weights, and the evaluate stage end to end."""

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

from pipeline.config import EvaluateParams, from_dict
from pipeline.errors import ParamsError, PipelineError
from pipeline.metrics import kernel, registry
from pipeline.metrics.diversity import duplicate_rate_of, mean_pairwise, pixel_vectors
from pipeline.metrics.fidelity import class_accuracy_domain
from pipeline.metrics.placement import mask_area_in_range, mask_in_region, mask_share_in_region
from pipeline.metrics.swd import swd_per_level

CLASSES = ["normal", "scratch", "spot"]
RES = 16


# --------------------------------------------------------------------------- tiny data following the contract

def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def draw(label: int, rng: np.random.Generator, res: int = RES, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(HxWxC uint8 image, HxW 0/1 mask): textured surface; scratch = bright line, spot = dark blob."""
    img = np.clip(120 + rng.normal(0, 12, (res, res, 1)) + rng.normal(0, 4, (res, res, channels)), 0, 255)
    mask = np.zeros((res, res), np.uint8)
    if label == 1:
        r = rng.integers(2, res - 2)
        c0 = rng.integers(0, res // 3)
        mask[r, c0:c0 + res // 2] = 1
    elif label == 2:
        cy, cx = rng.integers(4, res - 4, 2)
        yy, xx = np.mgrid[:res, :res]
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 6] = 1
    img[mask == 1] = 230 if label == 1 else 30
    return img.astype(np.uint8), mask


def make_prepared(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """images.parquet + classes.json with `counts[split]` images per class."""
    counts = counts or {"train": 8, "val": 3, "test": 4}
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in counts.items():
        for k, name in enumerate(CLASSES):
            for i in range(n):
                img, mask = draw(k, rng)
                rows.append(dict(id=f"{split}-{name}-{i}", split=split, label=name, label_idx=k,
                                 image_png=_png(img), mask_png=_png(mask * 255), has_mask=k > 0,
                                 width=RES, height=RES, channels=3, source_path=f"x/{name}/{i}.png",
                                 source_id=f"{name}-{i}", content_hash=f"{split}{k}{i}", schema_version=1,
                                 unpaired_pool=False))
    root.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows).replace_schema_metadata({b"schema_version": b"1"})
    pq.write_table(table, root / "images.parquet")
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES, "resolution": RES, "channels": 3,
                                                   "schema_version": 1}))
    return root


def make_synthetic(root: Path, model: str, labels: list[str], per_label: int = 6, seed: int = 1,
                   regions: bool = True, res: int = RES) -> Path:
    """samples.parquet + manifest.json for one model."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in labels:
        k = CLASSES.index(name) if name in CLASSES else (1 + int(rng.integers(0, 2)))
        for i in range(per_label):
            img, mask = draw(k, rng, res)
            region = np.zeros_like(mask)
            region[:, : res // 2 + 2] = 1
            rows.append(dict(id=f"{model}-{name}-{i}", label=name,
                             label_idx=CLASSES.index(name) if name in CLASSES else -1,
                             image_png=_png(img), mask_png=_png(mask * 255),
                             region_png=_png(region * 255) if regions else None, model=model))
    folder = root / model
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
    (folder / "manifest.json").write_text(json.dumps({"model": model, "classes": CLASSES}))
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


def textures(n: int, seed: int, res: int = 32) -> np.ndarray:
    """uint8 (n, 3, res, res) smooth-ish textures in 40..200 (room for brightness shifts)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n, 3, res // 4, res // 4)).repeat(4, 2).repeat(4, 3)
    x = 120 + 25 * base + rng.normal(0, 8, (n, 3, res, res))
    return np.clip(x, 40, 200).astype(np.uint8)


# --------------------------------------------------------------------------- registry

def test_declared_metric_names_are_the_registered_metrics():
    from pipeline.config import METRIC_NAMES

    assert sorted(METRIC_NAMES) == registry.known_metrics()
    with pytest.raises(ValueError, match="not declared"):
        registry.register_metric("undeclared_metric")(lambda real, fake, ctx: 0.0)


def test_a_renamed_params_key_names_its_new_name(tmp_path):
    from pipeline.config import load_params

    for section, old, new in [("evaluate", "per_class", "per_class_tables"), ("generate", "model", "default_model"),
                              ("generate", "batch_size", "ray_batch_size")]:
        path = tmp_path / "params.yaml"
        path.write_text(f"{section}:\n  {old}: {'true' if old == 'per_class' else 16 if old == 'batch_size' else 'cyclegan'}\n")
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert f"'{section}.{old}' was renamed to '{section}.{new}'" in str(err.value)
    path.write_text("evaluate: {per_class_tables: false}\ngenerate: {default_model: cyclegan, ray_batch_size: 8}\n")
    params = load_params(path)
    assert params.evaluate.per_class_tables is False
    assert (params.generate.default_model, params.generate.ray_batch_size) == ("cyclegan", 8)


def test_unknown_metric_name_lists_known_ones():
    with pytest.raises(ParamsError) as err:
        registry.validate_metric_names(["swd", "fid_domian"])
    msg = str(err.value)
    assert "fid_domian" in msg and "Did you mean 'fid_domain'" in msg
    for name in ("swd", "kid_domain", "fid_domain", "mmd_domain", "duplicate_rate", "mask_in_region"):
        assert name in msg
    with pytest.raises(ParamsError, match="evaluate.metrics"):
        from_dict(EvaluateParams, {"metrics": ["nope"]}, "evaluate")


def test_unknown_metric_fails_before_any_work(tmp_path):
    from pipeline.metrics.evaluate import run_evaluate

    params = EvaluateParams(metrics=["swd", "nope"])
    with pytest.raises(ParamsError, match="Known metrics"):
        run_evaluate(params, tmp_path / "missing", tmp_path / "syn", tmp_path / "out", ["defectgan"])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- SWD

def test_swd_zero_for_identical_and_monotone_in_brightness_shift():
    real = textures(24, seed=0)
    swd = lambda fake: float(np.mean(list(swd_per_level(real, fake, projections=128, seed=0).values())))  # noqa: E731
    levels = swd_per_level(real, real, projections=128, seed=0)
    assert sorted(levels) == [16, 32]                     # 32 px image: levels 32 and 16
    same = swd(real)
    shifted = [swd(np.clip(real.astype(int) + s, 0, 255).astype(np.uint8)) for s in (5, 15, 40)]
    assert same < 0.25 * shifted[0]
    assert shifted[0] < shifted[1] < shifted[2]


def test_swd_grows_with_noise():
    real = textures(16, seed=0)
    rng = np.random.default_rng(3)
    noisy = [np.clip(real + rng.normal(0, s, real.shape), 0, 255).astype(np.uint8) for s in (4, 12, 30)]
    values = [np.mean(list(swd_per_level(real, x, projections=128, seed=0).values())) for x in noisy]
    assert values[0] < values[1] < values[2]


# --------------------------------------------------------------------------- FID / KID / MMD math

def test_frechet_distance_of_unit_gaussians_is_squared_mean_distance():
    mu = np.array([1.0, -2.0, 0.5])
    assert kernel.frechet_distance(np.zeros(3), np.eye(3), mu, np.eye(3)) == pytest.approx(mu @ mu)   # 5.25


def test_frechet_distance_covariance_term_by_hand():
    # Diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2
    a, b = np.array([4.0, 1.0]), np.array([1.0, 9.0])
    assert kernel.frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b)) == pytest.approx(1 + 4)
    # Non-commuting covariances against scipy's general matrix square root.
    import scipy.linalg

    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    ref = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert kernel.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(ref)


def test_fid_from_samples_near_analytic_value():
    rng = np.random.default_rng(0)
    mu = np.array([1.0, 1.0])
    x, y = rng.normal(size=(20000, 2)), rng.normal(size=(20000, 2)) + mu
    assert kernel.fid_from_features(x, y) == pytest.approx(2.0, abs=0.05)
    assert kernel.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_kid_by_hand_on_3x2_features():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
    # k(a, b) = (a.b / 2 + 1)^3
    # x-x off-diagonal dots 0, 1, 1 -> k = 1, 3.375, 3.375: sum over i != j = 15.5, / (3*2)
    # y-y off-diagonal dots 0, 0, 2 -> k = 1, 1, 8:          sum over i != j = 20,   / (3*2)
    # x-y dots [0 1 2; 0 0 1; 0 1 3] -> k sum = 12.375 + 5.375 + 20 = 37.75,    / (3*3)
    expected = 15.5 / 6 + 20 / 6 - 2 * 37.75 / 9          # = -89/36
    assert kernel.polynomial_mmd2(x, y) == pytest.approx(expected)
    assert expected == pytest.approx(-89 / 36)
    mean, std = kernel.kid(x, y, subsets=4, subset_size=3)   # every subset is the whole set
    assert mean == pytest.approx(expected) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["kid", "fid", "mmd"])
def test_feature_metrics_zero_for_identical_and_monotone_in_shift(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    fn = {"kid": lambda a, b: kernel.kid(a, b, subsets=20, subset_size=60)[0],
          "fid": kernel.fid_from_features,
          "mmd": lambda a, b: kernel.gaussian_mmd2(a, b)[0]}[name]
    # KID/MMD: "identical" = an independent draw from the same distribution, where the unbiased
    # estimators are ~0 (a set against itself is biased negative: k(x, x) enters the cross term
    # only). FID is biased upwards for small independent sets, but exactly 0 for the same set.
    same = fn(x, x) if name == "fid" else fn(x, rng.normal(size=(60, 8)))
    shifted = [fn(x, rng.normal(size=(60, 8)) + s) for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.2 * shifted[0]
    assert shifted[0] < shifted[1] < shifted[2]


# --------------------------------------------------------------------------- diversity, placement

def test_duplicate_rate_one_for_copies_zero_for_distinct():
    rng = np.random.default_rng(0)
    real = pixel_vectors(rng.integers(0, 256, (100, 3, 16, 16), dtype=np.uint8))
    copies = pixel_vectors(np.repeat(rng.integers(0, 256, (1, 3, 16, 16), dtype=np.uint8), 100, axis=0))
    distinct = pixel_vectors(rng.integers(0, 256, (100, 3, 16, 16), dtype=np.uint8))
    assert duplicate_rate_of(real, copies)[0] == pytest.approx(1.0)
    assert duplicate_rate_of(real, distinct)[0] < 0.1
    assert mean_pairwise(copies) == pytest.approx(0.0, abs=1e-6) and mean_pairwise(distinct) > 0.3


def test_mask_in_region_hand_computed():
    def m(cells):
        a = np.zeros((1, 4, 4), np.uint8)
        for r, c in cells:
            a[0, r, c] = 1
        return a

    left = m([(r, c) for r in range(4) for c in range(2)])                     # left half
    masks = np.stack([m([(0, 0), (1, 1), (2, 0), (3, 3)]),                    # 3 of 4 inside -> 0.75
                      m([(0, 3), (1, 3)]),                                     # 0 of 2 inside -> 0
                      m([(0, 0)]),                                             # no region: skipped
                      m([])])                                                  # empty mask: skipped
    regions = np.stack([left, left, np.zeros_like(left), left])
    has = np.array([True, True, False, True])
    shares = mask_share_in_region(masks, regions)
    assert shares[0] == pytest.approx(0.75) and shares[1] == 0.0 and np.isnan(shares[3])
    ctx = registry.MetricContext(params=EvaluateParams(), fake_masks=masks, fake_regions=regions, has_region=has)
    ctx._current = "mask_in_region"
    assert mask_in_region(None, None, ctx) == pytest.approx(0.375)
    assert ctx.details == {"mask_in_region_n": 2, "mask_in_region_empty_masks": 1}
    none = registry.MetricContext(params=EvaluateParams(), fake_masks=masks, fake_regions=regions,
                                  has_region=np.zeros(4, bool))
    assert np.isnan(mask_in_region(None, None, none))


def test_mask_area_in_range_hand_computed():
    """10x10 masks (100 px), so the range is 0.2-30 px: one pixel is in, 30 px is in (the bound is
    included), 31 px is above, an empty mask is below."""
    masks = np.zeros((5, 1, 10, 10), np.uint8)
    masks[0, 0, 0, 0] = 1                    # 1 %: in range
    masks[1, 0, :3, :] = 1                   # 30 %: in range (bound included)
    masks[2, 0, :3, :] = 1
    masks[2, 0, 3, 0] = 1                    # 31 %: above
    # masks[3] empty: below (collapsed)
    masks[4, 0, :5, :] = 1                   # 50 %, but no region: not counted
    has = np.array([True, True, True, True, False])
    ctx = registry.MetricContext(params=EvaluateParams(), fake_masks=masks, fake_regions=np.ones_like(masks),
                                 has_region=has)
    ctx._current = "mask_area_in_range"
    assert mask_area_in_range(None, None, ctx) == pytest.approx(0.5)
    assert ctx.details == {"mask_area_in_range_mean_area": pytest.approx((0.01 + 0.30 + 0.31 + 0) / 4),
                           "mask_area_in_range_below": 1, "mask_area_in_range_above": 1}
    none = registry.MetricContext(params=EvaluateParams(), fake_masks=masks, fake_regions=masks,
                                  has_region=np.zeros(5, bool))
    assert np.isnan(mask_area_in_range(None, None, none))


def test_class_accuracy_domain_hand_computed():
    requested = np.array([1, 1, 2, -1, -1])      # -1: "defect", any defect class is right
    predicted = np.array([1, 2, 2, 0, 2])        # right, wrong, right, wrong (normal), right
    ctx = registry.MetricContext(params=EvaluateParams(), features={"domain_class": (np.zeros(3), predicted)},
                                 fake_labels=requested)
    ctx._current = "class_accuracy_domain"
    assert class_accuracy_domain(None, None, ctx) == pytest.approx(3 / 5)
    assert ctx.details == {"class_accuracy_domain_as_normal": pytest.approx(1 / 5)}
    unlabelled = registry.MetricContext(params=EvaluateParams(), features={"domain_class": (np.zeros(3), predicted)})
    assert np.isnan(class_accuracy_domain(None, None, unlabelled))
    with pytest.raises(PipelineError, match="domain_class"):
        class_accuracy_domain(None, None, registry.MetricContext(params=EvaluateParams(), fake_labels=requested))


def _real_images_as_samples(root: Path, model: str, real, relabel: dict[int, int]) -> None:
    """A "model" whose samples are the real defect images, asked for class relabel[true class]."""
    rows = []
    for i in np.nonzero(real.labels >= 1)[0]:
        k = relabel[int(real.labels[i])]
        rows.append(dict(id=f"{model}-{i}", label=CLASSES[k], label_idx=k, image_png=_png(real.images[i].transpose(1, 2, 0)),
                         mask_png=_png(real.masks[i, 0] * 255), region_png=None, model=model))
    (root / model).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / model / "samples.parquet")


def test_class_accuracy_domain_high_for_real_images_of_the_asked_class_low_when_shuffled(tmp_path):
    """Real images asked for their own class score about the classifier's test recall; the same
    images asked for the other defect class score about 1 - that."""
    from pipeline.metrics.data import load_real
    from pipeline.metrics.evaluate import run_evaluate

    prepared = make_prepared(tmp_path / "prepared", {"train": 12, "val": 4, "test": 6})
    real = load_real(prepared, ["test", "val"])
    syn = tmp_path / "syn"
    _real_images_as_samples(syn, "true_labels", real, {1: 1, 2: 2})
    _real_images_as_samples(syn, "shuffled", real, {1: 2, 2: 1})
    params = EvaluateParams(metrics=["class_accuracy_domain"], feature_epochs=1, feature_min_steps=40)
    saved = run_evaluate(params, prepared, syn, tmp_path / "out", ["true_labels", "shuffled"])
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["models"]["true_labels"]["overall"]["class_accuracy_domain"] == \
        pytest.approx(saved["models"]["true_labels"]["overall"]["class_accuracy_domain"])

    domain = on_disk["features"]["domain"]
    assert domain["test_n"] == 18 and set(domain["test_recall"]) == set(CLASSES)
    assert domain["test_accuracy"] >= 0.8                 # easy data: the classifier can be trusted
    true, shuffled = (on_disk["models"][m] for m in ("true_labels", "shuffled"))
    assert true["overall"]["class_accuracy_domain"] >= 0.8
    assert shuffled["overall"]["class_accuracy_domain"] <= 0.2
    for cls in ("scratch", "spot"):
        assert true["per_class"][cls]["class_accuracy_domain"] >= 0.8, cls
        assert shuffled["per_class"][cls]["class_accuracy_domain"] <= 0.2, cls
    assert true["overall"]["class_accuracy_domain_as_normal"] <= 0.2
    table = (tmp_path / "out" / "table.md").read_text()
    assert "class_accuracy_domain ↑" in table and "balanced accuracy" in table


def test_domain_net_sampler_draws_minority_classes_as_often_as_the_majority():
    """90 normals, 8 and 2 defects: each class is about a third of the draws (uniform draws
    would give 2 % of the rarest class)."""
    from pipeline.metrics.features import balanced_sampling_weights, draw_balanced

    assert balanced_sampling_weights(np.array([0, 0, 0, 2])).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    idx = draw_balanced(balanced_sampling_weights(labels), 30000, torch.Generator().manual_seed(0)).numpy()
    share = np.bincount(labels[idx], minlength=3) / len(idx)
    assert share == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.02)
    assert len(np.unique(idx[labels[idx] == 2])) == 2          # every minority image is used


# --------------------------------------------------------------------------- Inception only from local weights

def test_inception_without_weights_is_a_clear_error(tmp_path):
    from pipeline.metrics.evaluate import run_evaluate
    from pipeline.metrics.inception import INCEPTION_MISSING

    assert INCEPTION_MISSING == ("Inception FID needs local Inception weights: set evaluate.inception_weights "
                                 "to a .pt/.pth file (nothing is downloaded)")
    prepared = make_prepared(tmp_path / "prepared")
    make_synthetic(tmp_path / "syn", "stargan", ["scratch"])
    with pytest.raises(PipelineError, match="Inception FID needs local Inception weights"):
        run_evaluate(EvaluateParams(metrics=["swd", "inception_fid"]), prepared, tmp_path / "syn",
                     tmp_path / "out", ["stargan"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(PipelineError, match="no such file"):
        run_evaluate(EvaluateParams(metrics=["inception_fid"], inception_weights=str(tmp_path / "nope.pt")),
                     prepared, tmp_path / "syn", tmp_path / "out", ["stargan"])


class _FakeInception(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)     # (B, 6)


def test_inception_fid_with_local_torchscript_module(tmp_path):
    from pipeline.metrics.inception import inception_features, load_inception

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    module = load_inception(str(path))
    real = textures(12, seed=0, res=16)
    feats = inception_features(module, real, size=32)
    assert feats.shape == (12, 6)
    params = EvaluateParams(metrics=["inception_fid"], inception_weights=str(path), inception_size=32)
    spec = registry.validate_metric_names(["inception_fid"])[0]

    def score(fake):
        ctx = registry.MetricContext(params=params, features={
            "inception": (feats, inception_features(module, fake, size=32))})
        return registry.compute_metric(spec, real, fake, ctx)["inception_fid"]

    assert score(real) == pytest.approx(0.0, abs=1e-9)
    shifted = [score(np.clip(real.astype(int) + s, 0, 255).astype(np.uint8)) for s in (10, 30)]
    assert 0 < shifted[0] < shifted[1]
    torch.save({"weights": torch.zeros(1)}, tmp_path / "state.pth")
    with pytest.raises(PipelineError, match="not a network"):
        load_inception(str(tmp_path / "state.pth"))


# --------------------------------------------------------------------------- the evaluate stage

def test_run_evaluate_end_to_end(tmp_path, tracking_calls):
    from pipeline.metrics.evaluate import run_evaluate

    prepared = make_prepared(tmp_path / "prepared")
    syn = tmp_path / "syn"
    make_synthetic(syn, "stargan", ["scratch", "spot"])
    make_synthetic(syn, "cyclegan", ["defect"], regions=False, seed=2)
    params = EvaluateParams(metrics=["swd", "kid_domain", "fid_domain", "mmd_domain", "duplicate_rate",
                                     "mean_pairwise_distance", "mask_in_region"],
                            feature_epochs=1, feature_min_steps=5, kid_subsets=5, swd_projections=64, swd_patches_per_image=16)
    out = tmp_path / "reports" / "evaluate"
    result = run_evaluate(params, prepared, syn, out, ["stargan", "cyclegan", "progan"])

    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["models"]) == {"stargan", "cyclegan", "noise", "real_vs_real"}
    # Reference rows: overall only, against real defect images (14 in test+val: 7 per class).
    noise, halves = saved["models"]["noise"], saved["models"]["real_vs_real"]
    assert (noise["overall"]["n_real"], noise["overall"]["n_fake"]) == (14, 12)      # as many as the largest set
    assert (halves["overall"]["n_real"], halves["overall"]["n_fake"]) == (8, 6)      # 4 + 3 per class
    assert "per_class" not in noise and "per_class" not in halves
    assert any("progan" in n and "skipped" in n for n in saved["notes"])
    ov = saved["models"]["stargan"]["overall"]
    for key in ("swd", "swd_16px", "kid_domain", "kid_domain_std", "fid_domain", "mmd_domain",
                "duplicate_rate", "duplicate_rate_real", "mean_pairwise_distance", "mask_in_region"):
        assert isinstance(ov[key], float), key
    assert set(saved["models"]["stargan"]["per_class"]) == {"scratch", "spot"}
    assert ov["n_real"] == 14 and ov["n_fake"] == 12               # real scratch+spot in test+val
    assert saved["models"]["cyclegan"]["per_class"]["defect"]["n_real"] == 14
    assert saved["models"]["cyclegan"]["overall"]["mask_in_region"] is None
    assert 0.5 <= ov["mask_in_region"] <= 1.0
    assert "NOT Inception" in saved["features"]["domain"]["network"]
    assert saved["features"]["domain"]["cached"] is False
    table = (out / "table.md").read_text()
    assert "| stargan |" in table and "| cyclegan |" in table and "not Inception" in table
    assert (out / "feature_net.pt").is_file()
    assert result["models"]["stargan"]["overall"]["swd"] == pytest.approx(ov["swd"])
    (kind, flat, artifacts), = tracking_calls
    assert kind == "evaluation" and flat["stargan/overall/swd"] == pytest.approx(ov["swd"])
    assert all(Path(a).is_file() for a in artifacts)

    again = run_evaluate(params, prepared, syn, out, ["stargan", "cyclegan"])   # feature net from cache
    assert again["features"]["domain"]["cached"] is True
    assert again["models"]["stargan"]["overall"]["fid_domain"] == pytest.approx(ov["fid_domain"])


def test_evaluate_identical_set_scores_lower_than_shifted(tmp_path):
    """A 'model' whose samples are the real reference images themselves beats a brightened copy."""
    from pipeline.metrics.data import load_real
    from pipeline.metrics.evaluate import run_evaluate

    prepared = make_prepared(tmp_path / "prepared", {"train": 8, "val": 4, "test": 6})
    real = load_real(prepared, ["test", "val"])
    syn = tmp_path / "syn"
    for model, offset in (("copy", 0), ("bright", 40)):
        rows = []
        for i in range(len(real)):
            img = np.clip(real.images[i].astype(int) + offset, 0, 255).astype(np.uint8).transpose(1, 2, 0)
            rows.append(dict(id=str(i), label=CLASSES[real.labels[i]], label_idx=int(real.labels[i]),
                             image_png=_png(img), mask_png=_png(real.masks[i, 0] * 255), region_png=None,
                             model=model))
        (syn / model).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), syn / model / "samples.parquet")
    params = EvaluateParams(metrics=["swd", "kid_domain", "fid_domain", "mmd_domain"], feature_epochs=2, feature_min_steps=20,
                            kid_subsets=5, swd_projections=64, swd_patches_per_image=16, per_class_tables=False)
    res = run_evaluate(params, prepared, syn, tmp_path / "out", ["copy", "bright"])["models"]
    for name in ("swd", "kid_domain", "fid_domain", "mmd_domain"):
        copy, bright = res["copy"]["overall"][name], res["bright"]["overall"][name]
        assert abs(copy) < bright, name


def test_folder_without_samples_or_with_wrong_classes_is_an_error(tmp_path):
    from pipeline.metrics.evaluate import run_evaluate

    prepared = make_prepared(tmp_path / "prepared", {"train": 2, "val": 1, "test": 2})
    syn = tmp_path / "syn"
    (syn / "pix2pix").mkdir(parents=True)
    params = EvaluateParams(metrics=["swd"])
    with pytest.raises(PipelineError, match=r"pix2pix.*samples\.parquet"):
        run_evaluate(params, prepared, syn, tmp_path / "out", ["pix2pix"])
    folder = make_synthetic(syn, "stargan", ["scratch"])
    table = pq.read_table(folder / "samples.parquet").to_pylist()
    for row in table:
        row["label"] = "dent"
    pq.write_table(pa.Table.from_pylist(table), folder / "samples.parquet")
    with pytest.raises(PipelineError, match=r"stargan/samples\.parquet.*'dent'"):
        run_evaluate(params, prepared, syn, tmp_path / "out", ["stargan"])


def test_model_whose_samples_were_all_filtered_is_skipped_with_a_note(tmp_path):
    from pipeline.metrics.data import find_model_folders

    syn = tmp_path / "syn"
    folder = make_synthetic(syn, "defectgan", ["scratch"])
    empty = pq.read_table(folder / "samples.parquet").slice(0, 0)
    pq.write_table(empty, folder / "samples.parquet")
    make_synthetic(syn, "stargan", ["scratch"])
    found, notes = find_model_folders(syn, ["defectgan", "stargan"])
    assert list(found) == ["stargan"]
    assert len(notes) == 1 and "defectgan" in notes[0] and "kept no samples" in notes[0]


def test_do_nothing_baseline_is_the_unmodified_inputs_and_real_defects_beat_it(tmp_path):
    """The baseline row holds exactly the normal images named by normal_id, with the source
    model's labels and empty masks; samples that are real defect images score a lower fid_domain."""
    from pipeline.metrics.data import DO_NOTHING, load_do_nothing, load_real, load_synthetic, read_prepared_info
    from pipeline.metrics.evaluate import run_evaluate

    prepared = make_prepared(tmp_path / "prepared", {"train": 10, "val": 4, "test": 6})
    table = pq.read_table(prepared / "images.parquet").to_pylist()
    normals = [r for r in table if r["split"] == "train" and r["label_idx"] == 0]
    defects = [r for r in table if r["split"] == "train" and r["label_idx"] > 0]
    rows = [dict(id=f"g{i}", label=d["label"], label_idx=d["label_idx"], image_png=d["image_png"],
                 mask_png=d["mask_png"], region_png=d["mask_png"], model="defectgan",
                 normal_id=normals[i % len(normals)]["id"]) for i, d in enumerate(defects)]
    (tmp_path / "syn" / "defectgan").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "syn" / "defectgan" / "samples.parquet")

    info = read_prepared_info(prepared)
    source = load_synthetic(tmp_path / "syn" / "defectgan" / "samples.parquet", info)
    baseline = load_do_nothing(source, prepared)
    train = load_real(prepared, ["train"])
    train_normals = train.images[train.labels == 0]
    for i in range(len(rows)):
        assert np.array_equal(baseline.images[i], train_normals[i % len(normals)])
    assert list(baseline.label_names) == [r["label"] for r in rows] and not baseline.masks.any()

    params = EvaluateParams(metrics=["fid_domain", "mask_in_region"], feature_epochs=2, feature_min_steps=30,
                            per_class_tables=False)
    res = run_evaluate(params, prepared, tmp_path / "syn", tmp_path / "out", ["defectgan"])
    assert set(res["models"]) == {"defectgan", DO_NOTHING, "noise", "real_vs_real"}
    ours, nothing = res["models"]["defectgan"]["overall"], res["models"][DO_NOTHING]["overall"]
    assert nothing["n_fake"] == len(rows) and np.isnan(nothing["mask_in_region"])
    assert ours["fid_domain"] < nothing["fid_domain"]
    assert any("defectgan's" in n for n in res["notes"])

    off = EvaluateParams(metrics=["fid_domain"], feature_epochs=2, feature_min_steps=30, per_class_tables=False,
                         do_nothing_baseline=False, reference_rows=False)
    assert set(run_evaluate(off, prepared, tmp_path / "syn", tmp_path / "out2", ["defectgan"])["models"]) == {"defectgan"}


def test_data_whose_defect_class_is_named_defect_accepts_both_labellings(tmp_path):
    """elpv's one defect class is called "defect": a class-conditional model writes it with index 1,
    an unconditional one with -1 (the "no class chosen" label); both load, and a wrong index is
    still an error."""
    from pipeline.metrics.data import PreparedInfo, load_synthetic

    info = PreparedInfo(tmp_path / "classes.json", ["normal", "defect"], RES, 3)
    img, mask = draw(1, np.random.default_rng(0))
    path = tmp_path / "samples.parquet"

    def write(idx: list[int]) -> None:
        pq.write_table(pa.Table.from_pylist([dict(id=f"s{i}", label="defect", label_idx=k, image_png=_png(img),
                                                  mask_png=_png(mask * 255)) for i, k in enumerate(idx)]), path)

    write([1, -1])
    assert list(load_synthetic(path, info, "m").label_idx) == [1, -1]
    write([0])
    with pytest.raises(PipelineError, match="label_idx 0"):
        load_synthetic(path, info, "m")


def test_class_named_defect_is_compared_with_its_own_real_images_only():
    """When a data class is itself named "defect", its samples are compared with that class's
    real images, not with every real defect image."""
    from pipeline.metrics.data import SyntheticSet
    from pipeline.metrics.evaluate import comparison_groups

    z = np.zeros((2, 1, RES, RES), np.uint8)
    fake = SyntheticSet("m", Path("x"), np.zeros((2, 3, RES, RES), np.uint8), z, z, np.zeros(2, bool),
                        np.asarray(["defect", "defect"]), np.asarray([1, 1]))
    groups = {name: (r, f) for name, r, f in comparison_groups(fake, np.asarray([0, 1, 2, 1]),
                                                                ["normal", "defect", "crack"])}
    assert list(groups) == ["overall", "defect"]
    assert list(groups["defect"][0]) == [1, 3] and list(groups["overall"][0]) == [1, 3]
