"""Every family does what its paper says (issue: outside audit). Each test here failed on the code
before the fixes it names: StarGAN's label-blind generator, the PatchGAN standing in for StarGAN's D,
ProGAN's decaying lr, Pix2Pix's eval-mode sampling, prepare.augment never reaching training, and
family tests that re-implemented the engine step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import AugmentParams, Params, TrainCommonParams, from_dict
from pipeline.data.prepare import run_prepare
from pipeline.data.transforms import build_augment
from pipeline.models import REGISTRY
from pipeline.models.base import DataSpec
from pipeline.models.blocks import StarGANDiscriminator
from pipeline.training.batches import BatchSource
from pipeline.training.loop import TrainJob, Trainer
from pipeline.training.step import AdversarialStep, StepConfig

from families_util import SPEC, make_batch, tiny_family, train_steps
from test_data_helpers import prepare_params


# ---- the label reaches the output, for every conditional family ---------------------------------

def _label_effect(name: str, fam) -> float:
    """max |G(x, c1) - G(x, c2)| over a batch, with the same input and the same noise, relative to
    the output's own scale (mean |G(x, c1) - mean|), so a small-init network is judged fairly. The
    label-blind StarGAN generator gave 3e-6 absolute on outputs of scale ~0.1."""
    fam.eval()
    x = make_batch("paired", 7)["a"]
    outs = []
    for k in (1, 2):
        torch.manual_seed(3)                                   # same noise for both labels
        out, _ = fam.synthesize(x, torch.full((x.shape[0],), k))
        outs.append(out)
    fam.train()
    scale = (outs[0] - outs[0].mean()).abs().mean().item()
    return (outs[0] - outs[1]).abs().max().item() / max(scale, 1e-12)


CONDITIONAL = [("stargan", {}), ("defectgan", {}), ("dcgan", {"conditioning": "cgan"}),
               ("dcgan", {"conditioning": "acgan"}), ("progan", {"conditional": True})]


@pytest.mark.parametrize("name,overrides", CONDITIONAL, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_conditional_output_changes_with_the_label_at_init_and_after_training(name, overrides):
    torch.manual_seed(0)
    fam = tiny_family(name, **overrides)
    fam.set_progress(1, 1)                                     # progan: the full-resolution network
    assert _label_effect(name, fam) > 0.05, "at init"
    train_steps(fam, 6)
    fam.set_progress(1, 1)
    assert _label_effect(name, fam) > 0.05, "after six real engine iterations"


def test_stargan_generator_is_the_reference_layout():
    """yunjey/stargan: zero padding, 4x4 stride-2 downs, 4x4 transposed ups, affine instance norm."""
    fam = tiny_family("stargan")
    convs = [m for m in fam.G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in fam.G.modules())
    assert convs[0].kernel_size == (7, 7) and convs[0].padding == (3, 3)
    strided = [m for m in convs if m.stride == (2, 2)]
    assert len(strided) == 4 and all(m.kernel_size == (4, 4) for m in strided)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in strided) == 2
    assert all(m.bias is None for m in convs)
    norms = [m for m in fam.G.modules() if type(m).__name__ == "InstanceNorm"]
    assert norms and all(m.weight is not None and m.bias is not None for m in norms)


# ---- StarGAN's discriminator for StarGAN and Defect-GAN --------------------------------------------

def test_stargan_discriminator_matches_the_reference_at_128px():
    """6 stride-2 4x4 convs (LeakyReLU 0.01) from 64 channels doubling, a bias-free 3x3 source head,
    a bias-free class head whose kernel is the whole 2x2 final map (one logit per class)."""
    D = StarGANDiscriminator(3, 128, 64, 6, num_classes=5)
    convs = [m for m in D.features if isinstance(m, nn.Conv2d)]
    assert [m.stride for m in convs] == [(2, 2)] * 6 and all(m.kernel_size == (4, 4) for m in convs)
    assert all(m.negative_slope == 0.01 for m in D.features if isinstance(m, nn.LeakyReLU))
    widths = [3] + [64 * 2 ** i for i in range(6)]                                # 3 -> 64 ... 2048
    hand = sum(c_in * c_out * 16 + c_out for c_in, c_out in zip(widths, widths[1:]))
    hand += 2048 * 1 * 3 * 3 + 2048 * 5 * 2 * 2                                   # the two heads
    assert sum(p.numel() for p in D.parameters()) == hand                        # 44,762,048
    scores, logits = D(torch.randn(2, 3, 128, 128))
    assert scores.shape == (2, 1, 2, 2) and logits.shape == (2, 5)


@pytest.mark.parametrize("name", ["stargan", "defectgan"])
def test_stargan_and_defectgan_use_the_papers_discriminator_by_default(name):
    fam = REGISTRY[name](REGISTRY[name].Config(), DataSpec(32, 3, ("normal", "a", "b")))
    assert isinstance(fam.D, StarGANDiscriminator)
    light = REGISTRY[name](from_dict(REGISTRY[name].Config, {"d_arch": "patchgan"}, f"train.{name}"),
                           DataSpec(32, 3, ("normal", "a", "b")))
    assert not isinstance(light.D, StarGANDiscriminator)


# ---- ProGAN: constant lr, fresh Adam moments at every new resolution -------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "prepared"
    run_prepare(prepare_params(resolution=16, synthetic={"per_class": 4, "normal": 8, "paired": 8}), out,
                quiet=True)
    return out


def _job(prepared, tmp_path, family, kimg, **cfg):
    common = from_dict(TrainCommonParams, {"kimg": kimg, "batch_size": 4, "tick_kimg": kimg / 4,
                                           "snapshot_ticks": 100}, "train.common")
    return TrainJob(family, common, from_dict(REGISTRY[family].Config, {**_tiny_cfg(family), **cfg}, family),
                    prepared, tmp_path / "out", tmp_path / "work")


def _tiny_cfg(family):
    from families_util import TINY
    return TINY[family]


def test_progan_trains_at_constant_lr_and_resets_adam_when_it_grows(prepared, tmp_path):
    trainer = Trainer(_job(prepared, tmp_path, "progan", 0.08))
    levels, lrs, steps_at_grow = [], [], []
    real_step = trainer.step.__call__

    def spy(batch, train_g):
        level = trainer.family.level
        if levels and level != levels[-1]:
            # The first step at a new level starts from empty optimizer state.
            steps_at_grow.append(len(trainer.opt_g.state) + len(trainer.opt_d.state))
        levels.append(level)
        lrs.append((trainer.opt_g.param_groups[0]["lr"], trainer.opt_d.param_groups[0]["lr"]))
        return real_step(batch, train_g)

    trainer.step = spy
    trainer.run()
    assert len(set(levels)) == 3                                   # 4 -> 8 -> 16 px
    assert steps_at_grow == [0, 0]
    lr = trainer.family.cfg.lr
    assert all(g == lr and d == lr for g, d in lrs)                 # no decay at all (paper)


def test_progan_lr_decay_stays_available_as_an_option(prepared, tmp_path):
    trainer = Trainer(_job(prepared, tmp_path, "progan", 0.08, lr_decay=True))
    trainer.run()
    assert trainer.history[-1]["lr/G"] < 0.5 * trainer.family.cfg.lr


# ---- Pix2Pix samples as the paper does ---------------------------------------------------------------

def test_pix2pix_inference_keeps_dropout_and_uses_each_images_own_statistics():
    torch.manual_seed(0)
    spec = DataSpec(64, 3, ("normal", "defect"))
    fam = tiny_family("pix2pix", spec).eval()              # 64 px: the U-Net has dropout levels
    assert any(isinstance(m, nn.Dropout) for m in fam.G.modules())
    x = make_batch("paired", 0, res=64)["a"]
    buffers = {k: v.clone() for k, v in fam.G.state_dict().items() if "running" in k}

    torch.manual_seed(1)
    out, _ = fam.synthesize(x, torch.ones(4, dtype=torch.long))
    # The paper's test batch of one: train-mode G (dropout on, batch statistics) on each image alone.
    import copy
    reference = copy.deepcopy(fam.G).train()
    torch.manual_seed(1)
    alone, _ = fam.synthesize(x[:1], torch.ones(1, dtype=torch.long))
    torch.manual_seed(1)
    with torch.no_grad():
        expected = reference(x[:1])
    assert torch.allclose(alone, expected, atol=1e-6)
    # Dropout is the noise source: another seed, another output.
    torch.manual_seed(2)
    again, _ = fam.synthesize(x[:1], torch.ones(1, dtype=torch.long))
    assert (again - alone).abs().max() > 1e-3
    # Running statistics are neither used nor moved, and eval mode is restored.
    assert all(torch.equal(v, fam.G.state_dict()[k]) for k, v in buffers.items())
    assert not any(m.training for m in fam.G.modules())
    assert out.shape == x.shape

    eval_fam = tiny_family("pix2pix", spec, inference="eval").eval()
    eval_fam.load_state_dict(fam.state_dict())
    a, _ = eval_fam.synthesize(x, torch.ones(4, dtype=torch.long))
    b, _ = eval_fam.synthesize(x, torch.ones(4, dtype=torch.long))
    assert torch.equal(a, b)                                     # eval: deterministic, running stats


# ---- prepare.augment reaches training, identically on A, B and the mask ----------------------------

def test_the_run_spec_carries_prepare_augment(prepared, tmp_path):
    params = Params()
    params.prepare.augment = AugmentParams(hflip=1.0, vflip=0.0, rotate90=0.0, brightness_contrast=0.0)
    params.train = {"common": {"precision": "bf16", "grad_clip": 2.0}}
    job = TrainJob.from_params(params, "pix2pix", prepared, tmp_path / "out")
    assert job.augment == params.prepare.augment
    # ... and the engine's step config and the data spec, built once, are what the trainer runs with
    assert (job.step.precision, job.step.grad_clip) == ("bf16", 2.0)
    assert job.data.classes[0] == "normal" and job.prepared_dir.is_absolute()
    trainer = Trainer(job)
    assert trainer.source.augment is not None
    assert trainer.step.cfg is job.step and trainer.spec is job.data


def test_paired_augmentation_flips_a_b_and_mask_together(prepared):
    plain = BatchSource("paired", prepared, seed=0, shard=(0, 1))
    flipped = BatchSource("paired", prepared, seed=0, shard=(0, 1),
                          augment=build_augment(AugmentParams(hflip=1.0, vflip=0.0, rotate90=0.0,
                                                              brightness_contrast=0.0)))
    p, f = plain.next(4, torch.device("cpu")), flipped.next(4, torch.device("cpu"))
    for key in ("a", "b", "mask"):
        assert torch.equal(f[key], p[key].flip(-1)), key
    assert not torch.equal(p["a"], p["a"].flip(-1))              # the data is not symmetric


# ---- one test over REGISTRY through the production step --------------------------------------------

def _params(nets):
    return [p.detach().clone() for net in nets.values() for p in net.parameters()]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_family_through_the_real_step(name):
    torch.manual_seed(0)
    fam = tiny_family(name)
    fam.set_progress(1, 1)
    opt_g, opt_d = fam.make_optimizers()
    step = AdversarialStep(fam, opt_g, opt_d, StepConfig(), torch.device("cpu"))
    G, D = fam.generators(), fam.discriminators()
    g0, d0 = _params(G), _params(D)
    stats = step(make_batch(fam.data_kind, 0), train_g=False)
    assert all(torch.equal(a, b) for a, b in zip(g0, _params(G))), "a D-only iteration moved G"
    assert any(not torch.equal(a, b) for a, b in zip(d0, _params(D))), "D did not move"
    assert not any(k.startswith("G/") for k in stats)
    stats = step(make_batch(fam.data_kind, 1), train_g=True)
    assert any(not torch.equal(a, b) for a, b in zip(g0, _params(G))), "G did not move"
    assert any(k.startswith("G/") for k in stats) and all(math.isfinite(v) for v in stats.values())
    assert all(p.requires_grad for net in [*G.values(), *D.values()] for p in net.parameters())


def test_defectgan_defaults_say_where_they_come_from():
    """The re-implementations' weights (jason2714/de-i2i-gan) and the paper's optimiser, critic and D."""
    c = REGISTRY["defectgan"].Config()
    assert (c.n_blocks, c.lambda_cls_real, c.lambda_cls_fake, c.lambda_rec, c.lambda_sd_cyc, c.lambda_sd_con) == \
        (6, 2.0, 5.0, 5.0, 5.0, 1.0)
    assert (c.n_critic, c.lr_g, c.lr_d, c.beta1, c.beta2, c.lambda_gp, c.d_arch) == \
        (5, 2e-4, 2e-4, 0.5, 0.999, 10.0, "stargan")
