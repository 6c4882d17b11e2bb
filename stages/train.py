"""DVC stage `train@<family>`: paths come from dvc.yaml, the work from the library.

    python stages/train.py --family cyclegan --params params.yaml --data data/prepared --out models/cyclegan

Same function as `pipeline train --stage <family>` (pipeline/training/ray_train.py); cluster
resources come from params.yaml `ray:` (deliberately not DVC params) or RAY_ADDRESS.
"""

import argparse
import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.training.ray_train import launch_training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        launch_training(load_params(args.params), args.family, data_dir=args.data, out_dir=args.out,
                        ray_overrides={}, resume=False, run_name=None, dvc_stage=f"train@{args.family}")
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
