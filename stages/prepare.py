"""DVC entry point for the prepare stage: `python stages/prepare.py --params params.yaml --out data/prepared`.

No logic here: it runs the same command as `pipeline prepare` (pipeline/cli.py ->
pipeline.data.prepare.run_prepare), so errors print as one clear message with a non-zero exit.
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    sys.exit(app(["prepare", *sys.argv[1:]], prog_name="stages/prepare.py"))
