"""Width of `dvc metrics show` and `dvc exp show` over a full DAG's headline files, for two key layouts.

    .venv/bin/python bench/bench_dvc_table_width.py

  shared   the shipped layout (pipeline/headline.py): every family's file has the same keys (kimg,
           img_per_s, ...), every model's, every downstream condition's. `dvc metrics show` (a row
           per file, a column per distinct key) stays narrow; `dvc exp show` prefixes each shared
           key with its file ("metrics/train/defectgan.json:kimg"), so its columns are wide.
  unique   hypothetical: each key prefixed with its file's family/model/(shots_)condition
           ("defectgan_kimg"). `dvc exp show` drops the file prefix; `dvc metrics show` gets a
           column per key of every file.

`dvc exp show --only-changed` is read after the change `train.defectgan.kimg` 0.032 -> 0.048 with
train@defectgan's headline changed (the case of tests/test_dvc_exp.py), at several terminal
widths (COLUMNS): DVC drops the columns that do not fit (shown as "…"), so "fits" is the narrowest
width that shows all of them. Everything lives in a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WIDTHS = (100, 120, 140, 160, 180, 200, 220, 240, 260)


def _unique_keys(root: Path) -> None:
    for path in (root / "metrics").rglob("*.json"):
        rel = path.relative_to(root / "metrics")
        prefix = (f"{rel.parts[1]}_" if rel.parts[0] == "downstream" else "") + path.stem
        values = json.loads(path.read_text())
        path.write_text(json.dumps({f"{prefix}_{k}": v for k, v in values.items()}))


def measure(root: Path, layout: str) -> dict:
    from tests.test_headline import _full_dag_headlines     # the test's full-DAG headline files

    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def run(*args, columns=None):
        extra = {"COLUMNS": str(columns)} if columns else {}
        return subprocess.run(list(args), cwd=root, env={**env, **extra}, capture_output=True, text=True,
                              check=True).stdout.splitlines()

    root.mkdir(parents=True)
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    _full_dag_headlines(root)
    if layout == "unique":
        _unique_keys(root)
    (root / "params.yaml").write_text("train:\n  defectgan:\n    kimg: 0.032\n")
    (root / "dvc.yaml").write_text("params:\n  - params.yaml\n"
                                   "metrics:\n  - metrics/train\n  - metrics/evaluate\n  - metrics/downstream\n")
    run("git", "add", "-A")
    run("git", "-c", "user.email=bench@example.com", "-c", "user.name=bench", "commit", "-qm", "headlines")
    shown = run(dvc, "metrics", "show")
    train = root / "metrics" / "train" / "defectgan.json"
    values = json.loads(train.read_text())
    train.write_text(json.dumps({k: 0.048 if k.endswith("kimg") else v * 1.1 for k, v in values.items()}))
    (root / "params.yaml").write_text("train:\n  defectgan:\n    kimg: 0.048\n")
    exp = {}
    for columns in WIDTHS:
        table = run(dvc, "exp", "show", "--only-changed", "--no-pager", columns=columns)
        exp[columns] = (max(map(len, table)), any("…" in line for line in table))
    return {"metrics_width": max(map(len, shown)), "metrics_columns": len(shown[0].split()) - 1,
            "exp": exp, "header": next(line for line in table if "Experiment" in line).split()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {layout: measure(Path(tmp) / layout, layout) for layout in ("shared", "unique")}
    print("| measure | shared keys (shipped) | unique keys (file-prefixed names) |")
    print("|---|---|---|")
    s, u = results["shared"], results["unique"]
    print(f"| dvc metrics show: widest line | {s['metrics_width']} | {u['metrics_width']} |")
    print(f"| dvc metrics show: metric columns | {s['metrics_columns']} | {u['metrics_columns']} |")
    for columns in WIDTHS:
        cell = lambda r: f"{r['exp'][columns][0]}" + (" (columns dropped)" if r["exp"][columns][1] else " (all shown)")
        print(f"| dvc exp show --only-changed, COLUMNS={columns}: widest line | {cell(s)} | {cell(u)} |")
    print(f"exp show header, shared: {' '.join(s['header'])}")
    print(f"exp show header, unique: {' '.join(u['header'])}")
    print("reproduce: .venv/bin/python bench/bench_dvc_table_width.py")


if __name__ == "__main__":
    main()
