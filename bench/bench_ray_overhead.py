"""Ray's fixed cost per pipeline stage: local Ray started by the stage vs a running local head.

    .venv/bin/python bench/bench_ray_overhead.py [--kimg 0.2] [--repeats 1]

Every measured stage runs in a fresh Python process, as under `dvc repro`, in two set-ups:
  local   no cluster running: the stage starts its own Ray and stops it (`pipeline.cluster.connect`);
  joined  `pipeline cluster up --nodes 1` ran before: the stage joins that head.
Per set-up and stage:
  train     fixed overhead = wall time of `launch_training` (connect, fit(), delivery, shutdown)
            minus the same job trained in-process by the plain engine with the same MLflow logging;
            reported with its parts: connect (ray.init), the rest of fit();
  generate  fixed overhead = connect + time until the first generated batch reaches the driver
            (actor processes start and load the generator), against the whole stage's wall time.
Then, in fresh processes too, the seconds each import a Train worker needs takes (WORKER_IMPORTS):
the floor under "train: fixed overhead" that no Ray setting removes, since a worker is a new process.
To compare two versions on a shared machine, alternate runs of each (A B A B) with
PYTHONPATH=<a checkout of the other version>: the stages (and a local Ray's workers) import the
pipeline from there; the header names the commit measured and the load average.
Target of issue 14: <= 5 s per stage. Everything (data, MLflow store, Ray storage, cluster state)
lives in a temporary folder; the cluster is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_CYCLEGAN = {"base_channels": 8, "d_base_channels": 8, "n_blocks": 1, "d_layers": 2}
TARGET_S = 5.0
# What a fresh Ray Train worker process imports before and during its first tick, in the order it
# does: the in-process reference has all of them loaded already, so they count as fixed overhead.
# mlflow's sqlite store is what rank 0's MlflowClient loads for a sqlite:// tracking URI; torch's
# first optimizer imports torch._dynamo (torch._compile._disable_dynamo on add_param_group).
WORKER_IMPORTS = (("ray", "ray"), ("Ray Train worker API", "ray.train.v2.api.context"), ("torch", "torch"),
                  ("the engine (pipeline.training.loop)", "pipeline.training.loop"),
                  ("mlflow + its sqlite store", "mlflow.store.tracking.sqlalchemy_store"),
                  ("albumentations", "albumentations"), ("torch._dynamo (first optimizer)", "torch._dynamo"))


def _params(root: Path, kimg: float, batch: int):
    from pipeline.config import Params, from_dict

    return from_dict(Params, {
        "train": {"common": {"kimg": kimg, "batch_size": batch, "tick_kimg": kimg / 4, "snapshot_ticks": 2},
                  "cyclegan": TINY_CYCLEGAN},
        "generate": {"per_class": 8, "ray_batch_size": 8, "num_actors": 1, "cpus_per_actor": 0.5, "max_rounds": 1},
        "ray": {"num_workers": 1, "cpus_per_worker": 1.0, "storage_path": str(root / "ray")}}, "params")


def child(args) -> None:
    """One stage in this fresh process; prints its timings as JSON on the last line."""
    if args.child == "imports":
        import importlib

        seconds = {}
        for _, module in WORKER_IMPORTS:
            t0 = time.perf_counter()
            importlib.import_module(module)
            seconds[module] = time.perf_counter() - t0
        print(json.dumps(seconds))
        return
    root = Path(args.root)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    params = _params(root, args.kimg, args.batch)
    if args.child == "train":
        from pipeline.training.loop import TrainJob
        from pipeline.training.ray_train import launch_training

        t0 = time.perf_counter()
        job = TrainJob.from_params(params, "cyclegan", root / "prepared", Path(args.out))
        summary = launch_training(job, params.ray, False, args.name, None)
        out = {"wall": time.perf_counter() - t0, "connect": summary["ray_connect_s"], "ray": summary["ray"],
               "reports": summary["ray_reports"], "report_s": summary["ray_report_seconds"]}
    else:
        from pipeline.generation.ray_generate import run_generate

        t0 = time.perf_counter()
        result = run_generate(params.generate, "cyclegan", Path(args.models), root / "prepared", Path(args.out),
                              track=False)
        out = {"wall": time.perf_counter() - t0, "connect": result["ray_connect_s"],
               "first_batch": result["startup_s"], "ray": result["ray"]}
    print(json.dumps(out))


def _code_version(package) -> str:
    """The commit of the checkout `package` is imported from (PYTHONPATH picks another tree), + if edited."""
    where = Path(package.__file__).resolve().parent.parent
    git = ["git", "-C", str(where)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "pipeline"],
                           capture_output=True, text=True).stdout.strip()
    return f"{commit or '?'}{'+edits' if dirty else ''} ({where})"


def run_child(root: Path, env: dict, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--root", str(root), *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"child {' '.join(extra)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kimg", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="runs per set-up and stage (medians reported)")
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["train", "generate", "imports"], help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import pipeline  # (environment defaults)
    import ray
    import torch

    from pipeline import cluster, tracking
    from pipeline.config import PrepareParams, from_dict
    from pipeline.data.prepare import run_prepare
    from pipeline.training.loop import TrainJob, train

    load_start = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    run_prepare(from_dict(PrepareParams, {"resolution": 16, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 12, "normal": 24, "paired": 2}}, "prepare"),
        root / "prepared", quiet=True)

    # In-process reference: the same job and logger, no Ray (the training work itself).
    torch.set_num_threads(1)
    job = TrainJob.from_params(_params(root, args.kimg, args.batch), "cyclegan", root / "prepared", root / "inproc")
    job.work_dir = root / "inproc-work"
    engine = []
    for i in range(args.repeats):
        plan = tracking.plan_training_run("cyclegan", f"inproc{i}", f"inproc{i}", job.resolved_config(),
                                          root / "prepared", None, None)
        t0 = time.perf_counter()
        train(job, tracking.TrainRunLogger(plan))
        engine.append(time.perf_counter() - t0)
    t_engine = statistics.median(engine)

    state = root / "cluster.json"
    env = {**os.environ, "PIPELINE_CLUSTER_STATE": str(state), "PIPELINE_RAY_TEMP_DIR": str(root / "rt"),
           "OMP_NUM_THREADS": "1", "PIPELINE_PROGRESS": "off"}
    env.pop("RAY_ADDRESS", None)
    results: dict[str, dict[str, list]] = {}
    n = 0
    for setup in ("local", "joined"):
        if setup == "joined":
            t0 = time.perf_counter()
            os.environ.update(PIPELINE_CLUSTER_STATE=str(state), PIPELINE_RAY_TEMP_DIR=str(root / "rt"))
            cluster.cluster_up(nodes=1, cpus_per_node=os.cpu_count() or 2, object_store_mb=256, quiet=True)
            cluster_up_s = time.perf_counter() - t0
        try:
            for _ in range(args.repeats):
                n += 1
                tr = run_child(root, env, "--child", "train", "--kimg", str(args.kimg), "--batch", str(args.batch),
                               "--name", f"bench-{setup}-{n}", "--out", str(root / f"m{n}" / "cyclegan"))
                gen = run_child(root, env, "--child", "generate", "--models", str(root / f"m{n}" / "cyclegan"),
                                "--out", str(root / f"syn{n}"))
                r = results.setdefault(setup, {})
                for key, value in {"train_wall": tr["wall"], "train_connect": tr["connect"],
                                   "train_fixed": tr["wall"] - t_engine, "report_ms": 1000 * tr["report_s"] / tr["reports"],
                                   "gen_wall": gen["wall"], "gen_connect": gen["connect"],
                                   "gen_first": gen["first_batch"], "gen_fixed": gen["connect"] + gen["first_batch"]
                                   }.items():
                    r.setdefault(key, []).append(value)
                r["where"] = [tr["ray"]]
        finally:
            if setup == "joined":
                cluster.cluster_down(quiet=True)

    imports = [run_child(root, env, "--child", "imports") for _ in range(args.repeats)]
    import_s = {module: statistics.median(run[module] for run in imports) for _, module in WORKER_IMPORTS}

    med = {s: {k: statistics.median(v) for k, v in r.items() if k != "where"} for s, r in results.items()}
    rows = [
        ("train: in-process engine, same job (the work itself)", f"{t_engine:.1f} s", f"{t_engine:.1f} s"),
        ("train: stage wall (launch_training)", *(f"{med[s]['train_wall']:.1f} s" for s in ("local", "joined"))),
        ("train: connect (start or join Ray)", *(f"{med[s]['train_connect']:.1f} s" for s in ("local", "joined"))),
        ("train: fixed overhead (wall - engine)", *(f"{med[s]['train_fixed']:.1f} s" for s in ("local", "joined"))),
        ("train: per report (report + checkpoint copy)", *(f"{med[s]['report_ms']:.0f} ms" for s in ("local", "joined"))),
        ("generate: stage wall", *(f"{med[s]['gen_wall']:.1f} s" for s in ("local", "joined"))),
        ("generate: connect (start or join Ray)", *(f"{med[s]['gen_connect']:.1f} s" for s in ("local", "joined"))),
        ("generate: until the first batch (actors start, load the model)",
         *(f"{med[s]['gen_first']:.1f} s" for s in ("local", "joined"))),
        ("generate: fixed overhead (connect + first batch)", *(f"{med[s]['gen_fixed']:.1f} s" for s in ("local", "joined"))),
    ]
    print(f"\nRay fixed cost per stage, tiny CycleGAN 16 px, {args.kimg} kimg, batch {args.batch}, 1 worker; "
          f"{os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}; median of {args.repeats}; "
          f"`pipeline cluster up` itself took {cluster_up_s:.1f} s (once per session); code {_code_version(pipeline)}; "
          f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | local Ray per stage | joined `pipeline cluster up` head |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for name, local, joined in rows:
        print(f"| {name.ljust(width)} | {local} | {joined} |")
    print(f"\nWhat a fresh Python process imports for a Train worker (median of {args.repeats}; the in-process "
          "reference has these loaded, so they are inside 'train: fixed overhead'):")
    for name, module in WORKER_IMPORTS:
        print(f"  {name.ljust(38)} {import_s[module]:5.2f} s")
    print(f"  {'total'.ljust(38)} {sum(import_s.values()):5.2f} s")
    for setup in ("local", "joined"):
        worst = max(med[setup]["train_fixed"], med[setup]["gen_fixed"])
        verdict = "meets" if worst <= TARGET_S else "misses"
        print(f"{setup}: worst fixed overhead per stage {worst:.1f} s, {verdict} the {TARGET_S:g} s target")
    print(f"\nreproduce: .venv/bin/python bench/bench_ray_overhead.py --kimg {args.kimg} --batch {args.batch} "
          f"--repeats {args.repeats}")
    print(f"(scratch files in {root})", file=sys.stderr)


if __name__ == "__main__":
    main()
