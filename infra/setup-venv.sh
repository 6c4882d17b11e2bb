#!/usr/bin/env bash
# Create .venv at the repository root from nothing and install the pinned stack + the package
# (editable, so Ray workers import it). Safe to run again: it reinstalls only when
# pyproject.toml or constraints.txt changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, by exact version: pip takes the local CPU wheel; anything looser pulls CUDA builds.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e '.[elpv]'
echo "$want" > "$stamp"
echo "set-up done: .venv ready"
