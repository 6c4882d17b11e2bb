"""Ray Train run folders in the storage path: which runs exist, which have a checkpoint, and so
the run name a fresh run or `--resume` uses (the Ray run folder and the MLflow run name)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from pipeline.errors import ParamsError, TrainingError

RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train V2's list of a run's checkpoints
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def storage_uri(path: str) -> str:
    """RunConfig storage_path: URIs as given, local folders absolute (relative = current dir)."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _fs(storage: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)


def _run_folders(storage: str) -> dict[str, tuple[bool, float]]:
    """{run name: (has a checkpoint, mtime)} of the run folders in `storage`."""
    import pyarrow.fs

    fs, base = _fs(storage)
    if fs.get_file_info(base).type != pyarrow.fs.FileType.Directory:
        return {}
    runs = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        children = fs.get_file_info(pyarrow.fs.FileSelector(info.path))
        names = {c.base_name for c in children}
        has_ckpt = RUN_SNAPSHOT in names and any(n.startswith(("checkpoint-", "final-")) for n in names)
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        runs[info.base_name] = (has_ckpt, mtime)
    return runs


def choose_run_name(storage: str, family: str, run_name: str | None, resume: bool) -> str:
    """The Ray run (and MLflow run) name.

    Fresh runs: `run_name`, or `<family>-<YYYYmmdd-HHMMSS>`; an existing folder of that name is
    never resumed silently (error for a given name, a suffix for the default one).
    --resume: `run_name`, or the newest `<family>-*` run with a checkpoint; it must have one.
    """
    if run_name is not None and not _RUN_NAME.fullmatch(run_name):
        raise ParamsError(f"run name {run_name!r} may only contain letters, digits, '_', '-' and '.' "
                          "(starting with a letter or digit, at most 128 characters).")
    runs = _run_folders(storage)
    if resume:
        if run_name is None:
            mine = [(mtime, name) for name, (ok, mtime) in runs.items() if ok and name.startswith(f"{family}-")]
            if not mine:
                raise TrainingError(f"--resume: no {family} run with a checkpoint in {storage}. "
                                    f"Start one with `pipeline train --stage {family}`, or pass --run-name "
                                    "and --params matching the run to continue.")
            return max(mine)[1]
        if run_name not in runs or not runs[run_name][0]:
            what = "has no checkpoint yet" if run_name in runs else "does not exist"
            raise TrainingError(f"--resume: run '{run_name}' in {storage} {what}. Check --run-name (runs "
                                f"with checkpoints: {', '.join(sorted(n for n, (ok, _) in runs.items() if ok)) or 'none'}), "
                                "or train without --resume.")
        return run_name
    if run_name is not None:
        if run_name in runs:
            raise TrainingError(f"run '{run_name}' already exists in {storage}. Pass --resume to continue it, "
                                "choose another --run-name, or delete that folder to start over.")
        return run_name
    base = f"{family}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while name in runs:
        n += 1
        name = f"{base}-{n}"
    return name
