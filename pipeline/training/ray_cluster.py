"""The Ray cluster a training run uses: started or joined with the run's resources
(pipeline.cluster.connect, the one ray.init), checked to hold the workers before any waiting,
from inside the workers, which node each rank runs on, and the Train controller that starts the
workers without a runtime_env when the nodes already have the job's environment, and the parts of
Ray Train's start-up a fixed local cluster without datasets does without (each one more process).

This module is what the controller process imports of the package (InheritEnvController is
pickled by reference): keep it light, no torch or engine import at module level.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import ray
from ray.train.backend import BackendConfig
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2._internal.execution.worker_group import WorkerGroup
from ray.train.v2._internal.execution.worker_group import worker_group as _worker_group_module

from pipeline.cluster import replaced_attributes
from pipeline.config import RayParams
from pipeline.errors import ParamsError


def connect_for(rp: RayParams) -> tuple[bool, str, float]:
    """Start or join Ray for `rp`: (whether this call started it, where it runs, seconds it took)."""
    from pipeline.cluster import connect

    start = time.perf_counter()
    started, where = connect(rp.address, num_cpus=rp.num_cpus, use_gpu=rp.use_gpu,
                             object_store_mb=rp.object_store_mb, include_dashboard=rp.include_dashboard)
    return started, where, time.perf_counter() - start


def check_resources(rp: RayParams) -> int:
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


def gather_node_ids(world: int) -> list[str]:
    """Inside a worker: the Ray node id of every rank, in rank order (collective)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    import torch.distributed as dist

    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


class InheritEnvWorkerGroup(WorkerGroup):
    """Ray Train's worker group, minus the environment variables Ray Train copies from the
    controller's environment into every worker's runtime_env (constants.get_env_vars_to_propagate).

    Used only when the job has no runtime_env (pipeline.cluster.workers_inherit_env): the controller
    then runs with the node's environment, which is where it would copy them from, and the workers
    start on the same kind of node with the same environment, so the copy changes no variable. But
    any runtime_env, even one that repeats the node's values, makes Ray start a fresh worker
    process instead of taking one the node prestarted (Python + `import ray`: seconds here).
    RunConfig.worker_runtime_env, when a caller sets one, is still applied.
    """

    @staticmethod
    def _get_worker_runtime_env(custom_runtime_env):
        return dict(custom_runtime_env or {})

    def _start_impl(self, worker_group_state_builder):
        with _sync_actor_in_a_new_process():
            return super()._start_impl(worker_group_state_builder)


_SYNC_ACTOR_ENV = {"env_vars": {"PIPELINE_TRAIN_SYNC_ACTOR": "1"}}


@contextlib.contextmanager
def _sync_actor_in_a_new_process() -> Iterator[None]:
    """While active, the worker group's SynchronizationActor (created just before the Train workers,
    needed at their first report) asks for a worker process of its own (a runtime_env makes Ray
    start one), so the Train worker, created right after it, gets the idle one the node prestarted
    instead of a fresh Python + `import ray` on the path to training."""
    original = getattr(_worker_group_module, "SynchronizationActor", None)

    class _InANewProcess:
        @staticmethod
        def options(**kwargs):
            return original.options(**kwargs, runtime_env=_SYNC_ACTOR_ENV)

    with replaced_attributes(_worker_group_module, {"SynchronizationActor": _InANewProcess}):
        yield


class InheritEnvController(TrainController):
    """Ray Train's controller with InheritEnvWorkerGroup (see there); started without a runtime_env
    by pipeline.training.ray_train.PipelineTorchTrainer when workers_inherit_env()."""

    worker_group_cls = InheritEnvWorkerGroup


class FixedClusterScalingPolicy(FixedScalingPolicy):
    """Ray Train's fixed scaling policy without its resource requests to the autoscaling
    coordinator, for a cluster no autoscaler grows (a local Ray, a `cluster up` cluster: the
    workers_inherit_env() path). The requests only tell an autoscaler what to add; the first one
    blocks the controller until the coordinator, a detached actor, has a process of its own that
    has imported Ray Data (seconds on a small machine), and that process is one of the idle ones
    the node prestarted, which the Train worker then cannot have."""

    def after_controller_start(self, train_run_context):
        pass

    def _maybe_send_resource_request(self):
        pass

    def _send_resource_request(self):
        pass


class NoDatasetsCallback(WorkerGroupCallback):
    """Stands in for Ray Train's DatasetsCallback when the trainer gets no Ray Datasets (ours reads
    its Parquet shard itself): that callback starts a DatasetManager actor per worker group (one
    more process, which imports Ray Data) and copies the DataContext to the workers, for
    `ray.train.get_dataset_shard`, which our workers never call. The TrainContext still needs a
    dataset_shard_provider argument: None."""

    def before_init_train_context(self, workers):
        return {"dataset_shard_provider": [None] * len(workers)}


@dataclass
class SingleWorkerConfig(BackendConfig):
    """The backend of a run with one CPU worker: no torch.distributed process group.

    One worker has nothing to all-reduce, broadcast or gather (step.py, loop.py and
    gather_node_ids skip their collectives when the world has one rank), so Ray Train's
    TorchConfig would only make the worker set up a gloo group of one, and make the Train
    controller import torch to unpickle TorchConfig (about 1 s on the path to the worker's
    start on 2 cores). Used by pipeline.training.ray_train for num_workers == 1 without GPU;
    with GPUs or several workers the TorchConfig stays. `backend` is only read by TorchTrainer,
    which fills in gloo / nccl where it is empty."""

    backend: str = "none"
