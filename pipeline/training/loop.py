"""The training loop, counted in images shown (kimg), with ticks for metrics, sample grids and
checkpoints. Plain PyTorch: Ray and MLflow plug in through `Reporter` (see ray_train.py).

Progress is `nimg`, the number of real images shown to D across all workers. Every `tick_kimg`
thousand images the loop reports averaged losses, learning rates, img/s and achieved GFLOP/s;
every `snapshot_ticks` ticks it writes a sample grid and a full checkpoint. A run resumed from a
checkpoint continues bit-for-bit where the uninterrupted run would be (CPU, fixed seed).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import AugmentParams, Params, TrainCommonParams, to_dict, train_params
from pipeline.errors import DataError, TrainingError
from pipeline.fsutil import atomic_dir
from pipeline.models import build_family
from pipeline.models.base import DataSpec, GANFamily
from pipeline.training.batches import BatchSource
from pipeline.training.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from pipeline.training.ema import make_ema, update_ema
from pipeline.training.flops import CountFlops
from pipeline.training.grid import sample_grid_text, save_grid
from pipeline.training.schedule import LRSchedule, linear_decay_factor
from pipeline.training.step import AdversarialStep, StepConfig

EXPORT_FILE = "generator_ema.pt"
SAMPLE_SEED = 20260


class Reporter:
    """Where the loop sends what it measures. The base class prints nothing and stores nothing.

    Every worker calls every method (Ray's report is collective); implementations decide what
    rank 0 does. `state_dict` goes into checkpoints so a resumed run keeps e.g. its MLflow run id.
    """

    def on_start(self, job: "TrainJob", resumed_nimg: int) -> None: ...

    def on_tick(self, nimg: int, metrics: dict[str, float]) -> None: ...

    def on_snapshot(self, nimg: int, metrics: dict[str, float], checkpoint_dir: Path | None,
                    grid_path: Path | None) -> None: ...

    def on_end(self, out_dir: Path | None, metrics: dict[str, float], generator: torch.nn.Module | None) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class PrintReporter(Reporter):
    def on_tick(self, nimg, metrics):
        keys = [k for k in ("D/loss", "G/loss", "img_per_s") if k in metrics]
        print(f"kimg {nimg / 1000:7.2f}  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in keys), flush=True)


@dataclass
class TrainJob:
    """One training run's specification, built once (`from_params` for the CLI and Ray Train; the
    tests and benches build it directly) and passed as is to every worker: the family, its config,
    the common training config, the engine's step config, the augmentation and the data spec."""

    family: str
    common: TrainCommonParams
    family_cfg: Any
    prepared_dir: Path
    out_dir: Path                 # final model folder (models/<family>/), written by rank 0 at the end
    work_dir: Path                # local checkpoints and sample grids during training
    augment: AugmentParams | None = None
    step: Optional[StepConfig] = None    # None: train.common's precision and grad_clip
    data: Optional[DataSpec] = None      # None: read from prepared_dir/classes.json

    def __post_init__(self) -> None:
        if self.step is None:
            self.step = StepConfig(precision=self.common.precision, grad_clip=self.common.grad_clip)
        if self.data is None:
            self.data = read_spec(self.prepared_dir)

    @classmethod
    def from_params(cls, params: Params, family: str, prepared_dir: Path, out_dir: Path,
                    overrides: dict[str, dict] | None = None, work_dir: Path | None = None) -> "TrainJob":
        """The run `params` describe for `family` (validated: unknown family or bad keys are a
        ParamsError), with prepare.augment, the train-time augmentation dvc.yaml declares as a train
        param. Paths are made absolute (workers run elsewhere); work_dir (default out_dir) is
        replaced per worker by Ray Train.

        overrides: train sections laid over params.train before validation, e.g.
        `{"defectgan": {"kimg": 1, "lambda_region": 0}}` (a bench's variant of a params file), so
        the run is still built and checked in this one place; as in params.yaml, a family key
        naming a train.common field overrides train.common."""
        if overrides:
            train = dict(params.train or {})
            for section, values in overrides.items():
                train[section] = {**(train.get(section) or {}), **values}
            params = replace(params, train=train)
        common, family_cfg = train_params(params, family)
        prepared_dir, out_dir = Path(prepared_dir).resolve(), Path(out_dir).resolve()
        if not (prepared_dir / "classes.json").exists():
            raise DataError(f"no prepared dataset at {prepared_dir} (classes.json missing). Run `pipeline prepare` "
                            "first, or pass --data <prepared folder>.")
        return cls(family=family, common=common, family_cfg=family_cfg, prepared_dir=prepared_dir, out_dir=out_dir,
                   work_dir=Path(work_dir).resolve() if work_dir is not None else out_dir,
                   augment=params.prepare.augment)

    def resolved_config(self) -> dict:
        return {"family": self.family, "common": to_dict(self.common), self.family: to_dict(self.family_cfg),
                "augment": to_dict(self.augment) if self.augment else None}


def read_spec(prepared_dir: Path) -> DataSpec:
    from pipeline.data.datasets import read_classes

    return DataSpec.from_dict(read_classes(prepared_dir))


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_parameters(family: GANFamily) -> None:
    import torch.distributed as dist

    if _distributed():
        for tensor in list(family.parameters()) + list(family.buffers()):
            dist.broadcast(tensor.data, src=0)


def _build_augment(params: AugmentParams | None):
    if params is None:
        return None
    from pipeline.data.datasets import build_augment

    return build_augment(params)


class Trainer:
    """Holds the live state of one worker's run; `run()` trains to the end."""

    def __init__(self, job: TrainJob, reporter: Reporter | None = None, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu"):
        self.job, self.rank, self.world = job, rank, world_size
        self.reporter = reporter or Reporter()
        self.device = torch.device(device)
        c = job.common
        self.total_nimg = int(round(c.kimg * 1000))
        self.tick_nimg = max(1, int(round(c.tick_kimg * 1000)))

        self.spec = job.data
        _seed_all(c.seed)  # identical initial weights on every worker
        self.family = build_family(job.family, job.family_cfg, self.spec).to(self.device)
        if c.channels_last:
            self.family = self.family.to(memory_format=torch.channels_last)
        self.ema = {name: make_ema(m) for name, m in self.family.generators().items()}
        self.opt_g, self.opt_d = self.family.make_optimizers()
        if self.family.uses_lr_decay():
            decay = lambda nimg: linear_decay_factor(nimg, self.total_nimg, c.lr_decay_start)  # noqa: E731
        else:
            decay = lambda nimg: 1.0  # noqa: E731
        self.sched_g, self.sched_d = LRSchedule(self.opt_g, decay), LRSchedule(self.opt_d, decay)
        self.step = AdversarialStep(self.family, self.opt_g, self.opt_d, job.step, self.device)
        _broadcast_parameters(self.family)

        self.source = BatchSource(self.family.data_kind, job.prepared_dir, seed=c.seed * 7919 + rank,
                                  shard=(rank, world_size), augment=_build_augment(job.augment))
        # Fixed sample batch, drawn without moving the sampler (so grids never change training).
        saved = self.source.state_dict()
        self.sample_batch = self.source.next(8, self.device, c.channels_last)
        self.source.load_state_dict(saved)

        _seed_all(c.seed * 1009 + rank)  # per-worker training randomness (noise, targets)
        self.nimg, self.iteration, self.tick_index = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.flops_per_image: dict[bool, float] = {}   # keyed by "this iteration trains G"

    # ---- checkpoints ------------------------------------------------------------------------
    def rank_state(self) -> dict:
        """What differs between workers: this rank's batch sampler and RNG streams."""
        return {"source": self.source.state_dict(), "rng": capture_rng()}

    def gather_rank_states(self) -> list[dict]:
        """Every rank's `rank_state`, in rank order. Collective when several workers train in a
        process group: all ranks call it at the same point, so rank 0 can put them all into the
        one checkpoint and a resumed run restores each rank exactly."""
        if not _distributed():
            return [self.rank_state()]
        import torch.distributed as dist

        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, self.rank_state())
        return states

    def state_dict(self, rank_states: list[dict] | None = None) -> dict:
        """The full checkpoint. `rank_states` (gather_rank_states) adds the other ranks' sampler
        and RNG state as `peer_ranks`; without it only this rank's is saved (one worker)."""
        state = {
            "family": self.job.family,
            "config": self.job.resolved_config(),
            "spec": self.spec.to_dict(),
            "model": self.family.state_dict(),
            "ema": {name: m.state_dict() for name, m in self.ema.items()},
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaler; kept for format stability
            "family_extra": self.family.extra_state(),
            "counters": {"nimg": self.nimg, "iteration": self.iteration, "tick_index": self.tick_index},
            "history": self.history,
            "source": self.source.state_dict(),
            "rng": capture_rng(),
            "reporter": self.reporter.state_dict(),
            "world_size": self.world,
        }
        if rank_states is not None and len(rank_states) > 1:
            state["peer_ranks"] = rank_states[1:]
        return state

    def _own_rank_state(self, state: dict) -> dict | None:
        """This rank's sampler and RNG state in checkpoint `state`: top level for rank 0, `peer_ranks`
        for the others; None when the checkpoint holds none for it (saved by another version)."""
        if self.rank == 0:
            return {"source": state["source"], "rng": state["rng"]}
        peers = state.get("peer_ranks") or []
        return peers[self.rank - 1] if self.rank - 1 < len(peers) else None

    def load_state_dict(self, state: dict) -> None:
        if state["family"] != self.job.family:
            raise TrainingError(f"checkpoint is for family '{state['family']}', not '{self.job.family}'.")
        DataSpec.from_dict(state["spec"]).require_same(self.spec, "checkpoint", "the prepared data",
                                                       "Train a new run for this dataset.", TrainingError)
        self.family.load_state_dict(state["model"])
        for name, m in self.ema.items():
            m.load_state_dict(state["ema"][name])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.family.load_extra_state(state["family_extra"])
        self.nimg = int(state["counters"]["nimg"])
        self.iteration = int(state["counters"]["iteration"])
        self.tick_index = int(state["counters"]["tick_index"])
        self.history = list(state["history"])
        own = self._own_rank_state(state) if int(state.get("world_size", 1)) == self.world else None
        if own is not None:   # otherwise shards changed (or were not saved): the fresh seeding stands
            self.source.load_state_dict(own["source"])
            restore_rng(own["rng"])
        self.reporter.load_state_dict(state.get("reporter") or {})

    def resume(self, checkpoint: Path | dict) -> None:
        self.load_state_dict(checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint))

    # ---- outputs ----------------------------------------------------------------------------
    def _sample_rows(self) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SAMPLE_SEED)
            self.family.set_progress(self.nimg, self.total_nimg)
            return self.family.sample(self.sample_batch, self.ema)

    def _grid_text(self) -> dict:
        title, columns = sample_grid_text(self.job.family, self.nimg, self.sample_batch, list(self.spec.classes))
        return {"title": title, "columns": columns}

    def _export(self) -> dict:
        return {"format": 1, "family": self.job.family, "config": self.job.resolved_config(),
                "spec": self.spec.to_dict(),
                "generators": {name: m.state_dict() for name, m in self.ema.items()},
                "family_extra": self.family.extra_state(), "nimg": self.nimg}

    def _write_final(self, metrics: dict[str, float], rank_states: list[dict]) -> None:
        from pipeline.training.plots import plot_loss_curves

        with atomic_dir(self.job.out_dir) as tmp:
            torch.save(self._export(), tmp / EXPORT_FILE)
            save_checkpoint(self.state_dict(rank_states), tmp)
            save_grid(self._sample_rows(), tmp / "samples.png", **self._grid_text())
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            plot_loss_curves(self.history, tmp / "loss_curves.png", title=self.job.family)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        c, job = self.job.common, self.job
        self.reporter.on_start(job, self.nimg)
        acc: dict[str, float] = defaultdict(float)
        acc_n: dict[str, int] = defaultdict(int)
        tick_start, tick_start_nimg, tick_flops = time.perf_counter(), self.nimg, 0.0
        metrics: dict[str, float] = dict(self.history[-1]) if self.history else {}
        self.family.set_progress(self.nimg, self.total_nimg)
        phase = self.family.optimizer_phase()
        while self.nimg < self.total_nimg:
            self.family.set_progress(self.nimg, self.total_nimg)
            if self.family.optimizer_phase() != phase:
                # A new phase (ProGAN: a resolution is added): fresh Adam moments, as the family asks.
                phase = self.family.optimizer_phase()
                self.opt_g.state.clear()
                self.opt_d.state.clear()
            lr_g, lr_d = self.sched_g.apply(self.nimg), self.sched_d.apply(self.nimg)
            bs = self.family.batch_size(c.batch_size)
            batch = self.source.next(bs, self.device, c.channels_last)
            train_g = (self.iteration + 1) % self.family.n_critic == 0 and self.family.trains_generator()
            if train_g not in self.flops_per_image:
                # Counted once per kind of iteration (D only / D + G); dispatch-level, exact ops.
                with CountFlops() as counter:
                    stats = self.step(batch, train_g)
                self.flops_per_image[train_g] = counter.total / bs
            else:
                stats = self.step(batch, train_g)
            for name, m in self.ema.items():
                if train_g:
                    update_ema(m, self.family.generators()[name], c.ema_decay)
            for k, v in stats.items():
                acc[k] += v
                acc_n[k] += 1
            self.nimg += bs * self.world
            self.iteration += 1
            tick_flops += self.flops_per_image[train_g] * bs * self.world

            if self.nimg >= (self.tick_index + 1) * self.tick_nimg or self.nimg >= self.total_nimg:
                elapsed = max(time.perf_counter() - tick_start, 1e-9)
                metrics = {k: acc[k] / acc_n[k] for k in acc}
                metrics.update({"lr/G": lr_g, "lr/D": lr_d, "kimg": self.nimg / 1000,
                                "img_per_s": (self.nimg - tick_start_nimg) / elapsed,
                                "gflop_per_s": tick_flops / elapsed / 1e9})
                metrics.update({f"progress/{k}": v for k, v in self.family.progress_metrics().items()})
                self.tick_index += 1
                self.history.append({"nimg": self.nimg, **metrics})
                self.reporter.on_tick(self.nimg, metrics)
                acc.clear()
                acc_n.clear()
                if self.tick_index % c.snapshot_ticks == 0 and self.nimg < self.total_nimg:
                    self._snapshot(metrics)
                tick_start, tick_start_nimg, tick_flops = time.perf_counter(), self.nimg, 0.0

        out_dir = None
        rank_states = self.gather_rank_states()
        if self.rank == 0:
            self._write_final(metrics, rank_states)
            out_dir = job.out_dir
        self.reporter.on_end(out_dir, metrics, self.export_module() if self.rank == 0 else None)
        return metrics

    def export_module(self) -> torch.nn.Module:
        return self.family.export_generator(self.ema)

    def _snapshot(self, metrics: dict[str, float]) -> None:
        ckpt_dir = grid_path = None
        work = Path(self.job.work_dir)
        if self.rank == 0:
            grid_path = save_grid(self._sample_rows(), work / "samples" / f"grid-{self.nimg:09d}.png",
                                  **self._grid_text())
        rank_states = self.gather_rank_states()
        if self.rank == 0:
            ckpt_dir = work / "checkpoints" / f"checkpoint-{self.nimg:09d}"
            save_checkpoint(self.state_dict(rank_states), ckpt_dir)
            for old in sorted((work / "checkpoints").glob("checkpoint-*")):
                if old != ckpt_dir:
                    shutil.rmtree(old, ignore_errors=True)
        self.reporter.on_snapshot(self.nimg, metrics, ckpt_dir, grid_path)


def train(job: TrainJob, reporter: Reporter | None = None, resume_from: Path | dict | None = None,
          rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu") -> dict[str, float]:
    """Train `job` on this process (one worker). Returns the last tick's metrics."""
    trainer = Trainer(job, reporter, rank, world_size, device)
    if resume_from is not None:
        trainer.resume(resume_from)
    try:
        return trainer.run()
    except TrainingError as err:
        ckpts = sorted((Path(job.work_dir) / "checkpoints").glob("checkpoint-*"))
        where = f" Last good checkpoint: {ckpts[-1]}." if ckpts else " No checkpoint was written yet."
        raise TrainingError(f"{job.family} at kimg {trainer.nimg / 1000:.3f}: {err}{where}") from None


def latest_local_checkpoint(work_dir: Path) -> Path | None:
    ckpts = sorted((Path(work_dir) / "checkpoints").glob("checkpoint-*"))
    return ckpts[-1] if ckpts else None


def load_trained(model_dir: Path, device: str | torch.device = "cpu") -> GANFamily:
    """Rebuild a trained family from models/<family>/generator_ema.pt with its EMA generator weights."""
    from pipeline.config import from_dict
    from pipeline.models import family_class

    path = Path(model_dir) / EXPORT_FILE
    if not path.exists():
        raise TrainingError(f"no trained model at {path}. Run `pipeline train --stage <family>` (or dvc repro) first.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        cls = family_class(state["family"])
        spec = DataSpec.from_dict(state["spec"])
        cfg = from_dict(cls.Config, state["config"][state["family"]], f"train.{state['family']}")
        family = cls(cfg, spec)
        gens = family.generators()
        for name, sd in state["generators"].items():
            gens[name].load_state_dict(sd)
        family.load_extra_state(state.get("family_extra") or {})
        family.set_progress(int(state["nimg"]), int(state["nimg"]))
    except TrainingError:
        raise
    except Exception as err:
        raise TrainingError(f"model file {path} is corrupt or from an incompatible version "
                            f"({type(err).__name__}: {str(err)[:200]}). Retrain the model.") from None
    return family.to(device).eval()


__all__ = ["Reporter", "PrintReporter", "TrainJob", "Trainer", "train", "load_trained", "read_spec",
           "latest_local_checkpoint", "EXPORT_FILE"]
