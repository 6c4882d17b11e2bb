"""Training-step throughput of every GAN family through the real engine step.

Each measurement runs `pipeline.training.step.AdversarialStep` with the family's own optimizers
(`family.make_optimizers()`) on in-memory random batches in the family's `data_kind` layout
(pipeline/models/base.py), exactly as `Trainer.run` calls it: one engine call per iteration, a G
update every `n_critic`-th call. Every (family, resolution, mode) runs in a fresh subprocess, so
peak RSS, thread pools and compile caches never leak from one row into the next.

    img/s     real images drawn per second, counted as the loop counts `nimg` (batch size per
              engine call). For n_critic > 1 (stargan, defectgan: 5) it is measured over whole
              cycles of n_critic calls (n_critic - 1 D-only calls + 1 D+G call), i.e. images
              shown to D per second.
    ms/iter   wall time per engine call, averaged over a cycle (median over the timed cycles).
    GFLOP/s   FLOPs of one cycle (CountFlops: torch's per-op formulas at dispatch level, counted
              once per mode in eager) / median cycle time; "% peak" against this CPU's peak for
              the mode's precision (--peak-fp32 / --peak-bf16, GFLOP/s for the whole machine).
    peak RSS  resource.getrusage(RUSAGE_SELF).ru_maxrss of the subprocess (MiB); on CUDA also
              torch.cuda.max_memory_allocated.

Modes are '+'-joined levers:
    fp32 | bf16    precision: fp32 eager, or bf16 autocast (the engine's StepConfig.precision)
    cl             channels_last networks and batches (TrainCommonParams.channels_last)
    fused          fused optimizer kernels (Adam(fused=True); foreach for optimizers without one)
    gemm           SmallMapConv2d's matrix-product route for large layers on tiny maps (StarGAN's
                   and Defect-GAN's D; pipeline/models/blocks.py); without it those layers run
                   through torch's convolution kernel, as in the reference code
    compile        StepConfig.compile_generators: torch.compile on the generators (D's gradient
                   penalty needs double backward, which compiled autograd does not support, so D
                   stays eager); compile time (2 cycles incl. compiling) reported separately
    tN             torch.set_num_threads(N) (default: torch's own, = cores)
The engine's defaults are the "fast" mode's levers minus whatever is flagged (see README.md).

    python bench/bench_train_step.py                               # full table, 64 and 128 px
    python bench/bench_train_step.py --reference --ablation        # issue's reference configs
    python bench/bench_train_step.py --quick                       # smoke test (~2 min)
    python bench/bench_train_step.py --side-by-side --no-main --repeats 3 --families stargan,defectgan,cyclegan
                                    # the reference code timed beside the project, A B A B
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILIES = ("dcgan", "pix2pix", "cyclegan", "stargan", "progan", "defectgan")
# Batch per engine call: the papers' settings where they are cheap enough to bench; stargan's
# 16 is the reference config; defectgan uses stargan's 16 so the two are compared like for like.
DEFAULT_BATCH = {"dcgan": 64, "pix2pix": 1, "cyclegan": 1, "stargan": 16, "progan": 16, "defectgan": 16}
CLASSES = ("normal", "crack", "spallation", "efflorescence", "exposed_bars", "corrosion")   # CODEBRIM
# Peaks for the "% peak" column (GFLOP/s, whole machine): the figures for this 2-core
# machine. --measure-peak prints what a large GEMM and a large channels_last 3x3 conv reach here
# (measured: GEMM fp32 203 / bf16 867; conv forward fp32 482 / bf16 894, so fp32 convs can beat
# the nominal 214); pass --peak-fp32 / --peak-bf16 to use other figures.
PEAK_FP32, PEAK_BF16 = 214.0, 780.0
FAST_MODE = "bf16+fused+gemm"
BASE_MODE = "fp32"


# --------------------------------------------------------------------------- modes

@dataclass(frozen=True)
class Mode:
    precision: str = "fp32"
    channels_last: bool = False
    fused: bool = False
    gemm: bool = False
    compile: bool = False
    threads: int = 0            # 0: torch's default
    separate: bool = False      # cyclegan: one network call per translation (the pre-batching path)

    @classmethod
    def parse(cls, text: str) -> "Mode":
        kw: dict = {}
        for tok in text.split("+"):
            if tok in ("fp32", "bf16"):
                kw["precision"] = tok
            elif tok == "cl":
                kw["channels_last"] = True
            elif tok == "fused":
                kw["fused"] = True
            elif tok == "gemm":
                kw["gemm"] = True
            elif tok == "compile":
                kw["compile"] = True
            elif tok == "sep":
                kw["separate"] = True
            elif tok == "spin":
                pass                    # OMP_WAIT_POLICY=ACTIVE, applied by the parent to the child's env
            elif tok.startswith("t") and tok[1:].isdigit():
                kw["threads"] = int(tok[1:])
            else:
                raise SystemExit(f"unknown mode token {tok!r} in {text!r} "
                                 "(known: fp32, bf16, cl, fused, gemm, compile, tN, sep, spin)")
        return cls(**kw)


# --------------------------------------------------------------------------- one measurement

def make_batch(kind: str, batch: int, res: int, channels: int, num_classes: int, device, channels_last: bool):
    """Random batch in `kind`'s layout (base.py): images in [-1, 1] from uint8, as BatchSource makes them."""
    import torch

    g = torch.Generator().manual_seed(1234)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def img():
        u8 = torch.randint(0, 256, (batch, channels, res, res), generator=g, dtype=torch.uint8)
        return u8.float().div_(127.5).sub_(1.0).to(device).contiguous(memory_format=fmt)

    def mask():
        return (torch.rand(batch, 1, res, res, generator=g) > 0.9).float().to(device)

    def labels(low):
        return torch.randint(low, num_classes, (batch,), generator=g).to(device)

    if kind == "labelled":
        return {"image": img(), "label": labels(0), "mask": mask()}
    if kind == "paired":
        return {"a": img(), "b": img(), "mask": mask(), "label": labels(1)}
    return {"a": img(), "b": img(), "label_b": labels(1), "mask_b": mask()}


def measure(family_name: str, res: int, batch: int, mode: Mode, iters: int, warmup: int, device: str,
            overrides: dict) -> dict:
    """Build the family, run warm-up + timed cycles of engine calls; return one result row."""
    import torch

    from pipeline.config import from_dict
    from pipeline.models import REGISTRY
    from pipeline.models.base import DataSpec
    from pipeline.models.blocks import set_small_map_gemm
    from pipeline.training.flops import CountFlops
    from pipeline.training.step import AdversarialStep, StepConfig

    if mode.threads:
        torch.set_num_threads(mode.threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    cls = REGISTRY[family_name]
    spec = DataSpec(resolution=res, channels=3, classes=CLASSES)
    cfg = from_dict(cls.Config, dict(overrides), f"train.{family_name}")
    family = cls(cfg, spec).to(dev)
    if mode.channels_last:
        family = family.to(memory_format=torch.channels_last)
    set_small_map_gemm(family, mode.gemm)
    family.set_progress(1, 1)                         # progan: the final (full-resolution) network
    if mode.separate and hasattr(family, "_per_sample_norm"):
        family._per_sample_norm = lambda: False
    opt_g, opt_d = family.make_optimizers()
    step = AdversarialStep(family, opt_g, opt_d, StepConfig(mode.precision, fused_optimizers=mode.fused,
                                                            compile_generators=mode.compile), dev)
    data = make_batch(family.data_kind, batch, res, 3, len(CLASSES), dev, mode.channels_last)
    n_critic = family.n_critic
    n_params = sum(p.numel() for p in family.parameters())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # FLOPs of one cycle, counted eagerly (the counting calls are training steps too).
    flops = 0
    for i in range(n_critic):
        with CountFlops() as counter:
            step(data, train_g=(i + 1) % n_critic == 0)
        flops += counter.total

    compile_s = 0.0
    if mode.compile:
        # The engine compiles the generators after the first eager call of each kind (the FLOP
        # count above); these two cycles trace and compile every variant (grad / no grad, shapes).
        t0 = time.perf_counter()
        for i in range(2 * n_critic):
            step(data, train_g=(i + 1) % n_critic == 0)
        sync()
        compile_s = time.perf_counter() - t0

    cycles_warm = max(1, -(-warmup // n_critic))
    cycles = max(1, -(-iters // n_critic))
    times, cpu_times, loads = [], [], []
    for c in range(cycles_warm + cycles):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n_critic):
            step(data, train_g=(i + 1) % n_critic == 0)
        sync()
        if c >= cycles_warm:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            loads.append(os.getloadavg()[0])
    cycle_s = statistics.median(times)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB
    cuda_mib = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {
        "family": family_name, "res": res, "batch": batch, "mode": mode_name(mode), "n_critic": n_critic,
        "params_m": n_params / 1e6, "img_s": batch * n_critic / cycle_s, "ms_iter": 1000 * cycle_s / n_critic,
        "cycle_s_all": times, "cycle_cpu_s_all": cpu_times, "best_img_s": batch * n_critic / min(times),
        "img_cpu_s": batch * n_critic / statistics.median(cpu_times),
        "load1": statistics.median(loads), "gflop_cycle": flops / 1e9, "gflops": flops / cycle_s / 1e9,
        "compile_s": compile_s, "rss_mib": rss_mib, "cuda_mib": cuda_mib, "threads": torch.get_num_threads(),
    }


def mode_name(mode: Mode) -> str:
    parts = [mode.precision] + (["cl"] if mode.channels_last else []) + (["fused"] if mode.fused else []) \
        + (["gemm"] if mode.gemm else []) \
        + (["compile"] if mode.compile else []) + ([f"t{mode.threads}"] if mode.threads else []) \
        + (["sep"] if mode.separate else [])
    return "+".join(parts)


def run_child(job: dict, omp_wait: str, timeout_s: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON row (or an error row).

    omp_wait: OMP_WAIT_POLICY for the child ('passive': idle OpenMP threads sleep instead of
    spinning, which on a machine shared with other jobs keeps a descheduled thread from stalling
    every parallel region; 'active': spin, torch's default; 'default': inherit the environment).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(job)]
    env = dict(os.environ)
    if omp_wait != "default":
        env["OMP_WAIT_POLICY"] = omp_wait.upper()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**job, "error": f"did not finish in {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**job, "error": " | ".join(tail)}


# --------------------------------------------------------------------------- tables

def peak_for(mode: str, args) -> float:
    return args.peak_bf16 if mode.startswith("bf16") else args.peak_fp32


HEADER = ("| family | px | batch | mode | img/s (median) | img/s (best) | img/CPU-s | ms/iter | GFLOP/img | GFLOP/s "
          "| % peak | peak RSS MiB | compile s | load | speed-up vs fp32 (wall) | (CPU) | img/s of each run |\n"
          + "|---" * 17 + "|")


def fmt_row(r: dict, args, base: dict | None) -> str:
    if "error" in r:
        return f"| {r['family']} | {r['res']} | {r['batch']} | {r['mode']} | error: {r['error'][:160]} |"
    speedup = f"{r['img_s'] / base['img_s']:.2f}x" if base and "img_s" in base else "-"
    speedup_cpu = f"{r['img_cpu_s'] / base['img_cpu_s']:.2f}x" if base and "img_s" in base else "-"
    mem = f"{r['rss_mib']:.0f}" + (f" / {r['cuda_mib']:.0f} GPU" if r.get("cuda_mib") else "")
    comp = f"{r['compile_s']:.0f}" if r["compile_s"] else "-"
    gflop_img = r["gflop_cycle"] / (r["batch"] * r["n_critic"])
    runs = " / ".join(f"{v:.2f}" for v in r.get("runs", [r["img_s"]]))
    return (f"| {r['family']} | {r['res']} | {r['batch']} | {r['mode']} | {r['img_s']:.2f} | {r['best_img_s']:.2f} | "
            f"{r['img_cpu_s']:.2f} | {r['ms_iter']:.0f} | {gflop_img:.1f} | {r['gflops']:.0f} | "
            f"{100 * r['gflops'] / peak_for(r['mode'], args):.0f}% | {mem} | {comp} | {r['load1']:.1f} | {speedup} | "
            f"{speedup_cpu} | {runs} |")


def print_table(title: str, rows: list[dict], args) -> None:
    print(f"\n### {title}\n\n{HEADER.replace('vs fp32', 'vs ' + args.base)}")
    base = {(r["family"], r["res"], r["batch"]): r for r in rows if r["mode"] == args.base}
    for r in rows:
        b = base.get((r["family"], r["res"], r["batch"])) if r["mode"] != args.base else None
        print(fmt_row(r, args, b))


def print_speedups(rows: list[dict], fast: str, base_mode: str) -> None:
    print(f"\nPer family, {fast} vs {base_mode} (img/s ratio of the reported runs):")
    for fam in dict.fromkeys(r["family"] for r in rows):
        parts = []
        for res in sorted({r["res"] for r in rows if r["family"] == fam}):
            pick = {r["mode"]: r for r in rows if r["family"] == fam and r["res"] == res and "img_s" in r}
            if base_mode in pick and fast in pick:
                parts.append(f"{res} px {pick[fast]['img_s'] / pick[base_mode]['img_s']:.2f}x")
        print(f"- {fam}: " + (", ".join(parts) or "n/a"))


# --------------------------------------------------------------------------- main

def measure_peak() -> dict[str, tuple[float, float]]:
    """Best-of GFLOP/s of a 2048^3 GEMM and of a channels_last 3x3 conv (16 x 256 x 32 x 32,
    forward), each in fp32 and bf16: what the training step's kernels could reach at most."""
    import torch

    out = {}
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(16, 256, 32, 32).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(memory_format=torch.channels_last)
    conv_flop = 2 * 16 * 256 * 256 * 9 * 32 * 32
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a_, b_ = a.to(dt), b.to(dt)
        gemm = min(_time(lambda: a_ @ b_) for _ in range(7))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
            conv(x)
            conv_s = min(_time(lambda: conv(x)) for _ in range(7))
        out[name] = (2 * n ** 3 / gemm / 1e9, conv_flop / conv_s / 1e9)
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# (family, px, batch, reference img/s): the reference steps; Defect-GAN is held to the
# StarGAN figure (same batch; it trains both directions, 16 normal + 16 defect images per call).
# These figures were measured on another day: --side-by-side times the references instead.
REFERENCE = [("cyclegan", 128, 1, 0.27), ("stargan", 128, 16, 1.58), ("defectgan", 128, 16, 1.58)]

# --side-by-side: the public reference step scripts (../shared/peers, called by path, nothing
# copied), each paired with the project's step on the same config. Paper configs on both sides:
# the project's family Config defaults are the papers' (StarGAN: 64 channels, 6 blocks, its 6-layer
# D, n_critic 5; CycleGAN: 64 channels, 6 blocks below 256 px; Defect-GAN against the StarGAN
# reference at the same resolution and batch).
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
SIDE_BY_SIDE = [  # (family, px, batch, reference script, its arguments)
    ("stargan", 128, 16, "ref_stargan_step.py", ["128", "16"]),
    ("defectgan", 128, 16, "ref_stargan_step.py", ["128", "16"]),
    ("cyclegan", 128, 1, "ref_cyclegan_step.py", ["128", "1", "6"]),
]


def run_reference(script: str, script_args: list[str], threads: int, timeout_s: float) -> float:
    """img/s printed by one run of a peers/ step script (NaN when it fails)."""
    path = PEERS / script
    if not path.is_file():
        raise SystemExit(f"{path} not found: --side-by-side needs ../shared/peers beside the repository "
                         "(see its README.md)")
    try:
        proc = subprocess.run([sys.executable, str(path), *script_args, str(threads)], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return float("nan")
    for line in reversed(proc.stdout.splitlines()):
        if "img/s" in line:
            return float(line.split(": ")[-1].split(" img/s")[0])
    print(f"  reference {script} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}", file=sys.stderr)
    return float("nan")


def side_by_side(args, run) -> None:
    """A B A B: per config, `--repeats` pairs of (reference run, project run in --side-mode),
    back to back, so a busy spell of the machine hits both halves of a pair; ratio per pair and
    the median ratio."""
    import math

    threads = os.cpu_count() or 1          # the project child uses torch's default, = cores
    wanted = [c for c in SIDE_BY_SIDE if c[0] in args.families.split(",")]
    lines = ["| config | reference | pair | reference img/s | project img/s | ratio |", "|---|---|---|---|---|---|"]
    summary = []
    for fam, res, batch, script, script_args in wanted:
        ratios = []
        for k in range(args.repeats):
            ref = run_reference(script, script_args, threads, args.child_timeout)
            mine = run(fam, res, args.side_mode, batch).get("img_s", float("nan"))
            ratio = mine / ref if ref and not math.isnan(ref) else float("nan")
            ratios.append(ratio)
            lines.append(f"| {fam} {res} px batch {batch} | {script} {' '.join(script_args)} | {k + 1} | "
                         f"{ref:.2f} | {mine:.2f} | {ratio:.2f}x |")
            print(f"  pair {k + 1}: reference {ref:.2f} img/s, {fam} {args.side_mode} {mine:.2f} img/s",
                  file=sys.stderr, flush=True)
        ok = sorted(r for r in ratios if not math.isnan(r))
        med = statistics.median(ok) if ok else float("nan")
        summary.append(f"| {fam} {res} px batch {batch} | {args.side_mode} | {med:.2f}x | "
                       f"{' / '.join(f'{r:.2f}' for r in ratios)} | {'yes' if med >= 3 else 'no'} |")
    print(f"\n### Side by side with the reference code ({threads} threads on both sides, "
          f"OMP_WAIT_POLICY {args.omp_wait} for the project)\n")
    print("\n".join(lines))
    print("\n| config | project mode | median ratio | ratio of each pair | >= 3x |\n|---|---|---|---|---|")
    print("\n".join(summary))
ABLATION = [BASE_MODE, "fp32+spin", "fp32+t1", "fp32+sep", "fp32+fused", "fp32+gemm", "fp32+cl", "bf16", "bf16+cl",
            "bf16+fused", "bf16+fused+gemm", "bf16+t1", "bf16+fused+t1", "bf16+fused+t1+compile"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--resolutions", default="64,128")
    p.add_argument("--modes", default=f"{BASE_MODE},{FAST_MODE}", help="comma list of '+'-joined levers")
    p.add_argument("--iters", type=int, default=15, help="timed engine calls (rounded up to whole n_critic cycles)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed engine calls after the FLOP-counting cycle (rounded up to whole cycles)")
    p.add_argument("--base", default=BASE_MODE, help="mode the speed-up columns divide by")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every row this many times, interleaved, and report the median run")
    p.add_argument("--batch", type=int, default=0, help="override every family's batch (0: per-family default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--omp-wait", default="passive", choices=("passive", "active", "default"),
                   help="OMP_WAIT_POLICY of the measuring processes (mode token 'spin' forces active)")
    p.add_argument("--reference", action="store_true",
                   help="the issue's reference configs (cyclegan 128 px batch 1, stargan 128 px batch 16) "
                        "in --modes, against the reference figures")
    p.add_argument("--ablation", action="store_true", help="one lever at a time on the reference configs")
    p.add_argument("--side-by-side", action="store_true",
                   help="time ../shared/peers' reference steps interleaved with the project's (A B A B, "
                        "--repeats pairs per config) and report the ratio per pair and its median")
    p.add_argument("--side-mode", default=FAST_MODE, help="project mode for --side-by-side")
    p.add_argument("--no-main", action="store_true", help="skip the per-family table")
    p.add_argument("--child-timeout", type=float, default=1800, help="seconds per measurement before it is "
                   "recorded as an error (an OMP-spinning row on a busy machine can crawl)")
    p.add_argument("--quick", action="store_true", help="smoke test: 32 px, batch 2, 1 timed cycle")
    p.add_argument("--peak-fp32", type=float, default=PEAK_FP32)
    p.add_argument("--peak-bf16", type=float, default=PEAK_BF16)
    p.add_argument("--measure-peak", action="store_true", help="also print best-of GEMM GFLOP/s, fp32 and bf16")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        job = json.loads(args._child)
        row = measure(job["family"], job["res"], job["batch"], Mode.parse(job["mode"]), job["iters"],
                      job["warmup"], job["device"], job.get("overrides", {}))
        print(json.dumps(row))
        return

    import torch

    cmd = "python bench/bench_train_step.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    print(f"# bench_train_step: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, "
          f"default threads {torch.get_num_threads()}, device {args.device}, OMP_WAIT_POLICY {args.omp_wait}")
    print(f"command: `{cmd}`")
    print("The machine was shared with other engineers' jobs while this ran ('load' = 1-min load average "
          "during the timed cycles): img/s is the median over timed cycles, 'best' the fastest cycle; with "
          "--repeats the row is the run with the median img/s, all runs listed last. "
          "img/CPU-s divides by the process's CPU time instead (robust to time-slicing by other jobs; "
          "with N busy threads and no contention, wall img/s would approach N x this).")
    print(f"% peak against the issue's whole-machine peaks fp32 {args.peak_fp32:.0f} / bf16 {args.peak_bf16:.0f} "
          "GFLOP/s. img/s counts real images drawn per engine call (the loop's nimg); for n_critic 5 it is "
          "taken over whole cycles (4 D-only + 1 D+G calls) = images shown to D per second.")
    if args.measure_peak:
        peaks = measure_peak()
        print("measured peaks (best of 7; GEMM 2048^3, conv 3x3 256->256 at 32 px batch 16, channels_last): "
              + "; ".join(f"{k} GEMM {g:.0f} / conv {c:.0f} GFLOP/s" for k, (g, c) in peaks.items()))

    families = [f for f in args.families.split(",") if f]
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    modes = list(dict.fromkeys(m for m in args.modes.split(",") if m))
    iters, warmup = (1, 0) if args.quick else (args.iters, args.warmup)
    if args.quick:
        resolutions = [32]

    def run(fam, res, mode, batch=None):
        b = 2 if args.quick else (batch or args.batch or DEFAULT_BATCH[fam])
        Mode.parse(mode)                                     # fail early on a typo
        spin = "spin" in mode.split("+")
        job = {"family": fam, "res": res, "batch": b, "mode": "+".join(t for t in mode.split("+") if t != "spin"),
               "iters": iters, "warmup": warmup, "device": args.device}
        row = run_child(job, "active" if spin else args.omp_wait, args.child_timeout)
        row["mode"] = mode
        print(f"  {fam} {res}px b{b} {mode}: {row.get('img_s', float('nan')):.2f} img/s"
              + (f"  ERROR {row['error']}" if "error" in row else ""), file=sys.stderr, flush=True)
        return row

    def run_set(configs: list[tuple]) -> list[dict]:
        """Each (family, px, mode, batch) `--repeats` times, interleaved (every config once per round,
        so a busy spell of the machine hits all of them); keep the run with the median img/s."""
        runs: dict[tuple, list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c in configs:
                runs[c].append(run(*c))
        out = []
        for c in configs:
            ok = sorted((r for r in runs[c] if "img_s" in r), key=lambda r: r["img_s"])
            row = ok[(len(ok) - 1) // 2] if ok else runs[c][0]
            row["runs"] = [r.get("img_s", float("nan")) for r in runs[c]]
            out.append(row)
        return out

    if args.side_by_side:
        side_by_side(args, run)

    if not args.no_main:
        rows = run_set([(fam, res, mode, None) for fam in families for res in resolutions for mode in modes])
        print_table("Per family (family Config defaults; batch = real images per engine call)", rows, args)
        for fast in modes:
            if fast != args.base:
                print_speedups(rows, fast, args.base)
        mem = [r for r in rows if "rss_mib" in r and r["res"] == max(resolutions)]
        print(f"\nPeak RSS at {max(resolutions)} px (MiB): "
              + ", ".join(f"{r['family']} {r['mode']} {r['rss_mib']:.0f}" for r in mem))

    if args.reference or args.ablation:
        ref_modes = ABLATION if args.ablation else modes
        configs = [(fam, res if not args.quick else 32, mode, batch)
                   for fam, res, batch, _ in REFERENCE for mode in ref_modes
                   if not (mode.endswith("+sep") and fam != "cyclegan")]   # only cyclegan batches translations
        rows = run_set(configs)
        title = "Reference configs" + (": ablation, one lever at a time" if args.ablation else "")
        print_table(title, rows, args)
        print("\n| config | reference img/s | this project fp32 | vs reference | fastest mode | img/s | "
              "vs reference | vs project fp32 |\n|---|---|---|---|---|---|---|---|")
        for fam, res, batch, ref_img_s in REFERENCE:
            mine = [r for r in rows if r.get("family") == fam and "img_s" in r and "compile" not in r["mode"]
                    and "spin" not in r["mode"] and (r["res"], r["batch"]) == (res, batch)]
            fp32 = next((r for r in mine if r["mode"] == BASE_MODE), None)
            if not fp32:
                continue
            best = max(mine, key=lambda r: r["img_s"])
            print(f"| {fam} {res} px batch {batch} | {ref_img_s} | {fp32['img_s']:.2f} | "
                  f"{fp32['img_s'] / ref_img_s:.2f}x | {best['mode']} | {best['img_s']:.2f} | "
                  f"{best['img_s'] / ref_img_s:.2f}x | {best['img_s'] / fp32['img_s']:.2f}x |")
        print("(fastest mode excludes compile, kept behind a flag, and spin; see the table for those)")


if __name__ == "__main__":
    main()
