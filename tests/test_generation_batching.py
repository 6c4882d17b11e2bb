"""Batched generation keeps every sample's pixels a function of (seed, sample index) only.

pipeline/models/noise.py gives each sample its own noise stream at sampling time (and is the
global RNG in training); pipeline/generation/sampler.py runs synthesize on fixed-size chunks.
Here: the noise helpers' contract, then every family the generation stage supports, untrained
and tiny, generated in calls of 1, 3 and 16 samples -> byte-identical PNGs. The Ray stage across
actor counts is tests/test_generation.py::test_generate_outputs_reproducible_and_replaced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.generation import sampler as S
from pipeline.generation.placement import Placement
from pipeline.models import noise
from pipeline.models.base import DataSpec
from pipeline.models.spade import NoiseInjection

from families_util import SPEC, tiny_family

# ---- the noise helpers ---------------------------------------------------------------------------


def test_outside_the_context_noise_is_the_global_rng():
    # Training draws exactly what torch.randn / F.dropout draw (checkpoints' RNG state, resume).
    torch.manual_seed(5)
    z, want_z = noise.randn(3, 2, 4), None
    x = torch.ones(4, 8)
    d = noise.dropout(x, 0.5, training=True)
    torch.manual_seed(5)
    want_z = torch.randn(3, 2, 4)
    want_d = F.dropout(x, 0.5, training=True)
    assert torch.equal(z, want_z) and torch.equal(d, want_d)
    assert torch.equal(noise.dropout(x, 0.5, training=False), x)


def test_each_row_comes_from_its_own_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with noise.per_sample_noise([11, 22, 33]):
        batch = noise.randn(3, 1, 5, 5)
        later = noise.randn(3, 4)               # second draw: each stream goes on
    with noise.per_sample_noise([22]):
        alone = noise.randn(1, 1, 5, 5)
        alone_later = noise.randn(1, 4)
    with noise.per_sample_noise([33, 22]):
        swapped = noise.randn(2, 1, 5, 5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(batch[1], alone[0]) and torch.equal(later[1], alone_later[0])
    assert torch.equal(batch[1], swapped[1]) and torch.equal(batch[2], swapped[0])
    assert not torch.equal(batch[0], batch[1])
    # The first draw of a generator seeded 22: N(0, 1) numbers, not a copy of another row.
    assert torch.equal(alone[0], torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(22)))


def test_per_sample_dropout_keeps_its_rows_and_scales():
    x = torch.ones(3, 64)
    with noise.per_sample_noise([1, 2, 3]):
        batch = noise.dropout(x, 0.25, training=True)
        eval_mode = noise.dropout(x, 0.25, training=False)
    with noise.per_sample_noise([2]):
        alone = noise.dropout(x[:1], 0.25, training=True)
    assert torch.equal(batch[1], alone[0]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(batch.unique(), torch.tensor([0.0, 4 / 3]))   # kept values scaled by 1 / (1 - p)
    assert torch.equal(eval_mode, x)


def test_a_draw_that_is_not_batch_first_is_refused():
    with noise.per_sample_noise([1, 2]), pytest.raises(RuntimeError, match="2 sample streams.*batch of 3"):
        noise.randn(3, 4)


# ---- every generation family, batches of 1, 3 and 16 ----------------------------------------------

# Pix2Pix's test-time dropout sits in the 8x-base-width levels only: 64 px gives it two.
PIX2PIX_SPEC = DataSpec(resolution=64, channels=3, classes=SPEC.classes)
FAMILIES = {
    "defectgan": (SPEC, {}),
    "cyclegan": (SPEC, {}),
    "stargan": (SPEC, {}),
    "progan": (SPEC, {}),
    "dcgan": (SPEC, {"conditioning": "none"}),
    "pix2pix": (PIX2PIX_SPEC, {"base_channels": 2, "d_base_channels": 2}),
}
N = 19      # one full compute chunk and a padded one
ROUND_TO_U8 = S.images_u8


def family_for_sampling(name: str):
    spec, overrides = FAMILIES[name]
    fam = tiny_family(name, spec, **overrides)
    if name == "progan":
        fam.set_progress(1, 1)                      # grown to full resolution
    for m in fam.modules():
        if isinstance(m, NoiseInjection):
            torch.nn.init.constant_(m.weight, 0.5)  # init 0; a trained G uses its noise
    return fam, spec


def generate_in_calls(sampler: S.Sampler, spec: DataSpec, call_size: int, monkeypatch) -> dict[str, list]:
    """PNGs of N samples generated `call_size` at a time, plus "float": each sample's image as
    synthesize returned it (before rounding to uint8), caught where the sampler rounds it."""
    rng = np.random.default_rng(0)
    normal = rng.integers(0, 256, (N, spec.channels, spec.resolution, spec.resolution), dtype=np.uint8)
    pngs = [S.encode_png(a.transpose(1, 2, 0)) for a in normal]
    idx = np.arange(N)
    labels = 1 + idx % 2
    seeds = S.sample_seeds(0, idx)
    out: dict[str, list] = {"image_png": [], "mask_png": [], "region_png": [], "float": []}
    def caught(images):
        out["float"].extend(images.clone())
        return ROUND_TO_U8(images)

    monkeypatch.setattr(S, "images_u8", caught)
    for start in range(0, N, call_size):
        part = slice(start, start + call_size)
        torch.manual_seed(start)       # the global RNG state before a call must not matter
        got = sampler.generate_png(pngs[part], labels[part], seeds[part], idx[part])
        for key in ("image_png", "mask_png", "region_png"):
            out[key] += list(got[key])
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_sampler_pixels_do_not_depend_on_batching(name, monkeypatch):
    torch.set_num_threads(1)
    fam, spec = family_for_sampling(name)
    sampler = S.Sampler(fam, Placement("random", spec.resolution, 0.2, 0.5))
    by_size = {size: generate_in_calls(sampler, spec, size, monkeypatch) for size in (16, 3, 1)}
    for size in (3, 1):
        for key in ("image_png", "mask_png", "region_png"):
            assert by_size[size][key] == by_size[16][key], f"{name}: {key} in calls of {size} vs 16"
        # Bit for bit before rounding too: a last-bit difference (another conv algorithm for
        # another batch shape) would flip a rounded pixel now and then on bigger images.
        for i, (a, b) in enumerate(zip(by_size[size]["float"], by_size[16]["float"], strict=True)):
            assert torch.equal(a, b), f"{name}: sample {i}'s image in calls of {size} vs 16"


@pytest.mark.parametrize("name", ["defectgan", "progan", "dcgan", "pix2pix"])
def test_noise_families_draw_from_the_sample_seed(name):
    # The batching test would pass for a family that ignored its noise; these use it: the same
    # input and class with another sample seed gives other pixels, the same seed the same ones.
    fam, spec = family_for_sampling(name)
    res = spec.resolution
    one = torch.rand(1, spec.channels, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    normal, labels = one.repeat(3, 1, 1, 1), torch.ones(3, dtype=torch.long)
    region = torch.zeros(3, 1, res, res)
    region[..., res // 4:res // 2, res // 4:res // 2] = 1
    with torch.no_grad(), noise.per_sample_noise([7, 8, 7]):
        images, _ = fam.eval().synthesize(normal, labels, region)
    assert torch.equal(images[0], images[2]) and not torch.equal(images[0], images[1])
