"""Ray Train at the edge of the engine: the only module that imports ray.train.

`launch_training` (driver) takes the run's specification (`TrainJob.from_params`, built once by
the caller) and the Ray resources, picks the run name, checks MLflow (before Ray starts), starts
or joins Ray and runs a `TorchTrainer`. Each worker runs the plain engine
(`pipeline.training.loop.Trainer`) with a `RayReporter`:

    worker rank r of N                          driver
    ----------------------------------------    ------------------------------------------
    Trainer(job, RayReporter, rank=r, world=N)  TorchTrainer(_worker_loop, ScalingConfig,
      reads its shard (r, N) of the Parquet       RunConfig(name, storage_path, FailureConfig))
      gradients all-reduced in step.py          fit() -> latest checkpoint = final outputs
      every snapshot_ticks ticks:               copies them to out_dir (models/<family>/)
        ray.train.report(metrics, checkpoint)     (atomic: a partial copy is never seen)
        (all ranks report: rank 0 the full
        checkpoint.pt, rank r its rank-r.pt)
      at the end: rank 0 writes the final files,
        reports them as the last checkpoint

A restarted worker group (FailureConfig retry) and `--resume` (a new fit() with the same
RunConfig name: Ray restores its checkpoint list) both start from `ray.train.get_checkpoint()`,
which holds the engine's full state (rank 0's checkpoint.pt) plus every other rank's own batch
sampler and RNG state (rank-<r>.pt; the engine's checkpoint has rank 0's only), so the result
equals an uninterrupted run bit for bit (CPU, fixed seed, same number of workers).
Only rank 0 talks to MLflow (pipeline.tracking.TrainRunLogger); its run id is part of the
checkpoint, so a restarted or resumed run keeps logging into the same MLflow run.

Final files go through Ray storage rather than being written by rank 0 into out_dir directly,
so a run on a remote cluster still delivers models/<family>/ to the machine that launched it.

Console: the driver shows one progress display (pipeline.console.progress: kimg done/total,
img/s, ETA, D and G loss). Rank 0 publishes each tick's figures in Ray's GCS key-value store
(`publish_progress`, a few hundred bytes per tick, no extra actor); a driver thread polls it. Ray
Train's own logging is kept to errors unless verbose (RunConfig.logging_config); a worker that
fails with anything but a PipelineError prints its full traceback, which reaches the driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import console
from pipeline.config import RayParams
from pipeline.errors import ParamsError, PipelineError, TrainingError
from pipeline.fsutil import atomic_dir, ensure_writable_parent
from pipeline.training.checkpoint import capture_rng, load_checkpoint, restore_rng
from pipeline.training.loop import EXPORT_FILE, Reporter, Trainer, TrainJob

# Test hook: when set, each worker writes <dir>/rank<r>.pid and appends "<pid> <nimg resumed from>"
# to <dir>/rank<r>.log per attempt; on its first attempt every rank waits after the first checkpoint
# until <dir>/release exists (or it is killed), so a test can kill a worker process at a known
# point; when <dir>/raise exists, every rank raises a RuntimeError (a bug, not a PipelineError)
# before training. Unset in normal use.
HOOK_ENV = "PIPELINE_TRAIN_TEST_HOOK_DIR"
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train V2's list of a run's checkpoints
PROGRESS_NAMESPACE = "defect-synth-progress"       # GCS key-value namespace of the live progress
LOSS_CURVES_TSV = "loss_curves.tsv"                 # per-tick losses, the DVC plot of a training
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


@dataclass
class WorkerConfig:
    """Everything a worker needs, built by the driver (plain data, pickled to the workers)."""

    job: TrainJob
    use_gpu: bool
    run_name: str
    launch_id: str
    tracking: Any = None            # pipeline.tracking.TrainTracking, or None: no MLflow
    cluster_nodes: int = 1
    hook_dir: str | None = None
    progress_key: str | None = None  # rank 0 publishes each tick under this GCS key (None: not at all)


class RayReporter(Reporter):
    """Reports every snapshot and the end to Ray Train from all ranks (rank 0 attaches the engine's
    checkpoint / final files, other ranks their own sampler and RNG state) and forwards everything
    to an inner reporter on rank 0 (MLflow). Never calls MLflow itself."""

    def __init__(self, rank: int, inner=None, final_metrics: dict | None = None,
                 hold_dir: str | None = None, run_tag: str = "", rank_state=None,
                 progress_key: str | None = None):
        self.rank, self.inner = rank, inner
        self.final_metrics = dict(final_metrics or {})
        self.hold_dir, self.run_tag = hold_dir, run_tag
        self.rank_state = rank_state      # ranks > 0: callable -> this rank's sampler + RNG state
        self.progress_key = progress_key if rank == 0 else None
        self.attempt = uuid.uuid4().hex[:8]   # a restarted worker group is a new attempt
        self.report_seconds, self.reports = 0.0, 0

    def on_start(self, job, resumed_nimg):
        if self.progress_key:
            publish_progress(self.progress_key, {"attempt": self.attempt, "nimg": resumed_nimg, "started": True})
        if self.inner is not None:
            self.inner.on_start(job, resumed_nimg)

    def on_tick(self, nimg, metrics):
        if self.progress_key:
            publish_progress(self.progress_key, {"attempt": self.attempt, "nimg": nimg, **progress_figures(metrics)})
        if self.inner is not None:
            self.inner.on_tick(nimg, metrics)

    def on_snapshot(self, nimg, metrics, checkpoint_dir, grid_path):
        if self.inner is not None:
            self.inner.on_snapshot(nimg, metrics, checkpoint_dir, grid_path)
        name = f"checkpoint-{nimg:09d}"
        if self.rank > 0 and self.rank_state is not None:
            # Rank 0's checkpoint.pt holds the model; each other rank adds its own sampler and RNG
            # state (Ray merges the ranks' folders), so a restart resumes every rank exactly.
            with tempfile.TemporaryDirectory(prefix="pipeline-rank-state-") as tmp:
                torch.save(self.rank_state(), Path(tmp) / rank_state_file(self.rank))
                self._report({**metrics, "nimg": nimg}, Path(tmp), name)
        else:
            self._report({**metrics, "nimg": nimg}, checkpoint_dir, name)
        if self.hold_dir is not None:
            _hold(Path(self.hold_dir), self.rank)
            self.hold_dir = None

    def on_end(self, out_dir, metrics, generator):
        if self.inner is not None:
            self.inner.on_end(out_dir, metrics, generator)
        final = {**metrics, **self.final_metrics, "final": 1,
                 "ray_reports": self.reports + 1, "ray_report_seconds": self.report_seconds}
        if self.inner is not None and getattr(self.inner, "run_id", None):
            final["mlflow_run_id"] = self.inner.run_id
        self._report(final, out_dir, f"final-{int(metrics.get('kimg', 0) * 1000):09d}-{self.run_tag}")

    def _report(self, metrics: dict, directory: Path | None, name: str) -> None:
        """Collective: every rank calls it; `directory` (None = nothing to add) goes to storage."""
        start = time.perf_counter()
        checkpoint = Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        self.report_seconds += time.perf_counter() - start
        self.reports += 1

    def state_dict(self):
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state):
        if self.inner is not None:
            self.inner.load_state_dict(state)


def rank_state_file(rank: int) -> str:
    return f"rank-{rank}.pt"


# --------------------------------------------------------------------------- live progress

def progress_figures(metrics: dict) -> dict[str, float]:
    """What the progress display shows of a tick: img/s and the D and G totals."""
    return {k: float(metrics[k]) for k in ("img_per_s", "D/loss", "G/loss") if k in metrics}


def publish_progress(key: str, figures: dict) -> None:
    """Rank 0: put this tick's figures where the driver polls them. Never fails training."""
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, json.dumps(figures), overwrite=True, namespace=PROGRESS_NAMESPACE)
    except Exception:  # noqa: BLE001 - progress is cosmetic; the run goes on without it
        pass


def progress_note(figures: dict) -> str:
    """`95 img/s · D 0.412 · G 2.1`."""
    parts = []
    if "img_per_s" in figures:
        parts.append(f"{figures['img_per_s']:.0f} img/s")
    parts += [f"{net} {figures[f'{net}/loss']:.3g}" for net in ("D", "G") if f"{net}/loss" in figures]
    return " · ".join(parts)


class ProgressWatch(threading.Thread):
    """Driver side: polls rank 0's figures and moves the progress display; says when Ray Train
    restarted the worker group (a new attempt), so a jump back in kimg is explained."""

    def __init__(self, key: str, bar: "console.Progress", label: str, poll_s: float = 0.5):
        super().__init__(daemon=True, name="train-progress")
        self.key, self.bar, self.label, self.poll_s = key, bar, label, poll_s
        self.stop = threading.Event()
        self.attempts: list[str] = []

    def run(self) -> None:
        from ray.experimental import internal_kv

        last = None
        while not self.stop.wait(self.poll_s):
            try:
                raw = internal_kv._internal_kv_get(self.key, namespace=PROGRESS_NAMESPACE)
            except Exception:  # noqa: BLE001 - Ray going down; nothing to show
                continue
            if raw is None or raw == last:
                continue
            last = raw
            self.show(json.loads(raw))

    def show(self, figures: dict) -> None:
        attempt = figures.get("attempt")
        if attempt not in self.attempts:
            if self.attempts:
                console.print_line(f"  {self.label}: Ray Train restarted the workers; resuming from "
                                   f"{figures.get('nimg', 0) / 1000:.3f} kimg")
            self.attempts.append(attempt)
        note = "workers started" if figures.get("started") else progress_note(figures)
        self.bar.update(completed=figures.get("nimg", 0) / 1000, note=note)

    def close(self) -> None:
        self.stop.set()
        self.join(2.0)
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_del(self.key, namespace=PROGRESS_NAMESPACE)
        except Exception:  # noqa: BLE001
            pass


def _rank_state(trainer: Trainer) -> dict:
    return {"rank": trainer.rank, "world_size": trainer.world, "nimg": trainer.nimg,
            "source": trainer.source.state_dict(), "rng": capture_rng()}


def _resume(trainer: Trainer, directory: Path) -> None:
    """Load rank 0's full state, then this rank's own sampler and RNG state when it was saved
    with the same world size (otherwise shards changed and the engine re-seeds them)."""
    state = load_checkpoint(directory)
    trainer.resume(state)
    own = directory / rank_state_file(trainer.rank)
    if trainer.rank > 0 and own.exists():
        mine = torch.load(own, map_location="cpu", weights_only=True)
        if mine["world_size"] == trainer.world and mine["nimg"] == trainer.nimg:
            trainer.source.load_state_dict(mine["source"])
            restore_rng(mine["rng"])


def _hook_started(hook_dir: Path, rank: int, nimg: int) -> None:
    (hook_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    with open(hook_dir / f"rank{rank}.log", "a") as fh:
        fh.write(f"{os.getpid()} {nimg}\n")


def _hold(hook_dir: Path, rank: int, limit_s: float = 300.0) -> None:
    (hook_dir / f"held-rank{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + limit_s
    while not (hook_dir / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _gather_node_ids(world: int) -> list[str]:
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    import torch.distributed as dist

    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _worker_loop(config: dict) -> None:
    """Per-worker function run by TorchTrainer (process group already set up: gloo / nccl)."""
    wc: WorkerConfig = config["worker"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    nodes = _gather_node_ids(world)

    inner = None
    if rank == 0 and wc.tracking is not None:
        from pipeline.tracking import TrainRunLogger

        inner = TrainRunLogger(wc.tracking, extra_tags={
            "ray.num_workers": world, "ray.num_nodes": len(set(nodes)), "ray.cluster_nodes": wc.cluster_nodes,
            "ray.device": "cuda" if wc.use_gpu else "cpu"})
    checkpoint = ray.train.get_checkpoint()
    reporter = RayReporter(rank, inner, final_metrics={"worker_nodes": nodes, "world_size": world},
                           hold_dir=wc.hook_dir if checkpoint is None else None, run_tag=wc.launch_id[:8],
                           progress_key=wc.progress_key)
    device = ray.train.torch.get_device() if wc.use_gpu else torch.device("cpu")

    work = Path(tempfile.mkdtemp(prefix=f"pipeline-{wc.run_name}-rank{rank}-"))
    try:
        job = replace(wc.job, out_dir=work / "final" / wc.job.family, work_dir=work / "work")
        trainer = Trainer(job, reporter, rank=rank, world_size=world, device=device)
        reporter.rank_state = lambda: _rank_state(trainer)
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                _resume(trainer, Path(directory))
        if wc.hook_dir:
            _hook_started(Path(wc.hook_dir), rank, trainer.nimg)
            if (Path(wc.hook_dir) / "raise").exists():
                raise RuntimeError("injected by the test hook: a worker bug")
        trainer.run()
    except PipelineError:
        raise                      # a clear message; the driver shows it as is
    except Exception:
        # Ray hands the driver at most 1000 characters of a worker's traceback: write it whole to
        # stderr, which reaches the driver through log_to_driver at every verbosity (not print():
        # Ray Train turns a worker's print into an INFO log record).
        sys.stderr.write(f"training worker rank {rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- driver side

def _storage(path: str) -> str:
    """RunConfig storage_path: URIs as given, local folders absolute (relative = current dir)."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _fs(storage: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def _run_folders(storage: str) -> dict[str, tuple[bool, float]]:
    """{run name: (has a checkpoint, mtime)} of the run folders in `storage`."""
    import pyarrow.fs

    fs, base = _fs(storage)
    if fs.get_file_info(base).type != pyarrow.fs.FileType.Directory:
        return {}
    runs = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        children = fs.get_file_info(pyarrow.fs.FileSelector(info.path))
        names = {c.base_name for c in children}
        has_ckpt = RUN_SNAPSHOT in names and any(n.startswith(("checkpoint-", "final-")) for n in names)
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        runs[info.base_name] = (has_ckpt, mtime)
    return runs


def choose_run_name(storage: str, family: str, run_name: str | None, resume: bool) -> str:
    """The Ray run (and MLflow run) name.

    Fresh runs: `run_name`, or `<family>-<YYYYmmdd-HHMMSS>`; an existing folder of that name is
    never resumed silently (error for a given name, a suffix for the default one).
    --resume: `run_name`, or the newest `<family>-*` run with a checkpoint; it must have one.
    """
    if run_name is not None and not _RUN_NAME.fullmatch(run_name):
        raise ParamsError(f"run name {run_name!r} may only contain letters, digits, '_', '-' and '.' "
                          "(starting with a letter or digit, at most 128 characters).")
    runs = _run_folders(storage)
    if resume:
        if run_name is None:
            mine = [(mtime, name) for name, (ok, mtime) in runs.items() if ok and name.startswith(f"{family}-")]
            if not mine:
                raise TrainingError(f"--resume: no {family} run with a checkpoint in {storage}. "
                                    f"Start one with `pipeline train --stage {family}`, or pass --run-name "
                                    "and --params matching the run to continue.")
            return max(mine)[1]
        if run_name not in runs or not runs[run_name][0]:
            what = "has no checkpoint yet" if run_name in runs else "does not exist"
            raise TrainingError(f"--resume: run '{run_name}' in {storage} {what}. Check --run-name (runs "
                                f"with checkpoints: {', '.join(sorted(n for n, (ok, _) in runs.items() if ok)) or 'none'}), "
                                "or train without --resume.")
        return run_name
    if run_name is not None:
        if run_name in runs:
            raise TrainingError(f"run '{run_name}' already exists in {storage}. Pass --resume to continue it, "
                                "choose another --run-name, or delete that folder to start over.")
        return run_name
    base = f"{family}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while name in runs:
        n += 1
        name = f"{base}-{n}"
    return name


class PipelineTorchTrainer(TorchTrainer):
    """TorchTrainer without Ray Train's PlacementGroupCleaner, a detached actor each fit() starts to
    remove the run's placement group should the Train controller die while the driver lives on.

    Why leave it out: it is one more Python process per fit() (seconds of start-up on a small
    machine); it asks the State API, which needs the Ray dashboard (off here), so it logs a warning
    every health-check interval (the 65 "Failed to query Ray Train Controller actor state" lines of
    issue 14) or, with several Ray instances on the machine, its thread dies with a traceback; and
    our driver is a short-lived CLI process: the job's placement groups go when it exits.
    If Ray renames the callback this filter keeps it (and only the cost comes back).
    """

    def _create_default_callbacks(self):
        return [cb for cb in super()._create_default_callbacks()
                if type(cb).__name__ != "PlacementGroupCleanerCallback"]


def _check_resources(rp: RayParams) -> int:
    """Fail now rather than wait forever for resources the cluster cannot offer. Returns #nodes."""
    total = ray.cluster_resources()
    need_cpu = rp.num_workers * rp.cpus_per_worker
    if total.get("CPU", 0) + 1e-9 < need_cpu:
        raise ParamsError(f"{rp.num_workers} workers x {rp.cpus_per_worker:g} CPUs need {need_cpu:g} CPUs; the Ray "
                          f"cluster has {total.get('CPU', 0):g}. Lower --num-workers or --cpus-per-worker "
                          "(fractions are allowed), or add nodes.")
    if rp.use_gpu and total.get("GPU", 0) + 1e-9 < rp.num_workers * rp.gpus_per_worker:
        raise ParamsError(f"--use-gpu with {rp.num_workers} workers needs {rp.num_workers * rp.gpus_per_worker:g} "
                          f"GPUs; the Ray cluster has {total.get('GPU', 0):g}. Use --no-gpu or fewer workers.")
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _failure_message(err: Exception, run_name: str, run_dir: str) -> str:
    """The user-facing reason of a failed fit(): a worker's PipelineError verbatim when there is one."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, exc in sorted(failures.items()):
        seen = exc
        while seen is not None:
            if isinstance(seen, PipelineError):
                return f"training failed on worker {rank}: {seen}"
            seen = getattr(seen, "cause", None) or seen.__cause__
    first = next(iter(sorted(failures.items())), None)
    why = f"worker {first[0]}: {type(first[1]).__name__}: {str(first[1])[-400:]}" if first else str(err)[-400:]
    return (f"training failed ({why}). The worker's full traceback is above. Checkpoints are in {run_dir}; "
            f"continue with `pipeline train --resume --run-name {run_name}` once the cause is fixed.")


def _deliver(result, out_dir: Path) -> Path:
    """Copy the final checkpoint (the engine's final files) to out_dir, atomically, with the
    per-tick loss curves as a TSV beside them (loss_curves.tsv, DVC's plot of the run)."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise TrainingError("training ended without a final checkpoint; see the worker log above.")
    with checkpoint.as_directory() as src:
        src = Path(src)
        if not (src / EXPORT_FILE).exists():
            raise TrainingError(f"the last checkpoint {checkpoint.path} holds no {EXPORT_FILE}; training did not "
                                "reach its end. Continue it with --resume.")
        with atomic_dir(out_dir) as tmp:
            for item in src.iterdir():
                if not item.name.startswith("."):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            history = load_checkpoint(tmp).get("history") or []
            (tmp / LOSS_CURVES_TSV).write_text(loss_curves_tsv(history))
    return out_dir


def loss_curves_tsv(history: list[dict]) -> str:
    """One row per tick: kimg, then every loss the family reports (`D/...`, `G/...`), in a fixed
    column order; a value a tick lacks is empty."""
    columns = sorted({k for row in history for k in row if k.startswith(("D/", "G/"))})
    lines = ["\t".join(["kimg", *columns])]
    for row in history:
        kimg = row.get("kimg", row.get("nimg", 0) / 1000)
        lines.append("\t".join([f"{kimg:.4g}", *(f"{row[c]:.6g}" if c in row else "" for c in columns)]))
    return "\n".join(lines) + "\n"


def launch_training(job: TrainJob, rp: RayParams, resume: bool, run_name: str | None,
                    dvc_stage: str | None) -> dict:
    """Train `job` (TrainJob.from_params) on Ray Train with the resources `rp` (RayParams.with_overrides);
    write job.out_dir (models/<family>/); log to MLflow. Returns a summary dict: run_name, run_dir,
    out_dir, metrics (last tick), mlflow_run_id, worker_nodes, world_size, seconds, ray (where it
    ran), ray_connect_s (starting or joining Ray). Prints only the progress display.
    """
    start = time.perf_counter()
    family, common = job.family, job.common
    data_dir, out_dir = Path(job.prepared_dir).resolve(), Path(job.out_dir).resolve()
    ensure_writable_parent(out_dir)   # fail now, not after training
    storage = _storage(rp.storage_path)
    run_name = choose_run_name(storage, family, run_name, resume)
    run_dir = f"{storage.rstrip('/')}/{run_name}"

    from pipeline import tracking

    # Before Ray starts: an unreachable tracking server fails here, not after minutes of training.
    launch_id = uuid.uuid4().hex
    plan = tracking.plan_training_run(family, run_name, launch_id, job.resolved_config(), data_dir,
                                      dvc_stage, common.register_model,
                                      tags={"ray.storage_path": storage, "ray.address": rp.address or "local"})

    from pipeline.cluster import connect

    t_connect = time.perf_counter()
    started, where = connect(rp.address, num_cpus=rp.num_cpus, use_gpu=rp.use_gpu,
                             object_store_mb=rp.object_store_mb, include_dashboard=rp.include_dashboard)
    ray_s = time.perf_counter() - t_connect
    try:
        nodes = _check_resources(rp)
        hook_dir = os.environ.get(HOOK_ENV) or None
        progress_key = f"train/{launch_id}"
        worker = WorkerConfig(job=job, use_gpu=rp.use_gpu, run_name=run_name, launch_id=launch_id, tracking=plan,
                              cluster_nodes=nodes, hook_dir=hook_dir, progress_key=progress_key)
        resources = {"CPU": rp.cpus_per_worker, **({"GPU": rp.gpus_per_worker} if rp.use_gpu else {})}
        trainer = PipelineTorchTrainer(
            _worker_loop,
            train_loop_config={"worker": worker},
            scaling_config=ScalingConfig(num_workers=rp.num_workers, use_gpu=rp.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=common.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=rp.checkpoints_to_keep),
                                 logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "ERROR")),
        )
        label = f"train {family}"
        with console.progress(label, total=common.kimg, unit="kimg", precision=2) as bar:
            bar.update(note=f"starting {rp.num_workers} Ray Train worker(s)")
            watch = ProgressWatch(progress_key, bar, label)
            watch.start()
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as err:
                raise TrainingError(_failure_message(err, run_name, run_dir)) from None
            finally:
                watch.close()
        _deliver(result, out_dir)
        final = dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()
    reserved = {"final", "mlflow_run_id", "worker_nodes", "world_size", "ray_reports", "ray_report_seconds"}
    summary = {"run_name": run_name, "run_dir": run_dir, "out_dir": str(out_dir),
               "metrics": {k: v for k, v in final.items() if k not in reserved},
               "mlflow_run_id": final.get("mlflow_run_id"), "worker_nodes": final.get("worker_nodes", []),
               "world_size": final.get("world_size"), "ray_reports": final.get("ray_reports"),
               "ray_report_seconds": final.get("ray_report_seconds"), "ray": where, "ray_connect_s": ray_s,
               "num_workers": rp.num_workers, "nodes": nodes, "resumed": resume,
               "seconds": time.perf_counter() - start}
    return summary


__all__ = ["launch_training", "choose_run_name", "RayReporter", "WorkerConfig", "HOOK_ENV",
           "loss_curves_tsv", "progress_note", "LOSS_CURVES_TSV"]
