"""Stages that survive a kill: SIGKILL at any moment leaves the previous complete output, or
(when the kill lands inside the final renames) a complete new one that the next run finishes
putting in place; never a mix of old and new.

Fast part: `pipeline.fsutil` killed at every rename by a tiny script. Slow part: the real
`generate`, `evaluate` and `downstream` stage processes (`stages/<stage>.py`) on a tiny
prepared dataset and model, killed while they write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.fsutil import file_sha256, finish_interrupted

REPO = Path(__file__).resolve().parent.parent

# Runs a script with os.rename / os.replace counted; SIGKILLs itself just before the first call
# (KILL_BEFORE_FIRST=1), right after call KILL_AFTER_CALL (1-based), or right after the first
# call whose source or destination is KILL_AFTER_RENAME_OF. Test-only: production code has no
# kill hook.
WRAPPER = r"""
import os, runpy, signal, sys
after_call = int(os.environ.get("KILL_AFTER_CALL", "0"))
before_first = os.environ.get("KILL_BEFORE_FIRST") == "1"
target = os.environ.get("KILL_AFTER_RENAME_OF")
count = [0]
def hooked(real):
    def call(src, dst, *args, **kw):
        if before_first:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kw)
        count[0] += 1
        hit = target and target in (os.path.abspath(src), os.path.abspath(dst))
        if count[0] == after_call or hit:
            os.kill(os.getpid(), signal.SIGKILL)
    return call
os.rename, os.replace = hooked(os.rename), hooked(os.replace)
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
print("renames:", count[0])
"""


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (hidden ones included)."""
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden_leftovers(folder: Path, tag: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{tag}."))


# --------------------------------------------------------------------------- fsutil, killed at every rename

WRITE_ENTRIES = r"""
import sys
from pathlib import Path
from pipeline.fsutil import atomic_dir, atomic_entries, write_text_atomic

folder, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "entries":       # the downstream shape: two files and a folder beside others' files
    with atomic_entries(folder, "downstream") as staging:
        with atomic_dir(staging / "plots") as plots:
            (plots / "a.png").write_text("new a")
            (plots / "c.png").write_text("new c")
        write_text_atomic(staging / "summary.md", "new summary")
        write_text_atomic(staging / "data.json", "new data")
else:                       # the generate / evaluate shape: one folder
    with atomic_dir(folder / "out") as out:
        (out / "manifest.json").write_text("new manifest")
        (out / "images").mkdir()
        (out / "images" / "1.png").write_text("new 1")
"""


def _old_state(folder: Path, mode: str) -> None:
    (folder / "evaluate").mkdir(parents=True)
    (folder / "evaluate" / "table.md").write_text("someone else's")
    (folder / "notes.txt").write_text("someone else's")
    if mode == "entries":
        (folder / "plots").mkdir()
        (folder / "plots" / "a.png").write_text("old a")
        (folder / "plots" / "b.png").write_text("old b")
        (folder / "summary.md").write_text("old summary")
        (folder / "data.json").write_text("old data")
    else:
        (folder / "out" / "images").mkdir(parents=True)
        (folder / "out" / "manifest.json").write_text("old manifest")
        (folder / "out" / "images" / "0.png").write_text("old 0")
        (folder / "out" / ".gitignore").write_text("/x\n")


NEW = {
    "entries": {"plots/a.png": "new a", "plots/c.png": "new c", "summary.md": "new summary", "data.json": "new data"},
    "dir": {"out/manifest.json": "new manifest", "out/images/1.png": "new 1", "out/.gitignore": "/x\n"},
}
OLD = {
    "entries": {"plots/a.png": "old a", "plots/b.png": "old b", "summary.md": "old summary", "data.json": "old data"},
    "dir": {"out/manifest.json": "old manifest", "out/images/0.png": "old 0", "out/.gitignore": "/x\n"},
}
OTHERS = {"evaluate/table.md": "someone else's", "notes.txt": "someone else's"}


def _visible(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")}


def _run_writer(folder: Path, mode: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, str(folder.parent / "write.py"), str(folder), mode],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})


@pytest.mark.parametrize("mode", ["entries", "dir"])
def test_fsutil_killed_at_every_rename_never_leaves_a_mix(tmp_path, mode):
    (tmp_path / "write.py").write_text(WRITE_ENTRIES)
    dry = tmp_path / "dry"
    _old_state(dry, mode)
    done = _run_writer(dry, mode)
    assert done.returncode == 0, done.stderr
    renames = int(done.stdout.split("renames:")[1])
    assert _visible(dry) == {**OTHERS, **NEW[mode]} and not _hidden_leftovers(dry, "downstream" if mode == "entries" else "out")
    seen = set()
    points = [{"KILL_BEFORE_FIRST": 1}] + [{"KILL_AFTER_CALL": k} for k in range(1, renames + 1)]
    for k, point in enumerate(points):
        folder = tmp_path / f"kill{k}"
        _old_state(folder, mode)
        killed = _run_writer(folder, mode, **point)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        tag = "downstream" if mode == "entries" else "out"
        state = _visible(folder)
        committing = any(".commit-" in name for name in _hidden_leftovers(folder, tag))
        if not committing:      # before the new output was complete: the old one is intact
            assert state == {**OTHERS, **OLD[mode]}, k
        finish_interrupted(folder, tag)            # what the next run does first
        state = _visible(folder)
        assert state in ({**OTHERS, **OLD[mode]}, {**OTHERS, **NEW[mode]}), (k, state)
        assert not _hidden_leftovers(folder, tag), k
        seen.add("new" if state == {**OTHERS, **NEW[mode]} else "old")
    assert seen == {"old", "new"}          # both sides of the commit point were hit


def test_temporaries_of_a_live_process_are_left_alone(tmp_path):
    import socket
    import re

    host = re.sub(r"\W", "_", socket.gethostname())
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-abc"
    live.mkdir()
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = tmp_path / f".out.tmp-{dead_pid}@{host}-abc"
    dead.mkdir()
    other_host = tmp_path / f".out.tmp-{dead_pid}@elsewhere-abc"
    other_host.mkdir()
    finish_interrupted(tmp_path, "out")
    assert live.exists() and other_host.exists() and not dead.exists()


# --------------------------------------------------------------------------- the real stage processes

RES = 16
POLL_S = 0.005
FAMILY = "dcgan"      # the smallest family test_generation trains (unconditional: label "defect")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """data/prepared (16 px, 2 classes) and models/<FAMILY> (tiny, 0.03 kimg), built in-process."""
    from pipeline.config import PrepareParams, TrainCommonParams, from_dict
    from pipeline.data.prepare import run_prepare
    from pipeline.models import family_config_class
    from pipeline.training.loop import TrainJob, train
    from test_generation import TINY

    root = tmp_path_factory.mktemp("kill")
    run_prepare(from_dict(PrepareParams, {"resolution": RES, "synthetic": {
        "classes": ["scratch", "spot"], "per_class": 8, "normal": 16, "paired": 0}}, "prepare"),
        root / "data" / "prepared", quiet=True)
    common = from_dict(TrainCommonParams, {"kimg": 0.03, "batch_size": 4, "tick_kimg": 0.03,
                                           "snapshot_ticks": 100}, "train.common")
    train(TrainJob(FAMILY, common, from_dict(family_config_class(FAMILY), TINY[FAMILY], f"train.{FAMILY}"),
                   root / "data" / "prepared", root / "models" / FAMILY, root / "work"))
    return root


def _params(ws: Path, name: str, **sections) -> Path:
    base = {"generate": {"models": [FAMILY], "per_class": 4, "seed": 0, "ray_batch_size": 8,
                         "num_actors": 1, "cpus_per_actor": 0.5, "max_rounds": 1, "min_mask_fraction": 0.0},
            "evaluate": {"metrics": ["swd", "duplicate_rate"], "feature_epochs": 1, "swd_projections": 16,
                         "swd_patches_per_image": 8, "kid_subsets": 5, "feature_min_steps": 0},
            "downstream": {"seeds": [0], "shots": [3], "min_steps": 5, "max_steps": 20, "eval_every": 5,
                           "patience": 1, "width": 4, "batch_size": 8, "synthetic_per_class": 4, "workers": 1}}
    for key, value in sections.items():
        base[key] = {**base[key], **value}
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


STAGE_ARGS = {
    "generate": lambda ws, params, out: ["--model", FAMILY, "--params", str(params), "--data",
                                         str(ws / "data/prepared"), "--models-dir", str(ws / "models"), "--out", str(out)],
    "evaluate": lambda ws, params, out: ["--params", str(params), "--data", str(ws / "data/prepared"),
                                         "--synthetic", str(ws / "data/synthetic"), "--out", str(out)],
    "downstream": lambda ws, params, out: ["--params", str(params), "--data", str(ws / "data/prepared"),
                                           "--synthetic", str(ws / "data/synthetic"), "--out", str(out)],
}


def _start(ws: Path, stage: str, params: Path, out: Path, **env) -> subprocess.Popen:
    """`python stages/<stage>.py ...` in its own session (so Ray's helpers can be reaped)."""
    log = open(ws / f"{stage}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([sys.executable, "-c", WRAPPER, f"stages/{stage}.py", *STAGE_ARGS[stage](ws, params, out)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 # unreachable store: tracking warns at once instead of building a database
                                 "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                                 **{k: str(v) for k, v in env.items()}})


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)        # Ray helpers of a killed driver, if any
        except ProcessLookupError:
            pass
    return rc


def _run(ws: Path, stage: str, params: Path, out: Path) -> None:
    proc = _start(ws, stage, params, out)
    rc = _finish(proc)
    assert rc == 0, f"{stage} failed (rc {rc})"


def _kill_when_writing(ws: Path, stage: str, params: Path, out: Path, started) -> None:
    """Start the stage and SIGKILL it as soon as `started()` says it is writing its output."""
    proc = _start(ws, stage, params, out)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if started():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(POLL_S)
    rc = _finish(proc)
    assert rc == -signal.SIGKILL, f"{stage} ended (rc {rc}) before it was seen writing: nothing was tested"


def _kill_at_rename(ws: Path, stage: str, params: Path, out: Path, path: Path) -> None:
    """Start the stage and SIGKILL it right after the rename that moves `path` (a commit step)."""
    proc = _start(ws, stage, params, out, KILL_AFTER_RENAME_OF=str(path.absolute()))
    rc = _finish(proc)
    assert rc == -signal.SIGKILL, f"{stage} ended (rc {rc}) without renaming {path}"


def _staged(parent: Path, tag: str, *inner: str) -> bool:
    """A staging folder of `tag` under `parent` holds `inner` (glob parts)."""
    return any(True for _ in parent.glob("/".join([f".{tag}.tmp-*", *inner])))


def _check_kills(ws, stage, out, snapshot_dir, old_params, new_params, writing, commit_path, which):
    """The shared scenario: complete old run; a kill while writing leaves it byte-identical; a
    kill inside the commit leaves old or new complete once the next run's clean-up ran; a
    complete new run replaces it and leaves no temporaries."""
    _run(ws, stage, old_params, out)
    old = _snapshot(snapshot_dir)
    assert which(snapshot_dir) == "old"

    _kill_when_writing(ws, stage, new_params, out, writing)
    assert _snapshot(snapshot_dir) == old

    _kill_at_rename(ws, stage, new_params, out, commit_path)
    tag = out.name if stage != "downstream" else "downstream"
    finish_interrupted(out.parent if stage != "downstream" else out, tag)     # what the next run does first
    state = which(snapshot_dir)
    assert state in ("old", "new")
    if state == "old":
        assert _snapshot(snapshot_dir) == old

    _run(ws, stage, new_params, out)
    assert which(snapshot_dir) == "new"
    parent = out.parent if stage != "downstream" else out
    assert not _hidden_leftovers(parent, tag)


@pytest.mark.slow
def test_generate_killed_keeps_the_previous_output(workspace):
    ws = workspace
    out = ws / "data" / "synthetic" / FAMILY
    old_p = _params(ws, "gen_old")
    new_p = _params(ws, "gen_new", generate={"seed": 1, "per_class": 12})     # 3 batches of 8

    def which(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        pngs = [p for p in (folder / "images").rglob("*.png") if not p.name.endswith("_mask.png")]
        import pyarrow.parquet as pq

        rows = pq.read_metadata(folder / "samples.parquet").num_rows
        n = sum(manifest["counts"].values())
        assert len(pngs) == rows == n, "manifest, Parquet and ImageFolder disagree: a mix"
        return {0: "old", 1: "new"}[manifest["seed"]]

    _check_kills(ws, "generate", out, out, old_p, new_p,
                 writing=lambda: _staged(out.parent, FAMILY, FAMILY, "images", "*", "*.png"),
                 commit_path=out, which=which)


@pytest.fixture(scope="module")
def generated(workspace) -> Path:
    """A complete data/synthetic/<FAMILY> (left by the generate test, else made here)."""
    if not (workspace / "data" / "synthetic" / FAMILY / "manifest.json").is_file():
        _run(workspace, "generate", _params(workspace, "gen_old"), workspace / "data" / "synthetic" / FAMILY)
    return workspace


def _evaluate_which(folder: Path) -> str:
    metrics = json.loads((folder / "metrics.json").read_text())
    table = (folder / "table.md").read_text()
    kind = "new" if "kid_domain" in metrics["metrics"] else "old"
    assert ("KID" in table.upper()) == (kind == "new"), "metrics.json and table.md disagree: a mix"
    assert (folder / "feature_net.pt").is_file() == (kind == "new"), "feature_net.pt from another run"
    return kind


@pytest.mark.slow
def test_evaluate_killed_keeps_the_previous_output(generated):
    ws = generated
    out = ws / "reports" / "evaluate"
    old_p = _params(ws, "ev_old")
    new_p = _params(ws, "ev_new", evaluate={"metrics": ["swd", "kid_domain"], "feature_min_steps": 60})
    _check_kills(ws, "evaluate", out, out, old_p, new_p,
                 writing=lambda: _staged(out.parent, "evaluate", "evaluate"),
                 commit_path=out, which=_evaluate_which)


@pytest.mark.slow
def test_downstream_killed_never_mixes_old_and_new(generated):
    ws = generated
    out = ws / "reports_ds"
    (out / "evaluate").mkdir(parents=True, exist_ok=True)
    (out / "evaluate" / "table.md").write_text("evaluate's own output\n")      # another stage's file
    old_p = _params(ws, "ds_old")
    new_p = _params(ws, "ds_new", downstream={"shots": [4]})

    def which(folder):
        metrics = json.loads((folder / "downstream.json").read_text())
        runs = json.loads((folder / "downstream_runs.json").read_text())
        plots = sorted(p.name for p in (folder / "plots").glob("confusion_*.png"))
        summary = (folder / "summary.md").read_text()
        shots = {k.split("/")[0] for k in metrics if k.startswith("shots_")}
        assert len(shots) == 1 and runs["params"]["shots"] == [int(next(iter(shots))[6:])], "json files disagree"
        cap = runs["params"]["shots"][0]
        assert plots and all(f"_shots_{cap}_" in p for p in plots), "plots from another run"
        assert f"confusion_shots_{cap}_" in summary, "summary.md from another run"
        assert (folder / "evaluate" / "table.md").read_text() == "evaluate's own output\n"
        return {3: "old", 4: "new"}[cap]

    _check_kills(ws, "downstream", out, out, old_p, new_p,
                 writing=lambda: _staged(out, "downstream"),
                 commit_path=out / "downstream.json", which=which)
