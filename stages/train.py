"""DVC stage `train@<family>`: a thin entry point; all logic lives in `pipeline train` (pipeline/cli.py).

    python stages/train.py --stage cyclegan --dvc-stage train@cyclegan --params params.yaml \
        --data data/prepared --out models/cyclegan

Cluster resources come from params.yaml `ray:` (deliberately not DVC params) or RAY_ADDRESS.
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
