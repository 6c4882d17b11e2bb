"""Defect-GAN (METHODS.md, "Defect-GAN"): composition, control map, losses, engine isolation, placement."""

import math
import pytest
import torch
from torch import nn

from pipeline.config import from_dict
from pipeline.errors import ParamsError, PipelineError
from pipeline.models import defectgan
from pipeline.models.base import DataSpec
from pipeline.models.defectgan import (Config, DefectGAN, compose, control_map, sd_constraint_loss,
                                       sd_cycle_loss)
from pipeline.models.spade import NoiseInjection, UniformControl

from families_util import engine_iteration


def tiny_cfg(**kw) -> Config:
    base = {"base_channels": 8, "max_channels": 16, "n_blocks": 1, "spade_hidden": 8, "d_base_channels": 8}
    return from_dict(Config, {**base, **kw}, "train.defectgan")


def unpaired_batch(spec, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    res, C = spec.resolution, spec.channels
    return {"a": torch.rand(n, C, res, res, generator=g) * 2 - 1,
            "b": torch.rand(n, C, res, res, generator=g) * 2 - 1,
            "label_b": 1 + torch.arange(n) % (spec.num_classes - 1),
            "mask_b": torch.zeros(n, 1, res, res)}


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- layer-wise composition ------------------------------------------------------------------

def test_compose_is_exact_at_mask_zero_and_one():
    torch.manual_seed(0)
    x, f = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(compose(x, f, torch.zeros(2, 1, 4, 4)), x)
    assert torch.equal(compose(x, f, torch.ones(2, 1, 4, 4)), f)
    half = compose(x, f, torch.full((2, 1, 4, 4), 0.5))
    torch.testing.assert_close(half, 0.5 * x + 0.5 * f)


@pytest.mark.parametrize("mask_value", [0.0, 1.0])
def test_generator_output_is_input_at_m0_and_foreground_at_m1(tiny_spec, mask_value):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    with torch.no_grad():   # force the mask head: sigmoid(-1e4) == 0, sigmoid(1e4) == 1 exactly
        fam.G.to_mask.weight.zero_()
        fam.G.to_mask.bias.fill_(1e4 if mask_value else -1e4)
    x = unpaired_batch(tiny_spec)["a"]
    labels = torch.tensor([1, 2, 1, 2])
    torch.manual_seed(1)
    out, f, m = fam.translate(fam.G, x, labels)
    assert torch.equal(m, torch.full_like(m, mask_value))
    assert torch.equal(out, f if mask_value else x)
    image, masks = fam.synthesize(x, labels)
    assert torch.equal(masks, m)
    if not mask_value:
        assert torch.equal(image, x)


# ---- control map ----------------------------------------------------------------------------------

def test_control_map_constant_in_training_and_regional_at_inference():
    labels = torch.tensor([2, 1])
    A = control_map(labels, 3, (4, 4))
    assert A.shape == (2, 3, 4, 4)
    assert torch.equal(A[0], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 4, 4))
    region = torch.zeros(2, 1, 4, 4)
    region[:, :, 1:3, 1:3] = 1
    A = control_map(labels, 3, (4, 4), region)
    assert torch.equal(A.sum(1), torch.ones(2, 4, 4))                 # one-hot at every pixel
    assert torch.equal(A[0, 2], region[0, 0])                          # class 2 inside ...
    assert torch.equal(A[0, 0], 1 - region[0, 0])                      # ... normal outside
    assert torch.equal(A[1, 1], region[1, 0])


def test_training_translation_equals_the_dense_control_map_path(tiny_spec):
    """translate() without a region keeps A as labels (UniformControl); the generator must give
    what it gives for the dense one-hot map, values and gradients."""
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(noise=False), tiny_spec).double()      # float64: only the maths may differ
    x = unpaired_batch(tiny_spec)["a"].double()
    labels = torch.tensor([1, 0, 2, 1])
    _, f, m = fam.translate(fam.G, x, labels)
    f_ref, m_ref = fam.G(x, control_map(labels, tiny_spec.num_classes, x.shape[-2:]).double())
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m, m_ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((f * 3).sum() + m.sum(), list(fam.G.parameters()))
    grads_ref = torch.autograd.grad((f_ref * 3).sum() + m_ref.sum(), list(fam.G.parameters()))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


# ---- losses on hand-set masks --------------------------------------------------------------------

def test_sd_losses_hand_computed():
    m_d = torch.tensor([[0.0, 1.0], [0.5, 0.25]]).view(1, 1, 2, 2)
    m_n = torch.tensor([[0.5, 0.5], [0.5, 0.75]]).view(1, 1, 2, 2)
    # |m_d - m_n| = 0.5, 0.5, 0, 0.5 -> mean 0.375
    assert sd_cycle_loss(m_d, m_n).item() == pytest.approx(0.375)
    # mean|m_d| = 1.75 / 4, mean|m_n| = 2.25 / 4 -> 1.0
    assert sd_constraint_loss(m_d, m_n).item() == pytest.approx(1.0)
    assert sd_cycle_loss(m_d, m_d).item() == 0.0


class HandSetG(nn.Module):
    """Stub generator: f = 0, m = 0.25 where A asks for a defect, 0.75 where A asks for normal."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, A):
        if isinstance(A, UniformControl):
            A = A.dense(x.shape[-2:])
        normal = A[:, :1]
        return torch.zeros_like(x) + 0 * self.p, 0.25 + 0.5 * normal + 0 * self.p


def test_g_loss_terms_on_hand_set_masks(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    fam.G = HandSetG()
    batch = unpaired_batch(tiny_spec)
    fakes = fam.forward_g(batch)
    loss, stats = fam.g_loss(batch, fakes)
    # m_d = 0.25 (deface), m_n^ = 0.75 (restore), m_r = 0.75 (restore), m_b^ = 0.25 (deface back)
    assert stats["G/sd_cyc"] == pytest.approx(0.5 + 0.5)
    assert stats["G/sd_con"] == pytest.approx((0.25 + 0.75) + (0.75 + 0.25))
    assert stats["G/mask_mean"] == pytest.approx(0.25)
    # f = 0: d = 0.75 a, n^ = 0.25 d = 0.1875 a; r = 0.25 b, b^ = 0.75 r = 0.1875 b.
    expected_rec = 0.8125 * (batch["a"].abs().mean() + batch["b"].abs().mean()).item()
    assert stats["G/rec"] == pytest.approx(expected_rec, rel=1e-5)
    c = fam.cfg
    total = (stats["G/adv"] + c.lambda_cls_fake * stats["G/cls"] + c.lambda_rec * stats["G/rec"]
             + c.lambda_sd_cyc * stats["G/sd_cyc"] + c.lambda_sd_con * stats["G/sd_con"])
    assert loss.item() == pytest.approx(total, rel=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


def test_d_loss_terms(tiny_spec):
    from pipeline.models import losses
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    batch = unpaired_batch(tiny_spec)
    fakes = {k: v.detach() for k, v in fam.forward_g(batch).items()}
    assert set(fakes["target"].tolist()) <= {1, 2}                    # defect classes only
    loss, stats = fam.d_loss(batch, fakes)
    real_src, real_cls = fam.D(torch.cat([batch["a"], batch["b"]]))
    fake_src, _ = fam.D(torch.cat([fakes["d"], fakes["r"]]))
    labels = torch.cat([torch.zeros(4, dtype=torch.long), batch["label_b"]])
    assert stats["D/adv"] == pytest.approx((fake_src.mean() - real_src.mean()).item(), rel=1e-4, abs=1e-6)
    assert stats["D/cls"] == pytest.approx(losses.classification(real_cls, labels).item(), rel=1e-5)
    c = fam.cfg
    assert loss.item() == pytest.approx(stats["D/adv"] + c.lambda_gp * stats["D/gp"] + c.lambda_cls_real * stats["D/cls"],
                                        rel=1e-5)
    assert {"D/loss", "D/adv", "D/gp", "D/cls"} <= set(stats)


# ---- engine isolation and a short run --------------------------------------------------------------

def test_d_step_leaves_g_untouched_and_g_step_leaves_d_untouched(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    opt_g, opt_d = fam.make_optimizers()
    assert opt_g.defaults["betas"] == (0.5, 0.999) and opt_g.defaults["lr"] == 2e-4 and fam.n_critic == 5
    batch = unpaired_batch(tiny_spec)
    g0, d0 = snapshot(fam.G), snapshot(fam.D)
    engine_iteration(fam, batch, opt_g, opt_d, g_step=False)
    assert all(torch.equal(v, fam.G.state_dict()[k]) for k, v in g0.items())
    assert any(not torch.equal(v, fam.D.state_dict()[k]) for k, v in d0.items())
    # G's step alone.
    d1 = snapshot(fam.D)
    fam.G.requires_grad_(True)
    fam.D.requires_grad_(False)
    fakes = fam.forward_g(batch)
    opt_g.zero_grad(set_to_none=True)
    loss, _ = fam.g_loss(batch, fakes)
    loss.backward()
    opt_g.step()
    assert all(torch.equal(v, fam.D.state_dict()[k]) for k, v in d1.items())
    assert any(not torch.equal(v, fam.G.state_dict()[k]) for k, v in g0.items())


def test_short_run_reduces_reconstruction(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(lr_g=1e-3, lr_d=1e-3), tiny_spec)
    opt_g, opt_d = fam.make_optimizers()
    batch = unpaired_batch(tiny_spec, seed=3)        # a tiny fixed dataset
    recs = []
    for _ in range(30):
        d_stats, g_stats = engine_iteration(fam, batch, opt_g, opt_d)
        recs.append(g_stats["G/rec"])
        assert all(torch.isfinite(torch.tensor(v)) for v in {**d_stats, **g_stats}.values())
    assert sum(recs[-5:]) / 5 < 0.5 * sum(recs[:5]) / 5


# ---- spatial control at inference ----------------------------------------------------------------------

def box_region(n, res, lo, hi):
    region = torch.zeros(n, 1, res, res)
    region[..., lo:hi, lo:hi] = 1
    return region


def test_regional_control_map_changes_the_mask_mostly_inside_the_region():
    # Structural: SPADE modulates per pixel and the encoder reads A per pixel, so asking for a
    # defect in a region moves the (untrained) mask more there than elsewhere. Instance norm and
    # the receptive field couple all pixels, so outside moves too (about half as much at init);
    # the trained test below shows the confinement that training adds.
    spec = DataSpec(resolution=32, channels=3, classes=("normal", "scratch", "spot"))
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(noise=False), spec)
    x = unpaired_batch(spec)["a"]
    labels = torch.tensor([1, 2, 1, 2])
    region = box_region(4, 32, 10, 22)
    A_normal = control_map(torch.zeros(4, dtype=torch.long), 3, (32, 32))
    with torch.no_grad():
        _, m_normal = fam.G(x, A_normal)
        _, m_region = fam.G(x, control_map(labels, 3, (32, 32), region))
    change = (m_region - m_normal).abs()
    inside = (change * region).sum() / region.sum()
    outside = (change * (1 - region)).sum() / (1 - region).sum()
    assert inside > 1.5 * outside


def toy_images(n, g, res=16):
    """Flat grey surfaces with mild noise (the normal class)."""
    level = torch.rand(n, 1, 1, 1, generator=g) * 0.4 - 0.2
    return level.expand(n, 3, res, res) + 0.05 * torch.randn(n, 3, res, res, generator=g)


def toy_defects(n, g, res=16):
    """Class 1: a bright 4x4 square, class 2: a dark one, anywhere on the surface; with masks."""
    x, labels = toy_images(n, g, res).clone(), torch.randint(1, 3, (n,), generator=g)
    masks = torch.zeros(n, 1, res, res)
    for i in range(n):
        r, c = torch.randint(0, res - 4, (2,), generator=g).tolist()
        x[i, :, r:r + 4, c:c + 4] = 0.9 if labels[i] == 1 else -0.9
        masks[i, :, r:r + 4, c:c + 4] = 1
    return x, labels, masks


@pytest.mark.slow
def test_trained_generator_confines_the_mask_to_the_requested_region():
    # Trained with the shipped options (control maps shaped like the real masks, region term, mask
    # supervision; params.yaml), then asked for a defect inside a box it never saw.
    spec = DataSpec(resolution=16, channels=3, classes=("normal", "bright", "dark"))
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(lr_g=1e-3, lr_d=1e-3, n_critic=1, lambda_cls_fake=5.0, lambda_rec=2.0,
                             lambda_sd_con=0.05, train_control="masks", lambda_region=5.0, lambda_mask_sup=5.0,
                             lambda_defect_rec=10.0, mask_bias=-2.0), spec)
    opt_g, opt_d = fam.make_optimizers()
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        b, label_b, mask_b = toy_defects(4, g)
        engine_iteration(fam, {"a": toy_images(4, g), "b": b, "label_b": label_b, "mask_b": mask_b,
                               "has_mask_b": torch.ones(4, dtype=torch.bool)}, opt_g, opt_d)
    normal = toy_images(16, g)
    region = torch.zeros(16, 1, 16, 16)
    for i in range(16):
        r, c = torch.randint(0, 9, (2,), generator=g).tolist()
        region[i, :, r:r + 8, c:c + 8] = 1                            # a quarter of the image
    _, m = fam.synthesize(normal, torch.randint(1, 3, (16,), generator=g), region)
    inside = (m * region).sum() / region.sum()
    outside = (m * (1 - region)).sum() / (1 - region).sum()
    assert inside > 3 * outside
    assert (m * region).sum() / m.sum() > 0.5                          # most mask mass in 25% of the area


# ---- synthesis API -------------------------------------------------------------------------------------

def test_synthesize_and_place_defect(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    x = unpaired_batch(tiny_spec)["a"]
    images, masks = fam.synthesize(x, torch.tensor([1, 2, 1, 2]), box_region(4, 16, 4, 12))
    assert images.shape == (4, 3, 16, 16) and masks.shape == (4, 1, 16, 16)
    assert images.abs().max() <= 1 and 0 <= masks.min() and masks.max() <= 1
    # A box is the same as the equivalent mask; a class name is its index.
    torch.manual_seed(1)
    by_box, m_box, lab = fam.place_defect(x[0], "spot", box=(0.25, 0.25, 0.75, 0.75))
    torch.manual_seed(1)
    by_mask, m_mask, _ = fam.place_defect(x[0], 2, mask=box_region(1, 16, 4, 12)[0, 0])
    assert by_box.shape == (3, 16, 16) and m_box.shape == (1, 16, 16) and lab.tolist() == [2]
    torch.testing.assert_close(by_box, by_mask)
    torch.testing.assert_close(m_box, m_mask)
    # No region: the constant map of training.
    torch.manual_seed(2)
    whole, _ = fam.synthesize(x, torch.tensor([1, 1, 1, 1]))
    torch.manual_seed(2)
    again, _, _ = fam.place_defect(x, 1)
    torch.testing.assert_close(whole, again)


def test_synthesis_input_errors_are_clear(tiny_spec):
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    x = unpaired_batch(tiny_spec)["a"]
    with pytest.raises(PipelineError, match=r"expected \(16, 16\).*got|\(8, 8\)"):
        fam.place_defect(x[0], 1, mask=torch.ones(8, 8))
    with pytest.raises(PipelineError, match=r"\(4, 1, 16, 16\), got \(4, 1, 8, 8\)"):
        fam.synthesize(x, torch.tensor([1, 1, 1, 1]), torch.ones(4, 1, 8, 8))
    with pytest.raises(PipelineError, match="defect classes 1..2"):
        fam.synthesize(x, torch.tensor([0, 1, 1, 1]))
    with pytest.raises(PipelineError, match=r"shape \(4,\)"):
        fam.synthesize(x, torch.tensor([1, 1]))
    with pytest.raises(PipelineError, match=r"\(B, 3, H, W\)"):
        fam.synthesize(x[:, :1], torch.tensor([1, 1, 1, 1]))
    with pytest.raises(PipelineError, match="box"):
        fam.place_defect(x[0], 1, box=(0.5, 0.5, 0.2, 0.9))
    with pytest.raises(PipelineError, match="not both"):
        fam.place_defect(x[0], 1, mask=torch.ones(16, 16), box=(0, 0, 1, 1))
    with pytest.raises(PipelineError, match="unknown defect class 'dent'"):
        fam.place_defect(x[0], "dent")


def test_noise_injection_gives_stochastic_variation(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    with torch.no_grad():
        for layer in fam.G.modules():
            if isinstance(layer, NoiseInjection):
                layer.weight.fill_(0.5)
    x, labels = unpaired_batch(tiny_spec)["a"], torch.tensor([1, 2, 1, 2])
    first, _ = fam.synthesize(x, labels)
    second, _ = fam.synthesize(x, labels)
    assert not torch.allclose(first, second)
    torch.manual_seed(7)
    a, _ = fam.synthesize(x, labels)
    torch.manual_seed(7)
    b, _ = fam.synthesize(x, labels)
    assert torch.equal(a, b)


def test_sample_rows_and_training_rng_untouched(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(), tiny_spec)
    batch = unpaired_batch(tiny_spec)
    state = torch.random.get_rng_state()
    rows = fam.sample(batch, fam.generators())
    assert torch.equal(state, torch.random.get_rng_state())
    assert {"normal", "defaced", "mask", "restored", "placed_center", "real_defect", "real_restored"} <= set(rows)
    for row in rows.values():
        assert row.shape == (4, 3, 16, 16) and row.abs().max() <= 1


def test_config_validation_and_resolution_check():
    with pytest.raises(ParamsError, match="train.defectgan.lambda_rec"):
        from_dict(Config, {"lambda_rec": -1}, "train.defectgan")
    with pytest.raises(ParamsError, match="Did you mean 'train.defectgan.n_critic'"):
        from_dict(Config, {"n_critics": 5}, "train.defectgan")
    with pytest.raises(PipelineError, match="n_down"):
        DefectGAN(tiny_cfg(n_down=3), DataSpec(resolution=8, channels=3, classes=("normal", "a")))
    assert DefectGAN.data_kind == "unpaired" and DefectGAN.name == "defectgan"


# ---- beyond the paper: spatial training control, region term, restoration masks, mask bias ------------

def test_random_boxes_and_jittered_masks_are_regions_of_the_asked_size():
    from pipeline.models.defectgan import jitter_masks, random_boxes
    torch.manual_seed(0)
    boxes = random_boxes(64, (32, 32), 0.25, 0.5, "cpu")
    for box in boxes[:, 0]:
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 8 <= h <= 16 and 8 <= w <= 16
        assert box.sum() == h * w                                   # one filled rectangle
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 10:12, 4:20] = 1                                    # a thin horizontal crack
    out = jitter_masks(mask)
    assert out.shape == mask.shape and set(out.unique().tolist()) == {0.0, 1.0}
    # Dilated by 1 px: a 2 x 16 line becomes 4 x 18 (flips and shifts keep its shape).
    assert all(o.sum() == 4 * 18 for o in out)


def test_masks_control_takes_class_and_region_from_the_batchs_real_defects(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(train_control="masks", region_min=0.5, region_max=0.75), tiny_spec)
    batch = unpaired_batch(tiny_spec)
    batch["mask_b"][:, :, 7:9, 5:11] = 1                           # a 2 x 6 line (shifts stay inside)
    batch["has_mask_b"] = torch.tensor([True, True, True, True])
    fakes = fam.forward_g(batch)
    region = fakes["region"]
    assert set(fakes["target"].tolist()) <= set(batch["label_b"].tolist())
    assert all(r.sum() == 4 * 8 for r in region)                   # the line, dilated by 1 px
    batch["has_mask_b"] = torch.zeros(4, dtype=torch.bool)           # no known masks: boxes
    boxes = fam.forward_g(batch)["region"]
    assert all(r[0].any(1).sum() >= 8 and r[0].any(0).sum() >= 8 for r in boxes)   # boxes, >= half a side


def test_region_and_mask_supervision_terms_hand_computed(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(train_control="boxes", lambda_region=3.0, lambda_mask_sup=2.0,
                             lambda_defect_rec=4.0, mask_sup_loss="balanced_bce"), tiny_spec)
    fam.G = HandSetG()          # f = 0; m = 0.25 where A asks for a defect, 0.75 where it asks for normal
    batch = unpaired_batch(tiny_spec)
    batch["mask_b"][:2, :, 4:8, 4:8] = 1
    batch["has_mask_b"] = torch.tensor([True, True, False, False])
    fakes = fam.forward_g(batch)
    R = fakes["region"]
    loss, stats = fam.g_loss(batch, fakes)
    # Defacement: m_d = 0.75 outside R. Defacing back: b's region is its dilated mask (6 x 6 at
    # rows/cols 3..8) where known, the whole image otherwise, so m_b^ = 0.75 outside that.
    grown = torch.zeros(4, 1, 16, 16)
    grown[:2, :, 3:9, 3:9] = 1
    grown[2:] = 1
    expected_region = 0.75 * (1 - R).mean() + 0.75 * (1 - grown).mean()
    assert stats["G/region"] == pytest.approx(expected_region.item(), rel=1e-5)
    # Mask supervision on the two known defects: m_r = 0.75 everywhere (normal asked everywhere);
    # m_b^ = 0.25 inside the dilated mask, 0.75 outside.
    t = batch["mask_b"][:2]
    def bce(m, y):   # class-balanced: defect pixels and the others weigh half each
        return 0.5 * (-(y * torch.log(m)).sum() / y.sum() - ((1 - y) * torch.log(1 - m)).sum() / (1 - y).sum())
    m_bh = 0.25 * grown[:2] + 0.75 * (1 - grown[:2])
    expected_sup = bce(torch.full_like(t, 0.75), t) + bce(m_bh, t)
    assert stats["G/mask_sup"] == pytest.approx(expected_sup.item(), rel=1e-5)
    # f = 0: r = 0.25 b, b^ = 0.75 r = 0.1875 b inside the mask, so |b^ - b| = 0.8125 |b| there.
    b = batch["b"][:2]
    expected_defect = (0.8125 * (b.abs().mean(1, keepdim=True) * t).sum(dim=(1, 2, 3)) / 16).mean()
    assert stats["G/defect_rec"] == pytest.approx(expected_defect.item(), rel=1e-5)
    c = fam.cfg
    paper = (stats["G/adv"] + c.lambda_cls_fake * stats["G/cls"] + c.lambda_rec * stats["G/rec"]
             + c.lambda_sd_cyc * stats["G/sd_cyc"] + c.lambda_sd_con * stats["G/sd_con"])
    assert loss.item() == pytest.approx(paper + 3.0 * expected_region.item() + 2.0 * expected_sup.item()
                                        + 4.0 * expected_defect.item(), rel=1e-5)


def test_dice_bce_mask_supervision_hand_computed(tiny_spec):
    torch.manual_seed(0)
    fam = DefectGAN(tiny_cfg(train_control="boxes", lambda_mask_sup=2.0, mask_sup_loss="dice_bce"), tiny_spec)
    fam.G = HandSetG()          # m = 0.25 where A asks for a defect, 0.75 where it asks for normal
    batch = unpaired_batch(tiny_spec)
    batch["mask_b"][:2, :, 4:8, 4:8] = 1                            # 16 defect pixels of 256
    batch["has_mask_b"] = torch.tensor([True, True, False, False])
    _, stats = fam.g_loss(batch, fakes := fam.forward_g(batch))
    assert "region" in fakes
    # m_r = 0.75 everywhere: Dice = 1 - 2 * 0.75 * 16 / (0.75 * 256 + 16); pixel BCE =
    # (16 * -log 0.75 + 240 * -log 0.25) / 256.
    dice_r = 1 - 2 * 0.75 * 16 / (0.75 * 256 + 16)
    bce_r = (16 * -math.log(0.75) + 240 * -math.log(0.25)) / 256
    # m_b^ = 0.25 inside the dilated 6 x 6 region, 0.75 outside: Dice = 1 - 2 * 0.25 * 16 /
    # (0.25 * 36 + 0.75 * 220 + 16); BCE = (16 * -log 0.25 + 20 * -log 0.75 + 220 * -log 0.25) / 256.
    dice_bh = 1 - 2 * 0.25 * 16 / (0.25 * 36 + 0.75 * 220 + 16)
    bce_bh = (16 * -math.log(0.25) + 20 * -math.log(0.75) + 220 * -math.log(0.25)) / 256
    assert stats["G/mask_sup"] == pytest.approx(dice_r + bce_r + dice_bh + bce_bh, rel=1e-5)


def test_balanced_bce_calls_uncertain_pixels_defect_and_dice_bce_does_not():
    # Ten real defects share a 50 px core (2 % of the image); a 76 px rim around it is defect in
    # one of them only (pi = 0.1). The best constant mask value q on the rim: balanced BCE (defect
    # pixels weigh ~25x) puts it above the 0.5 threshold, so every rim pixel is drawn as defect,
    # the fat masks measured on the classic preset; dice_bce keeps it below.
    target = torch.zeros(10, 1, 50, 50)
    target[..., 20:25, 20:30] = 1
    rim = torch.zeros(1, 1, 50, 50)
    rim[..., 18:27, 18:32] = 1
    rim = rim - target[:1]
    target[0] += rim[0]
    core = target[1:2]
    qs = torch.linspace(0.05, 0.95, 19)
    def best_q(form):
        losses_q = [defectgan.mask_supervision((core * 0.99 + rim * q + (1 - core - rim) * 0.01).expand(10, -1, -1, -1),
                                               target, form).item() for q in qs]
        return qs[int(torch.tensor(losses_q).argmin())].item()
    assert best_q("balanced_bce") > 0.5
    assert best_q("dice_bce") < 0.5
    with pytest.raises(PipelineError, match="mask_sup_loss"):
        tiny_cfg(mask_sup_loss="l2").validate("train.defectgan")


def test_paper_control_has_no_region_and_mask_bias_starts_small(tiny_spec):
    torch.manual_seed(0)
    paper = DefectGAN(tiny_cfg(), tiny_spec)
    batch = unpaired_batch(tiny_spec)
    fakes = paper.forward_g(batch)
    assert "region" not in fakes and "G/region" not in paper.g_loss(batch, fakes)[1]
    assert 0.3 < fakes["m_d"].mean() < 0.7                          # bias 0: m starts near 0.5
    torch.manual_seed(0)
    biased = DefectGAN(tiny_cfg(mask_bias=-3.0), tiny_spec)
    assert biased.forward_g(batch)["m_d"].mean() < 0.15              # sigmoid(-3) = 0.047
