"""DRAEM-style anomalies: real gradient noise, masks of the asked-for area, changes only inside."""

import numpy as np
import pytest

from pipeline.downstream.draem import draem_anomalies, perlin_mask, perlin_noise


def rng(seed):
    return np.random.default_rng(seed)


def normals(n=4, channels=3, res=32, seed=0):
    """Smooth ramps with a little noise, a different offset per image (so each is recognisable)."""
    yy, xx = np.mgrid[0:res, 0:res]
    out = np.stack([np.stack([(xx * 3 + 40 * k + 17 * c + yy) % 200 + 20 for c in range(channels)])
                    for k in range(n)])
    return np.clip(out + rng(seed).integers(-5, 6, out.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- Perlin noise

def test_perlin_noise_is_seeded_smooth_and_its_scale_sets_the_feature_size():
    a, b = perlin_noise(64, 64, 4, rng(0)), perlin_noise(64, 64, 4, rng(0))
    assert a.shape == (64, 64) and np.array_equal(a, b)
    assert not np.array_equal(a, perlin_noise(64, 64, 4, rng(1)))
    assert np.abs(a).max() <= np.sqrt(0.5) + 1e-9 and a.std() > 0.05      # gradient noise bounds
    roughness = [np.mean([np.abs(np.diff(perlin_noise(64, 64, s, rng(k)), axis=ax)).mean()
                          for k in range(5) for ax in (0, 1)]) for s in (1, 4, 16)]
    assert roughness[0] < roughness[1] < roughness[2]                    # more cells, finer features
    # Smooth: a neighbour differs by a small part of the range at 4 cells over 64 px.
    assert np.abs(np.diff(a, axis=0)).max() < 0.15 and np.abs(np.diff(a, axis=1)).max() < 0.15
    # Per-axis scale and rotation: a (1, 8) lattice varies along x much more than along y,
    # and turning it 90 degrees swaps that.
    flat = perlin_noise(64, 64, (1, 8), rng(2))
    turned = perlin_noise(64, 64, (1, 8), rng(2), angle=90.0)
    assert np.abs(np.diff(flat, axis=1)).mean() > 3 * np.abs(np.diff(flat, axis=0)).mean()
    assert np.abs(np.diff(turned, axis=0)).mean() > 3 * np.abs(np.diff(turned, axis=1)).mean()
    assert perlin_noise(32, 48, 3, rng(0)).shape == (32, 48)
    with pytest.raises(ValueError, match="scale"):
        perlin_noise(8, 8, 0, rng(0))


# --------------------------------------------------------------------------- masks

def test_perlin_mask_is_seeded_and_differs_across_seeds():
    a, b = perlin_mask(32, 32, rng(7)), perlin_mask(32, 32, rng(7))
    assert a.dtype == np.uint8 and a.shape == (32, 32) and set(np.unique(a)) <= {0, 1}
    assert np.array_equal(a, b)
    assert len({perlin_mask(32, 32, rng(s)).tobytes() for s in range(20)}) == 20


@pytest.mark.parametrize("h, w", [(32, 32), (64, 64), (32, 48)])
def test_perlin_mask_area_stays_in_range_and_is_never_empty(h, w):
    low, high = 0.005, 0.2
    areas = np.array([perlin_mask(h, w, rng(s), (low, high)).sum() for s in range(150)])
    pixel = 1.0 / (h * w)
    assert areas.min() >= 1
    assert low - pixel <= areas.min() / (h * w) and areas.max() / (h * w) <= high + pixel
    # Drawn uniformly in the range: both ends are reached, not just its middle.
    assert areas.min() / (h * w) < 0.03 and areas.max() / (h * w) > 0.17


def test_perlin_mask_area_is_exact_for_a_fixed_area_and_ranges_are_checked():
    assert perlin_mask(32, 32, rng(1), (0.1, 0.1)).sum() == round(0.1 * 1024)
    assert perlin_mask(8, 8, rng(1), (0.001, 0.001)).sum() == 1         # 0.064 px: never empty
    with pytest.raises(ValueError, match="non-empty"):
        perlin_mask(32, 32, rng(1), (0.0, 0.0))
    with pytest.raises(ValueError, match="area_range"):
        perlin_mask(32, 32, rng(1), (0.3, 0.1))
    with pytest.raises(ValueError, match="area_range"):
        perlin_mask(32, 32, rng(1), (0.1, 1.5))


# --------------------------------------------------------------------------- anomalies

def source_of(image, mask, pool):
    """Index of the normal that `image` equals exactly outside `mask`."""
    outside = ~mask.astype(bool)
    found = [i for i, n in enumerate(pool) if np.array_equal(image[:, outside], n[:, outside])]
    assert len(found) == 1, "the outside of an anomaly must be one normal image, unchanged"
    return found[0]


@pytest.mark.parametrize("texture, channels", [("normals", 3), ("normals", 1), ("procedural", 3), ("procedural", 1)])
def test_anomalies_change_only_the_masked_pixels(texture, channels):
    pool = normals(channels=channels)
    images, masks = draem_anomalies(pool, 24, seed=3, texture=texture)
    assert images.shape == (24, channels, 32, 32) and images.dtype == np.uint8
    assert masks.shape == (24, 1, 32, 32) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1}
    assert masks.reshape(24, -1).sum(1).min() >= 1
    changes = []
    for image, mask in zip(images, masks[:, 0]):
        base = pool[source_of(image, mask, pool)].astype(int)
        inside = mask.astype(bool)
        changes.append(np.abs(image[:, inside].astype(int) - base[:, inside]).mean())
    # beta < 1 leaves part of a foreign texture in every mask; on average a clear change.
    assert min(changes) > 0 and np.mean(changes) > 10


def test_anomalies_are_seeded_and_differ_across_seeds():
    pool = normals()
    a = draem_anomalies(pool, 6, seed=1)
    b = draem_anomalies(pool, 6, seed=1)
    c = draem_anomalies(pool, 6, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert draem_anomalies(pool, 0, seed=1)[0].shape == (0, 3, 32, 32)


def test_beta_weights_the_normal_image():
    pool = normals()
    images, masks = draem_anomalies(pool, 8, seed=4, beta_range=(0.999, 0.999))
    for image, mask in zip(images, masks[:, 0]):
        base = pool[source_of(image, mask, pool)].astype(int)
        # I_a = 0.001 A + 0.999 I inside: within one grey level of I after rounding.
        assert np.abs(image.astype(int) - base).max() <= 1
    opaque, masks_0 = draem_anomalies(pool, 8, seed=4, beta_range=(0.0, 0.0))   # the texture only
    faint, _ = draem_anomalies(pool, 8, seed=4, beta_range=(0.9, 0.9))           # same draws otherwise
    inside = np.broadcast_to(masks_0.astype(bool), opaque.shape)
    bases = np.stack([pool[source_of(i, m, pool)] for i, m in zip(opaque, masks_0[:, 0])]).astype(int)
    assert np.abs(opaque.astype(int) - bases)[inside].mean() > 5 * np.abs(faint.astype(int) - bases)[inside].mean()


def test_one_normal_is_enough_and_bad_arguments_are_named():
    images, masks = draem_anomalies(normals(n=1, channels=1), 3, seed=0)
    assert images.shape == (3, 1, 32, 32) and masks.sum() > 0
    with pytest.raises(ValueError, match="normals is empty"):
        draem_anomalies(np.zeros((0, 3, 32, 32), np.uint8), 3, seed=0)
    with pytest.raises(ValueError, match="normals must be uint8"):
        draem_anomalies(np.zeros((2, 3, 32, 32), np.float32), 3, seed=0)
    with pytest.raises(ValueError, match="texture"):
        draem_anomalies(normals(), 3, seed=0, texture="dtd")
    with pytest.raises(ValueError, match="beta_range"):
        draem_anomalies(normals(), 3, seed=0, beta_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="count"):
        draem_anomalies(normals(), -1, seed=0)
