"""The Ray cluster a training run uses: started or joined with the run's resources
(pipeline.cluster.connect, the one ray.init), checked to hold the workers before any waiting,
and, from inside the workers, which node each rank runs on."""

from __future__ import annotations

import time
from typing import Any

import ray

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
