"""The shared training engine: step semantics, n_critic, NaN guard, exact resume, schedules, EMA."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import AugmentParams, TrainCommonParams
from pipeline.errors import TrainingError
from pipeline.models import REGISTRY
from pipeline.models import losses as L
from pipeline.models.base import DataSpec, GANFamily
from pipeline.training import loop
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.ema import make_ema, update_ema
from pipeline.training.schedule import linear_decay_factor, step_decay_factor
from pipeline.training.step import AdversarialStep, StepConfig


@dataclass
class ToyConfig:
    loss: str = "lsgan"
    n_critic: int = 1
    nan_at_call: int = -1   # d_loss returns NaN on this call (NaN-guard test)


class ToyFamily(GANFamily):
    """A one-conv translation GAN: enough to exercise every engine path quickly."""

    name = "toy"
    Config = ToyConfig
    data_kind = "unpaired"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        c = spec.channels
        self.G = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, c, 3, padding=1), nn.Tanh())
        self.D = nn.Sequential(nn.Conv2d(c, 4, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))
        self.calls = 0

    def generators(self):
        return {"G": self.G}

    def discriminators(self):
        return {"D": self.D}

    def make_optimizers(self):
        return (torch.optim.Adam(self.G.parameters(), 2e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.D.parameters(), 2e-3, betas=(0.5, 0.999)))

    def forward_g(self, batch):
        # Noise makes the run depend on the global RNG, which resume must restore.
        return {"fake": self.G(batch["a"] + 0.05 * torch.randn_like(batch["a"]))}

    def d_loss(self, batch, fakes):
        self.calls += 1
        loss = L.d_adversarial(self.cfg.loss, self.D(batch["b"]), self.D(fakes["fake"]))
        if self.calls == self.cfg.nan_at_call:
            loss = loss * float("nan")
        return loss, {"D/adv": float(loss.detach())}

    def g_loss(self, batch, fakes):
        adv = L.g_adversarial(self.cfg.loss, self.D(fakes["fake"]))
        rec = L.l1(fakes["fake"], batch["a"])
        return adv + rec, {"G/adv": float(adv), "G/l1": float(rec)}

    def sample(self, batch, generators):
        return {"real": batch["a"], "translated": generators["G"](batch["a"])}

    def synthesize(self, normal, labels, region=None):
        out = self.G(normal)
        return out, (out - normal).abs().mean(1, keepdim=True) / 2


@pytest.fixture(autouse=True)
def _toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "toy", ToyFamily)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipeline.config import PrepareParams, SyntheticSourceParams
    from pipeline.data.prepare import run_prepare

    out = tmp_path_factory.mktemp("prep") / "prepared"
    run_prepare(PrepareParams(resolution=16, synthetic=SyntheticSourceParams(per_class=6, normal=12, paired=4)), out)
    return out


def make_job(prepared: Path, tmp: Path, name: str, kimg=0.064, **cfg) -> loop.TrainJob:
    common = TrainCommonParams(seed=3, kimg=kimg, batch_size=4, tick_kimg=0.016, snapshot_ticks=1, ema_decay=0.9)
    return loop.TrainJob("toy", common, ToyConfig(**cfg), prepared, tmp / name / "model", tmp / name / "work",
                         augment=AugmentParams(hflip=0.5))


def export_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out_dir / loop.EXPORT_FILE, weights_only=True)
    return state["generators"]["G"]


class CrashAfterSnapshot(loop.Reporter):
    """Simulates a dead worker right after the n-th checkpoint was written."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def on_snapshot(self, nimg, metrics, checkpoint_dir, grid_path):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt("simulated crash")


def test_resumed_run_matches_uninterrupted_run_exactly(prepared, tmp_path):
    full = make_job(prepared, tmp_path, "full")
    loop.train(full)

    broken = make_job(prepared, tmp_path, "resumed")
    with pytest.raises(KeyboardInterrupt):
        loop.train(broken, reporter=CrashAfterSnapshot(2))
    ckpt = loop.latest_local_checkpoint(broken.work_dir)
    assert ckpt is not None and ckpt.name == "checkpoint-000000032"
    loop.train(broken, resume_from=ckpt)

    a, b = export_tensors(full.out_dir), export_tensors(broken.out_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the run really trained: weights moved away from their seeded initialisation
    torch.manual_seed(3)
    fresh = ToyFamily(ToyConfig(), DataSpec(16, 3, ("normal",)))
    assert not torch.equal(fresh.G[0].weight, a["0.weight"])


def test_run_spec_overrides_are_laid_over_params_and_validated(prepared, tmp_path):
    from pipeline.config import Params
    from pipeline.errors import ParamsError

    params = Params()
    params.train = {"common": {"kimg": 2.0}, "dcgan": {"kimg": 3.0, "z_dim": 8}}
    job = loop.TrainJob.from_params(params, "dcgan", prepared, tmp_path / "out", work_dir=tmp_path / "work",
                                    overrides={"dcgan": {"kimg": 0.5, "base_channels": 4}})
    # a family key wins over train.common, as in params.yaml; keys not overridden stay
    assert (job.common.kimg, job.family_cfg.z_dim, job.family_cfg.base_channels) == (0.5, 8, 4)
    assert job.work_dir == (tmp_path / "work").resolve() and job.out_dir == (tmp_path / "out").resolve()
    assert params.train["dcgan"] == {"kimg": 3.0, "z_dim": 8}            # the caller's params untouched
    with pytest.raises(ParamsError, match="train.dcgan.no_such_key"):
        loop.TrainJob.from_params(params, "dcgan", prepared, tmp_path / "out", overrides={"dcgan": {"no_such_key": 1}})


def test_final_outputs_are_written_and_readable(prepared, tmp_path):
    job = make_job(prepared, tmp_path, "outs", kimg=0.032)
    metrics = loop.train(job)
    for name in ("generator_ema.pt", "checkpoint.pt", "samples.png", "metrics.json", "loss_curves.png"):
        assert (job.out_dir / name).stat().st_size > 0, name
    state = load_checkpoint(job.out_dir)          # weights_only=True inside
    assert state["counters"]["nimg"] == 32
    assert set(state) >= {"model", "ema", "opt_g", "opt_d", "sched_g", "rng", "source", "config", "history"}
    assert metrics["img_per_s"] > 0 and metrics["gflop_per_s"] > 0
    assert "G/l1" in metrics and "lr/G" in metrics
    family = loop.load_trained(job.out_dir)
    img, mask = family.synthesize(torch.zeros(2, 3, 16, 16), torch.ones(2, dtype=torch.long))
    assert img.shape == (2, 3, 16, 16) and mask.shape == (2, 1, 16, 16)


def test_nan_guard_stops_with_clear_message_and_keeps_last_checkpoint(prepared, tmp_path):
    job = make_job(prepared, tmp_path, "nan", nan_at_call=10)   # after the first checkpoint (call 4)
    with pytest.raises(TrainingError) as err:
        loop.train(job)
    msg = str(err.value)
    assert "non-finite D loss" in msg and "Last good checkpoint" in msg
    ckpt = loop.latest_local_checkpoint(job.work_dir)
    state = load_checkpoint(ckpt)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not job.out_dir.exists()   # nothing half-written as a final model


def _toy_and_batch(n_critic=1):
    torch.manual_seed(0)
    fam = ToyFamily(ToyConfig(n_critic=n_critic), DataSpec(8, 3, ("normal", "x")))
    batch = {"a": torch.rand(2, 3, 8, 8) * 2 - 1, "b": torch.rand(2, 3, 8, 8) * 2 - 1}
    opt_g, opt_d = fam.make_optimizers()
    return fam, batch, AdversarialStep(fam, opt_g, opt_d, StepConfig(), torch.device("cpu"))


def test_d_only_iteration_leaves_generator_untouched():
    fam, batch, step = _toy_and_batch()
    g0 = [p.clone() for p in fam.G.parameters()]
    d0 = [p.clone() for p in fam.D.parameters()]
    stats = step(batch, train_g=False)
    assert all(torch.equal(a, b) for a, b in zip(g0, fam.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, fam.D.parameters()))
    assert "G/loss" not in stats and "D/loss" in stats


def test_g_phase_does_not_touch_discriminator_beyond_its_own_step():
    fam, batch, step = _toy_and_batch()
    # Reference: the D update alone, from identical state.
    ref, _, ref_step = _toy_and_batch()
    torch.manual_seed(1)
    ref_step(batch, train_g=False)
    torch.manual_seed(1)
    g0 = [p.clone() for p in fam.G.parameters()]
    step(batch, train_g=True)
    for a, b in zip(ref.D.parameters(), fam.D.parameters()):
        assert torch.equal(a, b)          # G's phase left D exactly where D's step put it
    assert any(not torch.equal(a, b) for a, b in zip(g0, fam.G.parameters()))
    assert all(p.grad is None or p.requires_grad for p in fam.D.parameters())


def test_loop_updates_generator_every_n_critic_iterations(prepared, tmp_path):
    job = make_job(prepared, tmp_path, "ncritic", kimg=0.024, n_critic=3)   # 6 iterations
    trainer = loop.Trainer(job)
    g_steps = []
    original = trainer.step.__call__

    def spy(batch, train_g):
        g_steps.append(train_g)
        return original(batch, train_g)

    trainer.step = spy
    trainer.run()
    assert g_steps == [False, False, True, False, False, True]


def test_linear_decay_and_step_schedules_hand_values():
    assert linear_decay_factor(0, 1000, 0.5) == 1.0
    assert linear_decay_factor(500, 1000, 0.5) == 1.0
    assert linear_decay_factor(750, 1000, 0.5) == pytest.approx(0.5)
    assert linear_decay_factor(1000, 1000, 0.5) == 0.0
    assert step_decay_factor(2500, 1000, 0.1) == pytest.approx(0.01)


def test_ema_update_matches_formula():
    live = nn.Linear(2, 1)
    ema = make_ema(live)
    with torch.no_grad():
        live.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    update_ema(ema, live, decay=0.75)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 0.25))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="unreadable"):
        load_checkpoint(tmp_path)
    with pytest.raises(TrainingError, match="not found"):
        load_checkpoint(tmp_path / "missing")


def _allreduce_worker(rank, world, port, out):
    import torch.distributed as dist

    from pipeline.training.step import all_reduce_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    p = nn.Parameter(torch.zeros(3))
    q = nn.Parameter(torch.zeros(2))          # unused on rank 1: grad None counts as zeros
    p.grad = torch.full((3,), float(rank + 1))
    q.grad = torch.ones(2) if rank == 0 else None
    all_reduce_gradients([p, q])
    torch.save({"p": p.grad, "q": q.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gradients_are_averaged_across_workers(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_allreduce_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(got["p"], torch.full((3,), 1.5))
        assert torch.allclose(got["q"], torch.full((2,), 0.5))


def _two_rank_run(rank, world, port, prepared, tmp):
    """Rank `rank` of a 2-process gloo group: an uninterrupted run, then a run stopped after its
    second checkpoint and resumed from it (rank 0's files only, as on a cluster)."""
    import torch.distributed as dist

    REGISTRY["toy"] = ToyFamily              # a spawned process: the fixture registered it in the parent only
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loop.train(make_job(prepared, tmp, "full"), rank=rank, world_size=world)
        broken = make_job(prepared, tmp, "resumed")
        try:
            loop.train(broken, reporter=CrashAfterSnapshot(2), rank=rank, world_size=world)
        except KeyboardInterrupt:
            pass
        dist.barrier()                       # rank 0 has written the checkpoint every rank resumes from
        loop.train(broken, resume_from=loop.latest_local_checkpoint(broken.work_dir), rank=rank, world_size=world)
    finally:
        dist.destroy_process_group()


def test_every_rank_resumes_from_the_one_engine_checkpoint(prepared, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_run, args=(2, port, prepared, tmp_path), nprocs=2)

    a, b = export_tensors(tmp_path / "full" / "model"), export_tensors(tmp_path / "resumed" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rank 1's own sampler and RNG state travel in rank 0's checkpoints (here the final one), not
    # in a file of its own
    state = load_checkpoint(tmp_path / "resumed" / "model")
    assert state["world_size"] == 2 and len(state["peer_ranks"]) == 1
    assert not torch.equal(state["peer_ranks"][0]["rng"]["torch"], state["rng"]["torch"])
    assert not torch.equal(state["peer_ranks"][0]["source"]["gen"], state["source"]["gen"])


def test_adversarial_loss_names_are_complete():
    assert set(L.LOSS_NAMES) == {"vanilla", "nonsaturating", "lsgan", "wgan", "wgan-gp", "hinge"}
    assert math.isclose(float(L.d_adversarial("vanilla", torch.zeros(4), torch.zeros(4))), 2 * math.log(2), rel_tol=1e-6)
