"""DVC stage `downstream`: a thin entry point; all logic lives in `pipeline downstream` (pipeline/cli.py)."""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["downstream", *sys.argv[1:]])
