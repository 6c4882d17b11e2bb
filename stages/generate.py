"""DVC stage `generate`: a thin entry point; all logic lives in `pipeline generate` (pipeline/cli.py).

    python stages/generate.py --model defectgan --params params.yaml --data data/prepared \
        --models-dir models --out data/synthetic/defectgan
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["generate", *sys.argv[1:]])
