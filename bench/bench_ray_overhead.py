"""What Ray Train costs on top of the plain engine, for a tiny CycleGAN.

    .venv/bin/python bench/bench_ray_overhead.py [--kimg 0.4] [--cpus 2]

Measures, on a local Ray instance started once (its start-up is reported separately):
  - fit() fixed overhead: wall time of `launch_training` minus the same job trained in-process
    (same MLflow logging, 1 worker);
  - per-report overhead: time spent inside ray.train.report per call (checkpoint copy included),
    measured in the worker;
  - training throughput (img/s, median over ticks after the first) with 1 and 2 workers.
Everything (data, MLflow store, Ray storage) lives in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "NO_ALBUMENTATIONS_UPDATE": "1"}.items():
    os.environ.setdefault(key, value)

TINY_CYCLEGAN = {"base_channels": 8, "d_base_channels": 8, "n_blocks": 1, "n_down": 1, "d_layers": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kimg", type=float, default=0.4)
    ap.add_argument("--batch", type=int, default=8, help="per worker")
    ap.add_argument("--cpus", type=int, default=2, help="local Ray CPUs (= max workers at 1 CPU each)")
    args = ap.parse_args()

    import ray
    import torch
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.config import Params, PrepareParams, from_dict, train_params
    from pipeline.data.prepare import run_prepare
    from pipeline.training.loop import TrainJob, train
    from pipeline.training.ray_train import launch_training

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    data = root / "prepared"
    run_prepare(from_dict(PrepareParams, {"resolution": 16, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 12, "normal": 24, "paired": 2}}, "prepare"), data)

    def params(workers: int, snapshot_ticks: int) -> Params:
        return from_dict(Params, {
            "train": {"common": {"kimg": args.kimg, "batch_size": args.batch, "tick_kimg": args.kimg / 8,
                                 "snapshot_ticks": snapshot_ticks},
                      "cyclegan": TINY_CYCLEGAN},
            "ray": {"num_workers": workers, "cpus_per_worker": 1.0, "storage_path": str(root / "ray")}}, "params")

    def tick_rate(run_id: str) -> float:
        hist = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "img_per_s")
        rates = [m.value for m in sorted(hist, key=lambda m: m.step)][1:] or [m.value for m in hist]
        return statistics.median(rates)

    torch.set_num_threads(1)
    # In-process reference: the same job, same logger, no Ray.
    common, cfg = train_params(params(1, 2), "cyclegan")
    job = TrainJob("cyclegan", common, cfg, data, root / "inproc" / "out", root / "inproc" / "work")
    plan = tracking.plan_training_run("cyclegan", "inproc", "inproc", job.resolved_config(), data, None, None)
    t0 = time.perf_counter()
    train(job, tracking.TrainRunLogger(plan))
    t_engine = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             log_to_driver=False)
    t_init = time.perf_counter() - t0

    rows = []
    try:
        one = launch_training(params(1, 2), "cyclegan", data, root / "m1" / "cyclegan", {}, False, "w1", None)
        rows.append(("ray.init (local, once per process)", f"{t_init:.1f} s"))
        rows.append(("in-process engine, same job (1 worker)", f"{t_engine:.1f} s"))
        rows.append(("fit() wall, 1 worker", f"{one['seconds']:.1f} s"))
        rows.append(("fit() fixed overhead (wall - engine)", f"{one['seconds'] - t_engine:.1f} s"))
        rows.append(("per-report overhead (report + checkpoint copy)",
                     f"{1000 * one['ray_report_seconds'] / one['ray_reports']:.0f} ms x {one['ray_reports']} reports"))
        rows.append(("img/s, 1 worker (median tick)", f"{tick_rate(one['mlflow_run_id']):.0f}"))
        if args.cpus >= 2:
            two = launch_training(params(2, 2), "cyclegan", data, root / "m2" / "cyclegan", {}, False, "w2", None)
            rows.append(("fit() wall, 2 workers", f"{two['seconds']:.1f} s"))
            rows.append(("per-report overhead, 2 workers",
                         f"{1000 * two['ray_report_seconds'] / two['ray_reports']:.0f} ms x {two['ray_reports']} reports"))
            rows.append(("img/s, 2 workers (median tick)", f"{tick_rate(two['mlflow_run_id']):.0f}"))
    finally:
        ray.shutdown()

    print(f"\nRay Train overhead, tiny CycleGAN 16 px, batch {args.batch}/worker, {args.kimg} kimg, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(f"\nreproduce: .venv/bin/python bench/bench_ray_overhead.py --kimg {args.kimg} --batch {args.batch} "
          f"--cpus {args.cpus}")
    print(f"(scratch files in {root})", file=sys.stderr)


if __name__ == "__main__":
    main()
