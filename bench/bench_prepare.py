"""Throughput of `prepare`: synthetic generation and folder import at 64, 128 and 256 px.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python bench/bench_prepare.py [--images 96] [--res 64 128 256]

Columns (images per second, single process):
  synthetic render   - numpy surface + defect rendering only (pipeline.data.synthetic)
  synthetic prepare  - end to end run_prepare (render, PNG encode, split, Parquet, preview)
  folder import      - end to end run_prepare on a folder of 300x300 PNG images (a third with masks),
                       i.e. decode, validate, convert, resize, encode, split, write
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from PIL import Image  # noqa: E402

from pipeline.config import PrepareParams, from_dict  # noqa: E402
from pipeline.data import synthetic  # noqa: E402
from pipeline.data.prepare import run_prepare  # noqa: E402


def _params(res: int, n: int, **extra) -> PrepareParams:
    per_class = max(3, n // 8)
    data = {"resolution": res, "synthetic": {"per_class": per_class, "normal": 2 * per_class, "paired": per_class * 2}}
    data.update(extra)
    return from_dict(PrepareParams, data, "prepare")


def _source_folder(root: Path, n: int, size: int = 300) -> int:
    """n images of `size` px rendered by the synthetic generator, laid out as a folder source."""
    sp = from_dict(PrepareParams, {"synthetic": {"per_class": max(3, n // 6), "normal": max(3, n // 3),
                                                 "paired": 0, "classes": ["scratch", "spot"]}}, "prepare").synthetic
    count = 0
    for item in synthetic.iter_synthetic(sp, size, 3, seed=1):
        d = root / item.label
        d.mkdir(parents=True, exist_ok=True)
        name = f"{item.label}_{item.index:04d}"
        Image.fromarray(item.image).save(d / f"{name}.png", compress_level=1)
        if item.label == "scratch":
            Image.fromarray(item.mask * 255).save(d / f"{name}_mask.png")
        count += 1
    return count


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96, help="approximate images per measurement")
    ap.add_argument("--res", type=int, nargs="+", default=[64, 128, 256])
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare-"))
    try:
        src = work / "folder"
        n_src = _source_folder(src, args.images)
        rows = []
        for res in args.res:
            p = _params(res, args.images)
            specs = synthetic.specs(p.synthetic, p.seed)
            t_render = _timed(lambda: [synthetic.render_spec(s, res, 3) for s in specs])
            n_syn = len(specs)
            t_syn = _timed(lambda: run_prepare(p, work / f"syn{res}", quiet=True))
            pf = _params(res, args.images, source="folder", folder={"root": str(src)})
            t_folder = _timed(lambda: run_prepare(pf, work / f"folder{res}", quiet=True))
            rows.append((res, n_syn / t_render, n_syn / t_syn, n_src / t_folder))
        print()
        print(f"prepare throughput, images/s ({n_syn} synthetic images incl. pairs; {n_src} folder images of "
              f"300x300 px; {platform.processor() or platform.machine()}, {os.cpu_count()} cpu, "
              f"python {platform.python_version()})")
        print()
        print("| resolution | synthetic render | synthetic prepare | folder import |")
        print("|-----------:|-----------------:|------------------:|--------------:|")
        for res, a, b, c in rows:
            print(f"| {res:>7} px | {a:>16.0f} | {b:>17.0f} | {c:>13.0f} |")
        print()
        print("reproduce: NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python bench/bench_prepare.py "
              f"--images {args.images} --res {' '.join(map(str, args.res))}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
