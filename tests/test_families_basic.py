"""DCGAN, Pix2Pix, CycleGAN, StarGAN against the family contract (pipeline/models/base.py).

Training iterations go through the production step (AdversarialStep, via tests/families_util.py).
Images are 16 px, batch 4, widths tiny.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import from_dict
from pipeline.errors import ParamsError
from pipeline.models import REGISTRY
from pipeline.models.base import DataSpec
from pipeline.models.cyclegan import CycleGAN
from pipeline.models.dcgan import DCGAN
from pipeline.models.pix2pix import Pix2Pix
from pipeline.models.stargan import StarGAN, build_label_vector

from families_util import engine_iteration, tiny_family

SPEC = DataSpec(resolution=16, channels=3, classes=("normal", "scratch", "spot"))


def tiny(family, **overrides):
    small = {
        DCGAN: dict(z_dim=8, base_channels=4, d_base_channels=4),
        Pix2Pix: dict(base_channels=8, d_base_channels=4),
        CycleGAN: dict(base_channels=4, n_blocks=1, d_base_channels=4, pool_size=4),
        StarGAN: dict(base_channels=4, n_blocks=1, d_base_channels=4),
    }[family]
    cfg = from_dict(family.Config, {**small, **overrides}, f"train.{family.name}")
    return family(cfg, SPEC)


def smooth_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 1.6 - 0.8
    return F.interpolate(low, size=16, mode="bilinear", align_corners=False)   # (n, 3, 16, 16)


def add_defect(images, labels):
    out, mask = images.clone(), torch.zeros(images.shape[0], 1, 16, 16)
    for i, k in enumerate(labels.tolist()):
        if k == 1:
            out[i, :, 7:9, 2:14] = 0.9          # scratch: bright line
            mask[i, :, 7:9, 2:14] = 1
        elif k == 2:
            out[i, :, 5:10, 5:10] = -0.9        # spot: dark square
            mask[i, :, 5:10, 5:10] = 1
    return out, mask


def make_batch(kind, seed=0):
    clean = smooth_images(4, seed)
    labels = torch.tensor([1, 2, 1, 2])
    defect, mask = add_defect(clean, labels)
    if kind == "labelled":
        lab = torch.tensor([0, 1, 2, 1])
        img, m = add_defect(smooth_images(4, seed), lab)
        return {"image": img, "label": lab, "mask": m}
    if kind == "paired":
        return {"a": clean, "b": defect, "mask": mask, "label": labels}
    return {"a": smooth_images(4, seed + 100), "b": defect, "label_b": labels, "mask_b": mask}


def params_of(nets):
    return [p for net in nets.values() for p in net.parameters()]


def set_trainable(nets, flag):
    for p in params_of(nets):
        p.requires_grad_(flag)


def engine_step(fam, batch, opt_g, opt_d, g_step=True):
    """One iteration through the production step (tests/families_util.py)."""
    return engine_iteration(fam, batch, opt_g, opt_d, g_step)


ALL = [DCGAN, Pix2Pix, CycleGAN, StarGAN]


# --------------------------------------------------------------------------- contract

@pytest.mark.parametrize("family", ALL)
def test_d_step_changes_only_d_and_g_step_only_g(family):
    torch.manual_seed(0)
    fam = tiny(family)
    batch = make_batch(family.data_kind)
    G, D = fam.generators(), fam.discriminators()
    opt_g, opt_d = fam.make_optimizers()
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == {id(p) for p in params_of(G)}
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == {id(p) for p in params_of(D)}

    snap = lambda nets: [p.detach().clone() for p in params_of(nets)]   # noqa: E731
    g0, d0 = snap(G), snap(D)
    fakes = fam.forward_g(batch)
    set_trainable(G, False)
    d_loss, d_stats = fam.d_loss(batch, {k: v.detach() for k, v in fakes.items()})
    d_loss.backward()
    opt_d.step()
    assert all(torch.equal(a, b) for a, b in zip(g0, snap(G)))
    assert any(not torch.equal(a, b) for a, b in zip(d0, snap(D)))
    assert d_stats and all(k.startswith("D/") and isinstance(v, float) for k, v in d_stats.items())

    set_trainable(G, True)
    set_trainable(D, False)
    d1 = snap(D)
    opt_d.zero_grad(set_to_none=True)
    g_loss, g_stats = fam.g_loss(batch, fakes)
    g_loss.backward()
    assert all(p.grad is None for p in params_of(D))          # D frozen: no gradient reaches it
    opt_g.step()
    assert all(torch.equal(a, b) for a, b in zip(d1, snap(D)))
    assert any(not torch.equal(a, b) for a, b in zip(g0, snap(G)))
    assert g_stats and all(k.startswith("G/") and isinstance(v, float) for k, v in g_stats.items())


@pytest.mark.parametrize("family", ALL)
def test_synthesize_and_sample_shapes(family):
    torch.manual_seed(0)
    fam = tiny(family).eval()
    normal = smooth_images(3, 5)
    images, masks = fam.synthesize(normal, torch.tensor([1, 2, 1]))
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 1, 16, 16)
    assert images.abs().max() <= 1 and masks.min() >= 0 and masks.max() <= 1
    rows = fam.sample(make_batch(family.data_kind), fam.generators())
    for row in rows.values():
        assert row.shape == (4, 3, 16, 16) and row.abs().max() <= 1


def test_config_validation_names_the_key():
    with pytest.raises(ParamsError, match="train.cyclegan.loss"):
        from_dict(CycleGAN.Config, {"loss": "wgan-gp"}, "train.cyclegan")
    with pytest.raises(ParamsError, match="train.pix2pix.lr"):
        from_dict(Pix2Pix.Config, {"lr": 0}, "train.pix2pix")
    with pytest.raises(ParamsError, match="train.dcgan.loss"):
        from_dict(DCGAN.Config, {"loss": "minimax"}, "train.dcgan")
    with pytest.raises(ParamsError, match="mask_vector"):
        from_dict(StarGAN.Config, {"num_datasets": 2}, "train.stargan")
    with pytest.raises(ParamsError, match="n_blokcs|Did you mean"):
        from_dict(StarGAN.Config, {"n_blokcs": 2}, "train.stargan")


def test_published_defaults():
    s, c, p = StarGAN.Config(), CycleGAN.Config(), Pix2Pix.Config()
    assert (s.loss, s.lambda_cls, s.lambda_rec, s.lambda_gp, s.n_critic, s.lr, s.beta1, s.beta2) == \
        ("wgan-gp", 1.0, 10.0, 10.0, 5, 1e-4, 0.5, 0.999)
    assert (c.loss, c.lambda_cyc, c.lambda_id, c.pool_size, c.lr, c.beta1) == ("lsgan", 10.0, 5.0, 50, 2e-4, 0.5)
    assert (p.lambda_l1, p.lr, p.beta1, p.d_layers) == (100.0, 2e-4, 0.5, 3)


# --------------------------------------------------------------------------- DCGAN

@pytest.mark.parametrize("conditioning", ["none", "cgan", "acgan"])
def test_dcgan_conditionings_train_step(conditioning):
    torch.manual_seed(0)
    fam = tiny(DCGAN, conditioning=conditioning)
    opt_g, opt_d = fam.make_optimizers()
    d_stats, g_stats = engine_step(fam, make_batch("labelled"), opt_g, opt_d)
    assert ("D/cls_fake" in d_stats) == ("G/cls" in g_stats) == (conditioning == "acgan")
    assert fam.class_conditional == (conditioning != "none")


def test_dcgan_wgan_clips_critic_and_uses_published_optimizers():
    torch.manual_seed(0)
    fam = tiny(DCGAN, loss="wgan")
    assert fam.n_critic == 5
    opt_g, opt_d = fam.make_optimizers()
    assert isinstance(opt_d, torch.optim.RMSprop) and opt_d.param_groups[0]["lr"] == 5e-5
    engine_step(fam, make_batch("labelled"), opt_g, opt_d, g_step=False)
    assert all(p.abs().max() <= 0.01 for p in fam.D.parameters())
    gp = tiny(DCGAN, loss="wgan-gp")
    _, opt_d = gp.make_optimizers()
    assert opt_d.param_groups[0]["betas"] == (0.0, 0.9) and opt_d.param_groups[0]["lr"] == 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gp.D.modules())
    d_stats, _ = engine_step(gp, make_batch("labelled"), *gp.make_optimizers(), g_step=False)
    assert "D/gp" in d_stats


def test_dcgan_noise_comes_from_global_rng():
    fam = tiny(DCGAN).eval()
    labels = torch.tensor([1, 2])
    torch.manual_seed(7)
    a, masks = fam.synthesize(torch.zeros(2, 3, 16, 16), labels)
    torch.manual_seed(7)
    b, _ = fam.synthesize(torch.ones(2, 3, 16, 16), labels)     # the normal image is ignored
    assert torch.equal(a, b) and masks.abs().sum() == 0


# --------------------------------------------------------------------------- CycleGAN

def test_cyclegan_identity_generators_give_zero_cycle_and_identity_losses():
    torch.manual_seed(0)
    fam = tiny(CycleGAN)
    batch = make_batch("unpaired")
    _, stats = fam.g_loss(batch, fam.forward_g(batch))
    assert stats["G/cyc"] > 0 and stats["G/idt"] > 0                 # real generators: not zero
    fam.G, fam.F = nn.Identity(), nn.Identity()
    _, stats = fam.g_loss(batch, fam.forward_g(batch))
    assert stats["G/cyc"] == 0.0 and stats["G/idt"] == 0.0


def test_cyclegan_forward_g_outputs_and_export():
    fam = tiny(CycleGAN)
    fakes = fam.forward_g(make_batch("unpaired"))
    assert set(fakes) == {"fake_y", "fake_x", "rec_x", "rec_y", "idt_y", "idt_x"}
    assert set(fam.generators()) == {"G", "F"} and fam.export_generator(fam.generators()) is fam.G
    no_idt = tiny(CycleGAN, identity=0.0)
    fakes = no_idt.forward_g(make_batch("unpaired"))
    assert "idt_x" not in fakes and "G/idt" not in no_idt.g_loss(make_batch("unpaired"), fakes)[1]


def test_cyclegan_pools_resume_through_extra_state():
    torch.manual_seed(0)
    fam = tiny(CycleGAN)
    opt_g, opt_d = fam.make_optimizers()
    for seed in range(2):                                  # 8 fakes into pools of 4: full
        engine_step(fam, make_batch("unpaired", seed), opt_g, opt_d)
    state = fam.extra_state()
    other = tiny(CycleGAN)
    other.load_extra_state(state)
    fake = torch.randn(4, 3, 16, 16)
    rng = torch.get_rng_state()
    a = fam.pool_y.query(fake)
    torch.set_rng_state(rng)
    b = other.pool_y.query(fake)
    assert torch.equal(a, b) and len(other.pool_x) == 4


# --------------------------------------------------------------------------- StarGAN

def test_stargan_target_label_replicated_spatially():
    torch.manual_seed(0)
    fam = tiny(StarGAN)
    seen = []
    fam.G.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    batch = make_batch("labelled")
    fakes = fam.forward_g(batch)
    (inp,) = seen
    assert inp.shape == (4, 3 + 3, 16, 16)                         # image channels + one plane per domain
    assert torch.equal(inp[:, :3], batch["image"])
    target = F.one_hot(fakes["label_trg"], 3).float()[:, :, None, None].expand(-1, -1, 16, 16)
    assert torch.equal(inp[:, 3:], target)
    assert sorted(fakes["label_trg"].tolist()) == sorted(batch["label"].tolist())   # a permutation
    torch.manual_seed(1)
    first = fam.forward_g(batch)["label_trg"]
    torch.manual_seed(1)
    assert torch.equal(fam.forward_g(batch)["label_trg"], first)                    # global RNG


def test_stargan_mask_vector_builder():
    labels, dataset = torch.tensor([1, 0, 1]), torch.tensor([0, 1, 1])
    got = build_label_vector(labels, (3, 2), dataset, mask_vector=True)
    expected = torch.tensor([[0, 1, 0, 0, 0, 1, 0],      # dataset 0, class 1; dataset-1 labels unknown
                             [0, 0, 0, 1, 0, 0, 1],      # dataset 1, class 0
                             [0, 0, 0, 0, 1, 0, 1]], dtype=torch.float)
    assert torch.equal(got, expected)
    assert torch.equal(build_label_vector(torch.tensor([2, 0]), (3,)), torch.tensor([[0., 0, 1], [1, 0, 0]]))


def test_stargan_mask_vector_family():
    torch.manual_seed(0)
    fam = tiny(StarGAN, mask_vector=True, num_datasets=2, dataset_classes=[3, 2])
    assert fam.G.net[0].in_channels == 3 + 3 + 2 + 2
    assert fam.D.num_classes == 5
    batch = make_batch("labelled")
    batch["dataset"] = torch.tensor([0, 1, 0, 1])
    batch["label"] = torch.tensor([2, 1, 0, 0])
    fakes = fam.forward_g(batch)
    # targets stay within each sample's dataset
    assert sorted(fakes["label_trg"][[0, 2]].tolist()) == [0, 2]
    assert sorted(fakes["label_trg"][[1, 3]].tolist()) == [0, 1]
    # the classifier loss reads only each sample's own block
    logits = torch.zeros(4, 5)
    logits[0, 3:] = 100.0                          # sample 0 is dataset 0: its dataset-1 block is ignored
    expected = (2 * math.log(3) + 2 * math.log(2)) / 4
    assert fam._cls_loss(logits, batch["label"], batch["dataset"]).item() == pytest.approx(expected, rel=1e-5)
    opt_g, opt_d = fam.make_optimizers()
    d_stats, g_stats = engine_step(fam, batch, opt_g, opt_d)
    assert "D/gp" in d_stats and "G/rec" in g_stats


# --------------------------------------------------------------------------- short runs

def run_short(fam, batches, key, steps, g_every=1):
    opt_g, opt_d = fam.make_optimizers()
    values = []
    for step in range(steps):
        g_step = (step + 1) % g_every == 0
        _, g_stats = engine_step(fam, batches[step % len(batches)], opt_g, opt_d, g_step=g_step)
        if g_step:
            values.append(g_stats[key])
    return sum(values[:5]) / 5, sum(values[-5:]) / 5


# Short runs on two fixed batches, lr a bit above the default so 50 steps show the trend.

def test_pix2pix_short_run_reduces_l1():
    torch.manual_seed(0)
    fam = tiny(Pix2Pix, lr=1e-3)
    first, last = run_short(fam, [make_batch("paired", s) for s in range(2)], "G/l1", 50)
    assert last < 0.6 * first


def test_cyclegan_short_run_reduces_cycle_loss():
    torch.manual_seed(0)
    fam = tiny(CycleGAN, lr=1e-3, base_channels=8)
    first, last = run_short(fam, [make_batch("unpaired", s) for s in range(2)], "G/cyc", 50)
    assert last < 0.7 * first


def test_stargan_short_run_reduces_reconstruction():
    torch.manual_seed(0)
    # one D step per G step here (the default 5 would need 5x the iterations for the same G steps)
    fam = tiny(StarGAN, n_critic=1, lr=1e-3, base_channels=16)
    first, last = run_short(fam, [make_batch("labelled", s) for s in range(2)], "G/rec", 50, g_every=fam.n_critic)
    assert last < 0.6 * first


# ---- what each family declares (read by generation and evaluate, which name no family) ----------

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_capabilities_match_what_synthesize_does(name):
    """outputs_masks False: the normal image is ignored and the masks are zeros (generation then
    records no region and skips its filter); True: the output is made from the normal image."""
    from pipeline.models.noise import per_sample_noise

    fam = tiny_family(name).eval()
    assert fam.data_kind in ("labelled", "paired", "unpaired") and isinstance(fam.class_conditional, bool)
    labels = torch.tensor([1, 2, 1])
    outputs = []
    for seed in (5, 6):
        with per_sample_noise([11, 12, 13]):
            outputs.append(fam.synthesize(smooth_images(3, seed), labels))
    (img_a, mask_a), (img_b, _) = outputs
    if fam.outputs_masks:
        assert not torch.equal(img_a, img_b)
    else:
        assert torch.equal(img_a, img_b) and not mask_a.any()


def test_generate_models_and_default_model_are_registered_families(tmp_path):
    from pipeline.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("generate: {}\n")
    generate = load_params(path).generate
    assert generate.models == list(REGISTRY) and generate.default_model == generate.models[0]
    path.write_text("generate: {models: [stargan, dcgan]}\n")
    generate = load_params(path).generate
    assert generate.models == ["stargan", "dcgan"] and generate.default_model == "stargan"
    for text, key, hint in [("generate: {models: [defectgan, cyclgan]}", "generate.models", "cyclegan"),
                            ("generate: {default_model: pix2px}", "generate.default_model", "pix2pix")]:
        path.write_text(text + "\n")
        with pytest.raises(ParamsError) as err:
            load_params(path)
        assert f"'{key}'" in str(err.value) and f"Did you mean '{hint}'" in str(err.value)
