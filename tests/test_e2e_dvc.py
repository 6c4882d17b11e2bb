"""End to end: `dvc repro` runs the whole DAG on a copy of this repository with tiny params,
a second `dvc repro` does nothing, and changing a `generate.*` param reruns only generation
and what follows it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

TINY = {
    "prepare": {"resolution": 16, "synthetic": {"per_class": 8, "normal": 16, "paired": 8}},
    "train": {"common": {"kimg": 0.032, "batch_size": 4, "tick_kimg": 0.016, "snapshot_ticks": 1},
              # a family key overrides train.common: Defect-GAN's shipped kimg and warm-up too
              "defectgan": {"kimg": 0.032, "d_warmup_kimg": 0.008}},
    "generate": {"per_class": 4, "max_rounds": 2},
    "evaluate": {"feature_epochs": 1, "feature_min_steps": 10},
    "downstream": {"seeds": [0], "shots": [3], "min_steps": 5, "max_steps": 10, "eval_every": 5,
                   "synthetic_per_class": 4},
}


def _merge(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _run(args, cwd, env, timeout=900):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """A git clone-like copy of the tracked files (what CI and users get), with tiny params."""
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{dest / 'mlflow.db'}")
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "copy"]):
        subprocess.run(args, cwd=dest, env=env, check=True)
    return dest, env


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_dag_then_only_what_changed(repo_copy):
    repo, env = repo_copy
    out = _run([str(VENV_BIN / "dvc"), "repro"], repo, env, timeout=1200)
    assert "ERROR" not in out

    # Every stage produced readable outputs.
    stats = json.loads((repo / "data/prepared/stats.json").read_text())
    assert stats
    for family in ("progan", "pix2pix", "cyclegan", "stargan", "defectgan"):
        assert (repo / f"models/{family}/generator_ema.pt").stat().st_size > 0
        assert json.loads((repo / f"models/{family}/metrics.json").read_text())
        manifest = json.loads((repo / f"data/synthetic/{family}/manifest.json").read_text())
        assert manifest["model"] == family
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert metrics
    downstream = json.loads((repo / "reports/downstream.json").read_text())
    assert any(key.endswith("accuracy_mean") for key in downstream)
    summary = (repo / "reports/summary.md").read_text()
    assert "real_only" in summary or "Real only" in summary

    # Nothing changed: nothing runs.
    again = _run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    assert "Running stage" not in again

    # A generate param: generation, evaluate and downstream rerun; prepare and training do not.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["generate"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    assert "Running stage 'generate@defectgan'" in third
    assert "Running stage 'evaluate'" in third and "Running stage 'downstream'" in third
    assert "Running stage 'prepare'" not in third
    assert "Running stage 'train@" not in third
