"""Wall time of the downstream stage: the default DAG's stage on the built-in data, and a 64 px
real dataset (elpv) with 5 seeds x 2 shot counts.

    .venv/bin/python bench/bench_downstream.py                      # both cases
    .venv/bin/python bench/bench_downstream.py --cases builtin --synthetic data/synthetic
    .venv/bin/python bench/bench_downstream.py --cases elpv --elpv-per-class 672

Each case prepares its data into a temporary folder (built-in: params.yaml `prepare`; elpv: the
`elpv` importer at 64 px, 1 channel, `--elpv-per-class` cells per class, needs `pip install
'.[elpv]'`), then runs `run_downstream` with params.yaml `downstream` exactly as the DVC stage
does (same worker processes, same thread settings: the environment is passed through, so run it
the way DVC runs the stage; MLflow logging goes to a throwaway sqlite store). Synthetic sets: `--synthetic DIR` when the generate stage's output
exists; otherwise `--standins` stand-in sets per case, made of strong-classical-augmented copies
of the real training defects (`generate.per_class` per class). Their images are not a GAN's, but
they cost the classifier exactly what a GAN's samples cost, so the timing is that of the full
set of conditions (real+synthetic, synthetic+classical, CAS).

Columns: classifiers trained, mean optimizer steps, wall time (prepare excluded), CPU seconds
of this process and its worker processes, load average before/after (the machine is shared:
quote both), and real_only's balanced accuracy / accuracy at the largest shot count next to the
majority-class floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (library environment defaults before torch is imported)


def _standins(prepared: Path, out: Path, models: list[str], per_class: int) -> None:
    """Stand-in synthetic sets (see the module docstring) in the generate stage's layout."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipeline.data.images import encode_mask_png, encode_png
    from pipeline.downstream.augment import strong_classical
    from pipeline.metrics.data import DEFECT_LABEL, load_real, read_prepared_info

    info = read_prepared_info(prepared)
    train = load_real(prepared, ["train"])
    for m, model in enumerate(models):
        gen = torch.Generator().manual_seed(100 + m)
        rows = []
        for k in range(1, len(info.classes)):
            src = train.images[train.labels == k]
            if len(src) == 0:
                continue
            pick = torch.randint(0, len(src), (per_class,), generator=gen).numpy()
            x = torch.from_numpy(src[pick]).float().div(127.5).sub(1)
            imgs = ((strong_classical(x, gen) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            for i, img in enumerate(imgs):
                label = info.classes[k]          # a class named "defect" is the reserved unlabelled name: -1
                rows.append(dict(id=f"{model}-{k}-{i}", label=label, label_idx=-1 if label == DEFECT_LABEL else k,
                                 image_png=encode_png(img.transpose(1, 2, 0)),
                                 mask_png=encode_mask_png(np.zeros(img.shape[1:], np.uint8)),
                                 region_png=None, model=model))
        folder = out / model
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
        (folder / "manifest.json").write_text(json.dumps({"model": model, "classes": info.classes,
                                                          "note": "bench stand-in, not a GAN"}))


def _prepare(case: str, tmp: Path, args) -> Path:
    from pipeline.config import PrepareParams, from_dict, load_params, to_dict
    from pipeline.data.prepare import run_prepare

    if case == "builtin":
        params = load_params(ROOT / "params.yaml").prepare
    else:
        params = from_dict(PrepareParams, {"source": "elpv", "resolution": 64, "channels": 1,
                                           "elpv": {"per_class": args.elpv_per_class}}, "prepare")
    out = tmp / case / "prepared"
    run_prepare(from_dict(PrepareParams, to_dict(params), "prepare"), out, quiet=True)
    return out


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_case(case: str, tmp: Path, args) -> dict:
    from pipeline.config import load_params
    from pipeline.downstream.conditions import REFERENCE
    from pipeline.downstream.run import run_downstream

    cfg = load_params(ROOT / "params.yaml")
    prepared = _prepare(case, tmp, args)
    if args.synthetic and case == "builtin":
        synthetic, models, kind = Path(args.synthetic), list(cfg.generate.models), "generated"
    else:
        models = args.standins if case == "builtin" else args.standins[:args.elpv_standins]
        synthetic, kind = tmp / case / "synthetic", f"{len(models)} stand-in(s)"
        _standins(prepared, synthetic, models, cfg.generate.per_class)
    params = cfg.downstream
    load_before = os.getloadavg()[0]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    metrics = run_downstream(params, prepared, synthetic, tmp / case / "reports", models)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    details = json.loads((tmp / case / "reports" / "downstream_runs.json").read_text())
    runs = details["runs"]
    top = max(params.shots)
    return {"case": case, "resolution": 32 if case == "builtin" else 64, "synthetic": kind,
            "images": sum(details["test_per_class"]) + sum(details["val_per_class"]),
            "classifiers": len(runs), "steps": sum(r["steps"] for r in runs) / len(runs),
            "wall_s": wall, "cpu_s": cpu, "load": (load_before, os.getloadavg()[0]),
            "workers": details["params"]["workers_used"], "seeds": len(params.seeds), "shots": params.shots,
            "bacc": metrics.get(f"shots_{top}/{REFERENCE}/balanced_accuracy_mean"),
            "acc": metrics.get(f"shots_{top}/{REFERENCE}/accuracy_mean"),
            "floor": details["majority_baseline"], "top": top,
            "report": str(tmp / case / "reports" / "summary.md")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["builtin", "elpv"], choices=["builtin", "elpv"])
    ap.add_argument("--synthetic", default=None, help="the generate stage's output folder (built-in case)")
    ap.add_argument("--standins", nargs="+", default=["defectgan", "stargan", "progan"],
                    help="stand-in model names when --synthetic is not given (the default DAG's class-labelled models)")
    ap.add_argument("--elpv-standins", type=int, default=1, help="stand-in synthetic sets for the elpv case")
    ap.add_argument("--elpv-per-class", type=int, default=672, help="elpv cells per class (672: 1344 images)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (reports) and print it")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_downstream_"))
    # The stage logs to MLflow; the bench logs to a throwaway sqlite store of the same kind as the
    # default embedded one, so its runs do not land in the project's store.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    rows = []
    try:
        for case in args.cases:
            rows.append(run_case(case, tmp, args))
            print(f"{case}: done in {rows[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n`{' '.join(['.venv/bin/python', 'bench/bench_downstream.py', *sys.argv[1:]])}`  "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})\n")
    print("| case | px | val+test images | synthetic | seeds x shots | workers | classifiers | mean steps "
          "| wall | CPU s | load before/after | real_only @ top shots: bal. acc / acc | majority floor: bal. acc / acc |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        f = r["floor"]
        print(f"| {r['case']} | {r['resolution']} | {r['images']} | {r['synthetic']} | {r['seeds']} x {r['shots']} "
              f"| {r['workers']} | {r['classifiers']} | {r['steps']:.0f} | {r['wall_s'] / 60:.1f} min "
              f"| {r['cpu_s']:.0f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} "
              f"| {r['bacc']:.3f} / {r['acc']:.3f} ({r['top']} shots) "
              f"| {f['balanced_accuracy']:.3f} / {f['accuracy']:.3f} |")
    if args.keep:
        print("\nreports: " + ", ".join(r["report"] for r in rows))


if __name__ == "__main__":
    main()
