"""Generation stage throughput vs a bare PyTorch loop, and driver memory as the count grows.

    .venv/bin/python bench/bench_generate.py                      # tiny defectgan trained here
    .venv/bin/python bench/bench_generate.py --model-dir models/defectgan --data data/prepared
    .venv/bin/python bench/bench_generate.py --memory             # + peak RSS, 1k vs 10k images

Rows:
  bare, per-sample   one process, no Ray, no files: decode the normal PNGs, then per sample
                     torch.manual_seed + synthesize(batch of 1) + encode image/mask/region PNGs:
                     exactly the work an actor does, the reference for the >= 0.8 goal.
  bare, batched      synthesize(batch_size) without per-sample seeds or PNG coding: the raw
                     generator ceiling (what per-sample reproducibility costs).
  stage              run_generate on local Ray (2 CPUs, already started): plan tasks, actor
                     pool, ordered stream, quality filter, ImageFolder + parquet writes,
                     manifest and preview, actor start-up and model loading included; the
                     "per actor" row divides by the actors (cores) it used.
Memory (--memory): each count runs run_generate in a fresh process (own local Ray) and reports
the driver's peak RSS; the stream is written as it arrives, so it should stay flat. The two
runs' times also give the marginal throughput (start-up cancels out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                     "NO_ALBUMENTATIONS_UPDATE": "1"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TINY_DEFECTGAN = dict(base_channels=8, max_channels=16, n_blocks=1, spade_hidden=8, d_base_channels=8,
                      d_layers=2, n_critic=1)


def make_tiny(root: Path, resolution: int) -> tuple[Path, Path]:
    """A small prepared dataset and a tiny defectgan trained for a few images (quick, not good)."""
    from pipeline.config import PrepareParams, TrainCommonParams, from_dict
    from pipeline.data.prepare import run_prepare
    from pipeline.models import family_config_class
    from pipeline.training.loop import TrainJob, train

    prepared = root / "prepared"
    run_prepare(from_dict(PrepareParams, {"resolution": resolution, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 8, "normal": 32, "paired": 0}}, "prepare"), prepared)
    common = from_dict(TrainCommonParams, {"kimg": 0.02, "batch_size": 4, "tick_kimg": 0.02,
                                           "snapshot_ticks": 100}, "train.common")
    job = TrainJob("defectgan", common, from_dict(family_config_class("defectgan"), TINY_DEFECTGAN,
                                                  "train.defectgan"), prepared, root / "models" / "defectgan",
                   root / "work")
    train(job)
    return prepared, root / "models" / "defectgan"


def bare_loops(model_dir: Path, prepared: Path, n: int, batch_size: int, seed: int) -> dict[str, float]:
    """img/s of the two bare single-process loops (torch threads = 1, like one actor)."""
    from pipeline.generation.placement import Placement
    from pipeline.generation.ray_generate import output_classes, read_normals
    from pipeline.generation.sampler import Sampler, decode_png, sample_seeds, to_unit
    from pipeline.training.loop import load_trained

    torch.set_num_threads(1)
    family = load_trained(model_dir)
    spec = family.spec
    _, pool = read_normals(prepared, "train")
    classes = output_classes(family.class_conditional, spec.classes)
    idx = np.arange(n)
    labels = np.array([classes[i % len(classes)].synth for i in idx])
    seeds = sample_seeds(seed, idx)
    placement = Placement("random", spec.resolution, 0.2, 0.5)
    sampler = Sampler(family, placement)

    t0 = time.perf_counter()
    normals = [pool[int(i) % len(pool)].as_py() for i in idx]
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        sampler.generate_png(normals[sl], labels[sl], seeds[sl], idx[sl])
    per_sample = n / (time.perf_counter() - t0)

    decoded = np.stack([decode_png(pool[i].as_py(), spec.channels) for i in range(len(pool))])
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, batch_size):
            sl = idx[s:s + batch_size]
            x = to_unit(decoded[sl % len(pool)])
            region = torch.from_numpy(placement.regions(seeds[sl], sl)).float().unsqueeze(1)
            family.synthesize(x, torch.from_numpy(labels[sl]), region)
    batched = n / (time.perf_counter() - t0)
    return {"bare, per-sample": per_sample, "bare, batched": batched}


def stage(model_dir: Path, prepared: Path, out: Path, n: int, batch_size: int, actors: int, seed: int) -> dict:
    from pipeline.config import GenerateParams
    from pipeline.generation.ray_generate import run_generate

    per_class = max(1, n // 2)
    params = GenerateParams(per_class=per_class, batch_size=batch_size, seed=seed, num_actors=actors,
                            cpus_per_actor=0.5, min_mask_fraction=0.0, max_mask_fraction=1.0)
    t0 = time.perf_counter()
    result = run_generate(params, "defectgan", model_dir, prepared, out, track=False)
    result["wall"] = time.perf_counter() - t0
    return result


def peak_rss_child(args) -> None:
    """--child-rss: run the stage once in this fresh process and print the driver's peak RSS."""
    import resource

    result = stage(Path(args.model_dir), Path(args.data), Path(args.out), args.n, args.batch_size,
                   args.actors, args.seed)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": result["generated"], "peak_rss_mb": rss_mb, "seconds": result["seconds"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000, help="images to generate (split over 2 classes)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=32, help="tiny model's resolution (no --model-dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", help="trained defectgan folder (default: train a tiny one)")
    ap.add_argument("--data", help="prepared data the model was trained on")
    ap.add_argument("--memory", action="store_true", help="also measure driver peak RSS for --memory-counts")
    ap.add_argument("--memory-counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        return peak_rss_child(args)

    import ray

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        tmp = Path(tmp)
        if args.model_dir:
            model_dir, prepared = Path(args.model_dir), Path(args.data)
        else:
            prepared, model_dir = make_tiny(tmp, args.resolution)

        bare = bare_loops(model_dir, prepared, args.n, args.batch_size, args.seed)
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            result = stage(model_dir, prepared, tmp / "out", args.n, args.batch_size, args.actors, args.seed)
        finally:
            ray.shutdown()
        stage_ips = result["generated"] / result["seconds"]
        ref = bare["bare, per-sample"]

        print(f"\ngeneration throughput, {result['generated']} images, {result['resolution']} px, "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"{'path':<34}{'img/s':>10}{'vs bare per-sample':>20}")
        for name, ips in bare.items():
            print(f"{name:<34}{ips:>10.1f}{ips / ref:>20.2f}")
        name = f"stage, {args.actors} actors x 0.5 CPU"
        print(f"{name:<34}{stage_ips:>10.1f}{stage_ips / ref:>20.2f}")
        per_actor = stage_ips / args.actors
        print(f"{'  per actor (per core used)':<34}{per_actor:>10.1f}{per_actor / ref:>20.2f}")
        print(f"(stage: generation + writing {result['seconds']:.1f} s, of which {result['startup_s']:.1f} s "
              f"until the first batch reached the driver (actor start-up, model load); wall with "
              f"checks {result['wall']:.1f} s; load average {os.getloadavg()[0]:.1f})")

        if args.memory:
            print(f"\n{'images':>8}{'driver peak RSS MB':>20}{'seconds':>10}")
            runs = []
            for count in args.memory_counts:
                cmd = [sys.executable, __file__, "--child-rss", "--n", str(count), "--batch-size",
                       str(args.batch_size), "--actors", str(args.actors), "--seed", str(args.seed),
                       "--model-dir", str(model_dir), "--data", str(prepared), "--out", str(tmp / f"mem{count}")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"memory run for {count} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.append(row)
                print(f"{row['n']:>8}{row['peak_rss_mb']:>20.0f}{row['seconds']:>10.1f}")
            if len(runs) >= 2 and runs[-1]["seconds"] > runs[0]["seconds"]:
                marginal = (runs[-1]["n"] - runs[0]["n"]) / (runs[-1]["seconds"] - runs[0]["seconds"])
                print(f"marginal stage throughput {runs[0]['n']} -> {runs[-1]['n']} images: {marginal:.1f} img/s "
                      f"({marginal / ref:.2f} x bare per-sample; start-up excluded)")

    print("\nreproduce: " + shlex.join([".venv/bin/python", "bench/bench_generate.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
