"""Ray Train at the edge of the engine: the one place that launches Ray Train (`launch_training`,
a `TorchTrainer` whose workers run `_worker_loop`).

`launch_training` (driver) takes the run's specification (`TrainJob.from_params`, built once by
the caller) and the Ray resources, picks the run name (run_folders.py), checks MLflow (before Ray
starts), starts or joins Ray (ray_cluster.py) and runs a `TorchTrainer`. Each worker runs the
plain engine (`pipeline.training.loop.Trainer`) with a `RayReporter` (ray_reporter.py):

    worker rank r of N                          driver
    ----------------------------------------    ------------------------------------------
    Trainer(job, RayReporter, rank=r, world=N)  TorchTrainer(_worker_loop, ScalingConfig,
      reads its shard (r, N) of the Parquet       RunConfig(name, storage_path, FailureConfig))
      gradients all-reduced in step.py          fit() -> latest checkpoint = final outputs
      every snapshot_ticks ticks:               delivery.py copies them to out_dir
        ray.train.report(metrics, checkpoint)     (models/<family>/; atomic: a partial copy is
        (all ranks report; rank 0 attaches       never seen)
        checkpoint.pt, which holds every
        rank's sampler and RNG state)
      at the end: rank 0 writes the final files,
        reports them as the last checkpoint

A restarted worker group (FailureConfig retry) and `--resume` (a new fit() with the same
RunConfig name: Ray restores its checkpoint list) both start from `ray.train.get_checkpoint()`,
the engine's full state with each rank's own batch sampler and RNG state, so the result equals an
uninterrupted run bit for bit (CPU, fixed seed, same number of workers). Only rank 0 talks to
MLflow (pipeline.tracking.TrainRunLogger); its run id is part of the checkpoint, so a restarted or
resumed run keeps logging into the same MLflow run.

Final files go through Ray storage rather than being written by rank 0 into out_dir directly,
so a run on a remote cluster still delivers models/<family>/ to the machine that launched it.

Console: the driver shows one progress display that rank 0 feeds (ray_progress.py). Ray Train's
own logging is kept to errors unless verbose (RunConfig.logging_config); a worker that fails with
anything but a PipelineError sends its full traceback with the exception, which the driver
prints; failures.py turns the failure into the user's message.
"""

from __future__ import annotations

import functools
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

from pipeline import console
from pipeline.cluster import workers_inherit_env
from pipeline.config import RayParams
from pipeline.errors import PipelineError, TrainingError
from pipeline.fsutil import ensure_writable_parent
from pipeline.training.delivery import deliver
from pipeline.training.failures import failure_message, with_traceback_text, worker_tracebacks
from pipeline.training.loop import Reporter, Trainer, TrainJob
from pipeline.training.ray_cluster import (FixedClusterScalingPolicy, InheritEnvController, NoDatasetsCallback,
                                           SingleWorkerConfig, check_resources, connect_for, gather_node_ids)
from pipeline.training.ray_progress import ProgressWatch
from pipeline.training.ray_reporter import RayReporter
from pipeline.training.run_folders import choose_run_name, storage_uri


@dataclass
class WorkerConfig:
    """Everything a worker needs, built by the driver (plain data, pickled to the workers)."""

    job: TrainJob
    use_gpu: bool
    run_name: str
    launch_id: str
    tracking: Any = None            # pipeline.tracking.TrainTracking, or None: no MLflow
    cluster_nodes: int = 1
    progress_key: str | None = None  # rank 0 publishes each tick under this GCS key (None: not at all)
    wrap_reporter: Callable[[Reporter], Reporter] | None = None   # see launch_training


def _worker_loop(config: dict) -> None:
    """Per-worker function run by TorchTrainer (process group already set up: gloo / nccl; none for
    one CPU worker, ray_cluster.SingleWorkerConfig)."""
    wc: WorkerConfig = config["worker"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    nodes = gather_node_ids(world)

    inner = None
    if rank == 0 and wc.tracking is not None:
        from pipeline.tracking import TrainRunLogger

        inner = TrainRunLogger(wc.tracking, extra_tags={
            "ray.num_workers": world, "ray.num_nodes": len(set(nodes)), "ray.cluster_nodes": wc.cluster_nodes,
            "ray.device": "cuda" if wc.use_gpu else "cpu"})
    reporter: Reporter = RayReporter(rank, inner, final_metrics={"worker_nodes": nodes, "world_size": world},
                                     run_tag=wc.launch_id[:8], progress_key=wc.progress_key)
    if wc.wrap_reporter is not None:
        reporter = wc.wrap_reporter(reporter)
    device = ray.train.torch.get_device() if wc.use_gpu else torch.device("cpu")

    work = Path(tempfile.mkdtemp(prefix=f"pipeline-{wc.run_name}-rank{rank}-"))
    try:
        job = replace(wc.job, out_dir=work / "final" / wc.job.family, work_dir=work / "work")
        trainer = Trainer(job, reporter, rank=rank, world_size=world, device=device)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.resume(Path(directory))
        trainer.run()
    except PipelineError:
        raise                      # a clear message; the driver shows it as is
    except Exception as err:
        # The whole traceback rides on the exception to the driver (failures.py says why not stderr).
        raise with_traceback_text(err, traceback.format_exc())
    finally:
        shutil.rmtree(work, ignore_errors=True)


class PipelineTorchTrainer(TorchTrainer):
    """TorchTrainer with less start-up per fit() (issue 14: each item is one Python process fewer
    or a prestarted one instead of a fresh one, seconds each on a small machine):

    - no PlacementGroupCleaner, a detached actor each fit() starts to remove the run's placement
      group should the Train controller die while the driver lives on. Besides its process, it
      asks the State API, which needs the Ray dashboard (off here), so it logs a warning every
      health-check interval (the 65 "Failed to query Ray Train Controller actor state" lines of
      issue 14) or, with several Ray instances on the machine, its thread dies with a traceback;
      and our driver is a short-lived CLI process: the job's placement groups go when it exits.
    - no DatasetManager actor when no Ray Dataset is given (ray_cluster.NoDatasetsCallback).
    - a controller that does not import torch or the engine: launch_training binds the worker's
      config into the train function instead of train_loop_config, and one CPU worker gets no
      process group (ray_cluster.SingleWorkerConfig) instead of TorchConfig.
    - when the nodes already have the job's environment (pipeline.cluster.workers_inherit_env):
      the controller and the workers without runtime_envs, and no autoscaler requests
      (`_initialize_and_run_controller`).
    If Ray renames a callback these filters keep it (and only the cost comes back).
    """

    inherit_env = False   # launch_training sets it from pipeline.cluster.workers_inherit_env()

    def _create_default_callbacks(self):
        callbacks = []
        for cb in super()._create_default_callbacks():
            name = type(cb).__name__
            if name == "PlacementGroupCleanerCallback":
                continue
            if name == "DatasetsCallback" and not self.datasets:
                cb = NoDatasetsCallback()         # no DatasetManager actor (ray_cluster.py)
            callbacks.append(cb)
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        """Ray 2.60's own method (data_parallel_trainer.py), minus the controller's runtime_env
        (Ray Train's env vars copied from the driver, and RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0,
        which pipeline/environment.py sets everywhere) and with InheritEnvController, whose workers
        carry no runtime_env either, and with FixedClusterScalingPolicy (no autoscaling
        coordinator actor). Why: with no runtime_env, Ray runs the controller and the workers in
        worker processes the node prestarted instead of starting fresh ones (ray_cluster.py).
        Only when the job itself has no runtime_env and every node has its environment, that is
        on a local Ray or a `cluster up` cluster, which no autoscaler grows
        (pipeline.cluster.workers_inherit_env); otherwise Ray Train's own method runs."""
        if not self.inherit_env:
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        policy = controller_init_kwargs["scaling_policy"]
        if type(policy) is FixedScalingPolicy:     # a local or `cluster up` cluster: no autoscaler
            controller_init_kwargs["scaling_policy"] = FixedClusterScalingPolicy(policy.scaling_config)
        controller_cls = ray.remote(
            num_cpus=0,
            label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
        )(InheritEnvController)
        controller = controller_cls.remote(**controller_init_kwargs)
        if threading.current_thread() is threading.main_thread():
            self._register_sigint_handler(controller)
        ray.get(controller.run.remote())
        return ray.get(controller.get_result.remote())


def launch_training(job: TrainJob, rp: RayParams, resume: bool, run_name: str | None,
                    dvc_stage: str | None, wrap_reporter: Callable[[Reporter], Reporter] | None = None) -> dict:
    """Train `job` (TrainJob.from_params) on Ray Train with the resources `rp` (RayParams.with_overrides);
    write job.out_dir (models/<family>/); log to MLflow. Returns a summary dict: run_name, run_dir,
    out_dir, metrics (last tick), mlflow_run_id, worker_nodes, world_size, seconds, ray (where it
    ran), ray_connect_s (starting or joining Ray). Prints only the progress display.

    wrap_reporter: called on every worker with its RayReporter, returns the Reporter the engine
    gets, to add behaviour around every rank's events (fault injection: tests/worker_hooks.py); it
    is pickled to the workers.
    """
    start = time.perf_counter()
    family, common = job.family, job.common
    data_dir, out_dir = Path(job.prepared_dir).resolve(), Path(job.out_dir).resolve()
    ensure_writable_parent(out_dir)   # fail now, not after training
    storage = storage_uri(rp.storage_path)
    run_name = choose_run_name(storage, family, run_name, resume)
    run_dir = f"{storage.rstrip('/')}/{run_name}"

    from pipeline import tracking

    # Before Ray starts: an unreachable tracking server fails here, not after minutes of training.
    launch_id = uuid.uuid4().hex
    plan = tracking.plan_training_run(family, run_name, launch_id, job.resolved_config(), data_dir,
                                      dvc_stage, common.register_model,
                                      tags={"ray.storage_path": storage, "ray.address": rp.address or "local"})

    started, where, ray_s = connect_for(rp)
    try:
        nodes = check_resources(rp)
        progress_key = f"train/{launch_id}"
        worker = WorkerConfig(job=job, use_gpu=rp.use_gpu, run_name=run_name, launch_id=launch_id, tracking=plan,
                              cluster_nodes=nodes, progress_key=progress_key, wrap_reporter=wrap_reporter)
        resources = {"CPU": rp.cpus_per_worker, **({"GPU": rp.gpus_per_worker} if rp.use_gpu else {})}
        # The worker's config is bound into the train function, which Ray Train hands the workers
        # through the object store, not passed as train_loop_config, which the Train controller
        # unpickles too (as part of its TrainRunContext): WorkerConfig holds the TrainJob, so that
        # would import the engine and torch in the controller, on the path to the workers' start.
        trainer = PipelineTorchTrainer(
            functools.partial(_worker_loop, {"worker": worker}),
            torch_config=SingleWorkerConfig() if rp.num_workers == 1 and not rp.use_gpu else None,
            scaling_config=ScalingConfig(num_workers=rp.num_workers, use_gpu=rp.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=common.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=rp.checkpoints_to_keep),
                                 logging_config=LoggingConfig(log_level="INFO" if console.verbose() else "ERROR")),
        )
        trainer.inherit_env = workers_inherit_env()
        label, failed = f"train {family}", None
        with console.progress(label, total=common.kimg, unit="kimg", precision=2) as bar:
            bar.update(note=f"starting {rp.num_workers} Ray Train worker(s)")
            watch = ProgressWatch(progress_key, bar, label)
            watch.start()
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as err:
                failed = err
            finally:
                watch.close()
        if failed is not None:
            for rank, text in worker_tracebacks(failed).items():
                sys.stderr.write(f"training worker rank {rank} failed:\n{text}")
            sys.stderr.flush()
            raise TrainingError(failure_message(failed, run_name, run_dir)) from None
        deliver(result, out_dir)
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


__all__ = ["launch_training", "WorkerConfig", "PipelineTorchTrainer"]
