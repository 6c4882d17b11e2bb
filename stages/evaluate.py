"""DVC stage `evaluate`: a thin entry point; all logic lives in `pipeline evaluate` (pipeline/cli.py)."""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
