"""Generation stage throughput vs a bare batched PyTorch loop, scaling in actors, driver memory.

    .venv/bin/python bench/bench_generate.py                      # tiny defectgan trained here
    .venv/bin/python bench/bench_generate.py --model-dir models/defectgan --data data/prepared
    .venv/bin/python bench/bench_generate.py --memory             # + peak RSS, 1k vs 10k images

Rows (all at --batch-size, which is the stage's generate.ray_batch_size):
  bare batched loop      one process, one torch thread, no Ray, no files, no seeds: synthesize on
                         batches of normal images already decoded to tensors, noise from the global
                         RNG. The raw generator ceiling, and the reference of the target (>= 0.9).
                         On a shared machine it moves: it runs --repeats times interleaved with the
                         in-process sampler, before and after the stage; medians.
  sampler, in process    what an actor does, without Ray: decode the normal PNGs, per-sample noise
                         streams (pipeline.models.noise), synthesize in COMPUTE_BATCH chunks,
                         encode image/mask/region PNGs.
  per-sample loop        the pre-issue-16 way: torch.manual_seed(sample seed) + synthesize on a
                         batch of 1, per sample (run on n / 20 samples), for comparison.
  stage, k actors        run_generate on local Ray (2 CPUs, already started), each actor one torch
                         thread: the driver's plan, actor pool, ordered stream, quality filter (off here),
                         ImageFolder + parquet writes, manifest and preview. Steady state: the
                         driver notes when each ordered batch arrives; img/s between the batches
                         that cross 10 % and 90 % of the images, so actor start-up, model loading
                         and the drain at the end stay out (bench_ray_overhead.py measures them).
                         Run for 1 actor and for 2 (up to the core count): "vs 1 actor / k" is the
                         scaling efficiency (1.00 = linear).
Two measures for the in-process rows: images per wall second and per CPU second of the process
(the CPU figure moves less with what else the shared machine runs). The stage rows are wall
only: its processes' CPU time cannot be read once Ray has ended an actor, and the driver's
consumption window does not bound the actors' work. The last line,
`stage_vs_batched_loop=<ratio>`, is the steady img/s of the stage with --actors actors (2 by
default: the cores of this machine) over the one-thread bare batched loop, at the same batch
size: the convention of the earlier figure (2-actor stage 163 vs one-thread loop 166 img/s).
Memory (--memory): each count runs run_generate in a fresh process (own local Ray) and reports
the driver's peak RSS; the stream is written as it arrives, so it should stay flat.
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

import pipeline  # noqa: F401,I001  (library environment defaults, pipeline/environment.py: before torch)
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


class Rate:
    """Images per wall second and per CPU second of this process (the CPU figure does not move with
    what else the shared machine runs)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self, images: int) -> tuple[float, float]:
        return (images / (time.perf_counter() - self.wall), images / (time.process_time() - self.cpu))


def _inputs(model_dir: Path, prepared: Path, n: int, seed: int):
    from pipeline.generation.placement import Placement
    from pipeline.generation.ray_generate import output_classes, read_normals
    from pipeline.generation.sampler import sample_seeds
    from pipeline.training.loop import load_trained

    torch.set_num_threads(1)
    family = load_trained(model_dir)
    spec = family.spec
    _, pool = read_normals(prepared, "train")
    classes = output_classes(family.class_conditional, spec.classes)
    idx = np.arange(n)
    labels = np.array([classes[i % len(classes)].synth for i in idx])
    return family, pool, idx, labels, sample_seeds(seed, idx), Placement("random", spec.resolution, 0.2, 0.5)


def bare_batched_loop(model_dir: Path, prepared: Path, n: int, batch_size: int, seed: int) -> tuple[float, float]:
    """img/s of synthesize(batch_size) on pre-decoded tensors, global RNG, one thread."""
    from pipeline.generation.placement import to_tensor
    from pipeline.generation.sampler import decode_png, to_unit

    family, pool, idx, labels, seeds, placement = _inputs(model_dir, prepared, n, seed)
    family.eval()
    decoded = np.stack([decode_png(pool[i].as_py(), family.spec.channels) for i in range(len(pool))])
    batches = [(to_unit(decoded[sl % len(pool)]), torch.from_numpy(labels[sl]),
                to_tensor(placement.regions(seeds[sl], sl, labels[sl]), "cpu"))
               for sl in (idx[s:s + batch_size] for s in range(0, n, batch_size))]
    rate = Rate()
    with torch.no_grad():
        for x, y, r in batches:
            family.synthesize(x, y, r)
    return rate.done(n)


def in_process_loops(model_dir: Path, prepared: Path, n: int, batch_size: int, seed: int
                     ) -> dict[str, tuple[float, float]]:
    """img/s of the actor's work without Ray (Sampler.generate_png), and of the old per-sample loop."""
    from pipeline.generation.sampler import Sampler, binary_masks, decode_png, encode_png, images_u8, to_unit
    from pipeline.generation.placement import to_tensor

    family, pool, idx, labels, seeds, placement = _inputs(model_dir, prepared, n, seed)
    sampler = Sampler(family, placement)
    normals = [pool[int(i) % len(pool)].as_py() for i in idx]
    rate = Rate()
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        sampler.generate_png(normals[sl], labels[sl], seeds[sl], idx[sl])
    in_process = rate.done(n)

    few = max(1, n // 20)
    rate = Rate()
    with torch.no_grad():
        for i in range(few):
            x = to_unit(decode_png(normals[i], family.spec.channels)[None])
            region = placement.regions(seeds[i:i + 1], idx[i:i + 1], labels[i:i + 1])
            torch.manual_seed(int(seeds[i]))
            img, mask = family.synthesize(x, torch.from_numpy(labels[i:i + 1]), to_tensor(region, "cpu"))
            encode_png(images_u8(img)[0]), encode_png(binary_masks(mask)[0] * 255), encode_png(region[0] * 255)
    per_sample = rate.done(few)
    return {"sampler, in process (actor's work)": in_process, "per-sample loop (before issue 16)": per_sample}


def stage(model_dir: Path, prepared: Path, out: Path, n: int, batch_size: int, actors: int, seed: int) -> dict:
    from pipeline.config import GenerateParams
    from pipeline.generation.ray_generate import run_generate

    per_class = max(1, n // 2)
    params = GenerateParams(per_class=per_class, ray_batch_size=batch_size, seed=seed, num_actors=actors,
                            cpus_per_actor=0.5, min_mask_fraction=0.0, max_mask_fraction=1.0)
    t0 = time.perf_counter()
    result = run_generate(params, "defectgan", model_dir, prepared, out, track=False)
    result["wall"] = time.perf_counter() - t0
    return result


def stage_steady(model_dir: Path, prepared: Path, out: Path, n: int, batch_size: int, actors: int,
                 seed: int) -> dict:
    """The stage's result plus its steady-state img/s (module doc), from the driver's batch times."""
    import pipeline.generation.ray_generate as rg

    arrivals: list[tuple[float, int]] = []
    take = rg._Selector.take

    def timed_take(self, batch):
        arrivals.append((time.perf_counter(), len(batch["index"])))
        return take(self, batch)

    rg._Selector.take = timed_take
    try:
        result = stage(model_dir, prepared, out, n, batch_size, actors, seed)
    finally:
        rg._Selector.take = take
    done = np.cumsum([rows for _, rows in arrivals])
    first = int(np.searchsorted(done, 0.1 * done[-1]))
    last = int(np.searchsorted(done, 0.9 * done[-1]))
    images = done[last] - done[first]
    result["steady"] = (images / max(arrivals[last][0] - arrivals[first][0], 1e-9), 0.0)
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
    ap.add_argument("--actors", type=int, default=2, help="most actors of the scaling rows (capped at the cores)")
    ap.add_argument("--repeats", type=int, default=1, help="bare/in-process runs before and after the stage")
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

        bare, in_process = [], []
        for _ in range(args.repeats):
            bare.append(bare_batched_loop(model_dir, prepared, args.n, args.batch_size, args.seed))
            in_process.append(in_process_loops(model_dir, prepared, args.n, args.batch_size, args.seed))
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            counts = sorted({1, min(args.actors, os.cpu_count() or 1)})
            stages = {k: stage_steady(model_dir, prepared, tmp / f"out{k}", args.n, args.batch_size, k, args.seed)
                      for k in counts}
        finally:
            ray.shutdown()
        for _ in range(args.repeats):
            bare.append(bare_batched_loop(model_dir, prepared, args.n, args.batch_size, args.seed))
            in_process.append(in_process_loops(model_dir, prepared, args.n, args.batch_size, args.seed))
        ref = tuple(float(np.median([b[j] for b in bare])) for j in (0, 1))     # (wall, CPU)
        one = stages[1]["steady"]
        large = stages[counts[-1]]

        print(f"\ngeneration throughput, {large['generated']} images, {large['resolution']} px, "
              f"batch {args.batch_size}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"| {'path':<40} | {'img/s':>7} | {'vs bare':>7} | {'img/CPU-s':>9} | {'vs bare':>7} | "
              f"{'wall vs 1 actor x k':>19} |")
        print(f"|{'-' * 42}|{'-' * 9}|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 21}|")

        def row(name, rates, scaling=""):
            cpu = f"{rates[1]:>9.1f} | {rates[1] / ref[1]:>7.2f}" if rates[1] else f"{'-':>9} | {'-':>7}"
            print(f"| {name:<40} | {rates[0]:>7.1f} | {rates[0] / ref[0]:>7.2f} | {cpu} | {scaling:>19} |")

        row("bare batched loop", ref)
        for name in in_process[0]:
            row(name, tuple(float(np.median([r[name][j] for r in in_process])) for j in (0, 1)))
        for k in counts:
            rates = stages[k]["steady"]
            row(f"stage, {k} actor{'s' if k > 1 else ''} x 0.5 CPU, steady", rates,
                f"{rates[0] / (k * one[0]):.2f}")
        for k in counts:
            r = stages[k]
            row(f"stage, {k} actor{'s' if k > 1 else ''}, start-up included", (r["generated"] / r["seconds"], 0))
        print(f"(bare batched loop, {len(bare)} runs: " + ", ".join(f"{w:.0f} img/s, {c:.0f} img/CPU-s" for w, c in bare)
              + "; stage: " + "; ".join(f"{k} actor(s) {stages[k]['generated']} images in "
                                        f"{stages[k]['seconds']:.1f} s, first batch after {stages[k]['startup_s']:.1f} s"
                                        for k in counts) + ")")
        ratio = stages[counts[-1]]["steady"][0] / ref[0]

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
                      f"({marginal / ref[0]:.2f} x the bare batched loop; start-up excluded)")

    print("\nreproduce: " + shlex.join([".venv/bin/python", "bench/bench_generate.py", *sys.argv[1:]]))
    print(f"stage_vs_batched_loop={ratio:.3f}")


if __name__ == "__main__":
    main()
