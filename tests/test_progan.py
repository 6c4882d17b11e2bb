"""ProGAN (METHODS.md, "Progressive GAN"): schedule, fade-in equivalences, engine-step isolation."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import from_dict
from pipeline.errors import ParamsError, PipelineError
from pipeline.models.progan import Config, ProGAN, progan_schedule

from families_util import engine_iteration


def tiny_cfg(**kw) -> Config:
    return from_dict(Config, {"latent_dim": 8, "base_channels": 4, "max_channels": 8, **kw}, "train.progan")


def labelled_batch(spec, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    res = spec.resolution
    return {"image": torch.rand(n, spec.channels, res, res, generator=g) * 2 - 1,
            "label": torch.arange(n) % spec.num_classes,
            "mask": torch.zeros(n, 1, res, res)}


def up(x, factor=2):
    return F.interpolate(x, scale_factor=factor, mode="nearest")


# ---- schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cur, expected", [
    (0, (0, 1.0)), (50, (0, 1.0)),                       # 4x4 phase
    (100, (1, 0.0)), (150, (1, 0.5)), (175, (1, 0.75)),  # 8x8 fade-in: start, middle
    (200, (1, 1.0)), (250, (1, 1.0)),                    # 8x8 stabilise
    (300, (2, 0.0)), (325, (2, 0.25)), (399, (2, 0.99)), (400, (2, 1.0)),
    (500, (2, 1.0)), (10_000, (2, 1.0)),                 # done growing
])
def test_alpha_schedule_in_images_shown(cur, expected):
    level, alpha = progan_schedule(cur, 100, max_level=2)
    assert level == expected[0]
    assert alpha == pytest.approx(expected[1])


def test_set_progress_is_a_pure_function_of_cur_nimg(tiny_spec):
    fam = ProGAN(tiny_cfg(phase_kimg=0.1, batch_sizes={4: 32, 8: 16}), tiny_spec)
    assert (fam.level, fam.alpha) == (2, 1.0)            # built for generation: the final network
    fam.set_progress(150, 10_000)
    assert (fam.level, fam.alpha, fam.current_resolution) == (1, 0.5, 8)
    assert fam.batch_size(4) == 16
    fam.set_progress(0, 10_000)
    assert fam.batch_size(4) == 32
    fam.set_progress(450, 10_000)
    assert fam.batch_size(4) == 4                        # 16 px not listed: the default
    state = fam.extra_state()
    other = ProGAN(tiny_cfg(phase_kimg=0.1), tiny_spec)
    other.set_progress(0, 10_000)
    other.load_extra_state(state)
    assert (other.level, other.alpha) == (fam.level, fam.alpha)
    # Auto phases (phase_kimg 0): 5 phases over the run at 16 px.
    auto = ProGAN(tiny_cfg(), tiny_spec)
    auto.set_progress(300, 1000)                          # phase length 200: middle of the 8x8 fade
    assert (auto.level, auto.alpha) == (1, pytest.approx(0.5))


def test_config_validation_names_the_key():
    with pytest.raises(ParamsError, match="train.progan.lattent_dim"):
        from_dict(Config, {"lattent_dim": 4}, "train.progan")
    with pytest.raises(ParamsError, match="train.progan.batch_sizes.6"):
        from_dict(Config, {"batch_sizes": {6: 4}}, "train.progan")
    with pytest.raises(ParamsError, match="train.progan.lr"):
        from_dict(Config, {"lr": 0}, "train.progan")


def test_non_power_of_two_resolution_is_a_clear_error():
    from pipeline.models.base import DataSpec
    with pytest.raises(PipelineError, match="power-of-two"):
        ProGAN(tiny_cfg(), DataSpec(resolution=24, channels=3, classes=("normal", "a")))


# ---- fade-in equivalences ------------------------------------------------------------------------

@pytest.mark.parametrize("conditional", [True, False])
def test_generator_at_alpha_zero_equals_previous_level_upsampled(tiny_spec, conditional):
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(conditional=conditional), tiny_spec)
    z, labels = torch.randn(3, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        for level in (1, 2):
            grown = fam.G(z, labels, level=level, alpha=0.0)
            old = fam.G(z, labels, level=level - 1, alpha=1.0)
            assert grown.shape[-1] == 4 * 2 ** level
            torch.testing.assert_close(grown, up(old), rtol=0, atol=0)
            # alpha in between is the linear blend; alpha 1 is the new path alone.
            new = fam.G(z, labels, level=level, alpha=1.0)
            torch.testing.assert_close(fam.G(z, labels, level=level, alpha=0.25), 0.75 * up(old) + 0.25 * new)


def test_discriminator_at_alpha_zero_equals_previous_level_on_downsampled_input(tiny_spec):
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(), tiny_spec)
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        for level in (1, 2):
            x = torch.randn(4, 3, 4 * 2 ** level, 4 * 2 ** level)
            grown = fam.D(x, labels, level=level, alpha=0.0)
            old = fam.D(F.avg_pool2d(x, 2), labels, level=level - 1, alpha=1.0)
            assert grown.shape == (4,)
            torch.testing.assert_close(grown, old, rtol=0, atol=0)


def test_real_images_downscaled_and_blended_like_the_generator(tiny_spec):
    fam = ProGAN(tiny_cfg(phase_kimg=0.1), tiny_spec)
    x = labelled_batch(tiny_spec)["image"]
    fam.set_progress(100, 1000)                          # 8x8 fade start: alpha 0
    torch.testing.assert_close(fam.real_at_level(x), up(F.avg_pool2d(x, 4)))
    fam.set_progress(150, 1000)                          # alpha 0.5
    cur = F.avg_pool2d(x, 2)                             # 8x8
    torch.testing.assert_close(fam.real_at_level(x), 0.5 * up(F.avg_pool2d(cur, 2)) + 0.5 * cur)
    fam.set_progress(450, 1000)                          # full resolution, alpha 1
    assert torch.equal(fam.real_at_level(x), x)


# ---- the engine's step: each phase leaves the other network untouched ---------------------------

def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_d_step_leaves_g_untouched_and_g_step_leaves_d_untouched(tiny_spec):
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(phase_kimg=0.1), tiny_spec)
    fam.set_progress(150, 1000)                          # mid fade-in: both paths carry gradient
    opt_g, opt_d = fam.make_optimizers()
    assert opt_g.defaults["betas"] == (0.0, 0.99) and opt_g.defaults["lr"] == 1e-3
    batch = labelled_batch(tiny_spec)
    g0, d0 = snapshot(fam.G), snapshot(fam.D)
    fakes = {k: v.detach() for k, v in fam.forward_g(batch).items()}
    fam.G.requires_grad_(False)
    loss, stats = fam.d_loss(batch, fakes)
    loss.backward()
    opt_d.step()
    assert all(torch.equal(v, fam.G.state_dict()[k]) for k, v in g0.items())
    assert any(not torch.equal(v, fam.D.state_dict()[k]) for k, v in d0.items())
    assert {"D/loss", "D/adv", "D/gp", "D/drift"} <= set(stats)
    assert all(isinstance(v, float) for v in stats.values())
    fam.G.requires_grad_(True)
    fam.D.requires_grad_(False)
    opt_d.zero_grad(set_to_none=True)
    d1 = snapshot(fam.D)
    loss, stats = fam.g_loss(batch, fam.forward_g(batch))
    loss.backward()
    opt_g.step()
    assert all(torch.equal(v, fam.D.state_dict()[k]) for k, v in d1.items())
    assert any(not torch.equal(v, fam.G.state_dict()[k]) for k, v in g0.items())
    assert set(stats) >= {"G/loss", "G/adv"} and all(isinstance(v, float) for v in stats.values())


def test_d_loss_is_wgan_gp_plus_drift(tiny_spec):
    from pipeline.models import losses
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(), tiny_spec)
    batch = labelled_batch(tiny_spec)
    fakes = {k: v.detach() for k, v in fam.forward_g(batch).items()}
    torch.manual_seed(1)
    loss, stats = fam.d_loss(batch, fakes)
    real = fam.D(batch["image"], batch["label"])
    fake = fam.D(fakes["fake"], batch["label"])
    expected_adv = (fake.mean() - real.mean()).item()
    assert stats["D/adv"] == pytest.approx(expected_adv, rel=1e-5)
    assert stats["D/drift"] == pytest.approx(losses.drift_penalty(real).item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected_adv + 10 * stats["D/gp"] + 0.001 * stats["D/drift"], rel=1e-5)


def test_short_progressive_run_grows_and_stays_finite(tiny_spec):
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(phase_kimg=0.02), tiny_spec)   # 20-image phases: all levels within 25 steps
    opt_g, opt_d = fam.make_optimizers()
    seen, cur = set(), 0
    for it in range(25):
        fam.set_progress(cur, 1000)
        batch = labelled_batch(tiny_spec, n=fam.batch_size(4), seed=it)
        d_stats, g_stats = engine_iteration(fam, batch, opt_g, opt_d)
        seen.add(fam.current_resolution)
        assert all(torch.isfinite(torch.tensor(v)) for v in {**d_stats, **g_stats}.values())
        cur += batch["image"].shape[0]
    assert seen == {4, 8, 16}


# ---- sampling and synthesis ---------------------------------------------------------------------

def test_sample_grid_is_full_resolution_and_reproducible(tiny_spec):
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(phase_kimg=0.1), tiny_spec)
    fam.set_progress(150, 1000)                          # 8x8 network, shown at 16 px
    batch = labelled_batch(tiny_spec)
    rows = fam.sample(batch, fam.generators())
    assert rows["fake"].shape == rows["real"].shape == (4, 3, 16, 16)
    assert rows["fake"].abs().max() <= 1
    state = torch.random.get_rng_state()
    again = fam.sample(batch, fam.generators())
    assert torch.equal(rows["fake"], again["fake"])      # fixed grid noise ...
    assert torch.equal(state, torch.random.get_rng_state())   # ... without touching training RNG


def test_synthesize_makes_chosen_classes_from_noise(tiny_spec):
    torch.manual_seed(0)
    fam = ProGAN(tiny_cfg(), tiny_spec)
    labels = torch.tensor([1, 2, 1])
    images, masks = fam.synthesize(torch.zeros(3, 3, 16, 16), labels)
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 1, 16, 16)
    assert torch.equal(masks, torch.zeros_like(masks))
    assert images.min() >= -1 and images.max() <= 1
    # The class changes the output for the same noise.
    torch.manual_seed(5)
    a, _ = fam.synthesize(None, torch.tensor([1]))
    torch.manual_seed(5)
    b, _ = fam.synthesize(None, torch.tensor([2]))
    assert not torch.allclose(a, b)
    with pytest.raises(PipelineError, match="labels"):
        fam.synthesize(None, torch.tensor([3]))
    assert fam.class_conditional
    assert not ProGAN(tiny_cfg(conditional=False), tiny_spec).class_conditional
