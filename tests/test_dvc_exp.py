"""`dvc exp run -S train.defectgan.kimg=...` on a tiny copy of this repository: the experiment runs,
its stages print two lines each besides progress and DVC's own, and `dvc exp show` reads the
changed param and the headline metric back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_e2e_dvc import _merge

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
KIMG = 0.048       # 3 ticks of 16 images: the experiment's value (the tiny baseline has 0.032)
TABLE_COLUMNS = 240  # the shared-key table is 201 characters wide plus the experiment's name
                    # (bench/results/dvc_table_width_2026-12-02.md); DVC drops columns past COLUMNS
TINY = {           # only the stages this test runs: prepare and train@defectgan
    "prepare": {"resolution": 16, "synthetic": {"per_class": 8, "normal": 16, "paired": 8}},
    "train": {"common": {"kimg": 0.032, "batch_size": 4, "tick_kimg": 0.016, "snapshot_ticks": 1},
              # the shipped D-only warm-up (0.2 kimg) is longer than this run: G must train here
              "defectgan": {"d_warmup_kimg": 0.0}},
}


def _run(args, cwd, env, timeout=1200):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    dest = tmp_path_factory.mktemp("exp") / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PIPELINE_VERBOSE", "PIPELINE_PROGRESS")}
    env.update(PATH=f"{VENV_BIN}:{os.environ['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{dest / 'mlflow.db'}",
               PIPELINE_CLUSTER_STATE=str(dest / "no-cluster.json"), DVC_NO_ANALYTICS="1")
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "tiny copy"]):
        subprocess.run(args, cwd=dest, env=env, check=True)
    return dest, env


@pytest.mark.slow
def test_dvc_exp_run_sets_a_param_and_exp_show_reads_it_back(tiny_repo):
    repo, env = tiny_repo
    run = _run([str(VENV_BIN / "dvc"), "exp", "run", "-S", f"train.defectgan.kimg={KIMG}", "train@defectgan"],
               repo, env)
    lines = (run.stdout + run.stderr).splitlines()
    ours = [ln for ln in lines if ln.startswith(("▶", "✓", "✗", "  "))]
    assert [ln.split()[:2] for ln in ours if not ln.startswith("  ")] == [
        ["▶", "prepare"], ["✓", "prepare"], ["▶", "train@defectgan"], ["✓", "train@defectgan"]], lines
    dvc_own = ("Running stage", "> python ", "Generating lock file", "Updating lock file", "Ran experiment",
               "To apply the results", "Use `dvc exp", "")
    others = [ln for ln in lines if ln not in ours and not ln.startswith(dvc_own)]
    assert not others, others                              # no Ray, Ray Train or MLflow line

    shown = json.loads(_run([str(VENV_BIN / "dvc"), "exp", "show", "--json"], repo, env).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    (exp,) = [e for e in exps if e["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["defectgan"]
              ["kimg"] == KIMG]
    metrics = exp["revs"][0]["data"]["metrics"]
    assert metrics["metrics/train/defectgan.json"]["data"]["kimg"] == KIMG
    assert set(metrics["metrics/train/defectgan.json"]["data"]) == {"kimg", "D_loss", "G_loss"}

    # The table a user reads (DVC drops the columns that do not fit the terminal, shown as "…").
    # With the other families' headline files committed, DVC prefixes each shared metric key with
    # its file, so the table needs ~220 columns. File-unique keys would need 125 but would widen
    # `dvc metrics show` (the 200-column target, checked in test_headline.py) to 4754
    # characters: bench/bench_dvc_table_width.py.
    table = _run([str(VENV_BIN / "dvc"), "exp", "show", "--only-changed", "--no-pager"], repo,
                 {**env, "COLUMNS": str(TABLE_COLUMNS)}).stdout.splitlines()
    # DVC prefixes a metric with its file ("metrics/train/defectgan.json:kimg") when another tracked
    # metrics file has the same key (the committed headlines of the other families do).
    header = [h.split(":")[-1] for h in next(ln for ln in table if "Experiment" in ln).split()]
    assert header[:6] == ["Experiment", "Created", "kimg", "D_loss", "G_loss", "train.defectgan.kimg"]
    row = next(ln for ln in table if "└──" in ln).split()
    assert row.count(str(KIMG)) == 2                # the headline kimg and the param, side by side
    assert max(map(len, table)) <= TABLE_COLUMNS
