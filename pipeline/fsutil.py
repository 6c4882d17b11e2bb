"""Atomic writes: nothing is ever left half-written, even by a killed process (SIGKILL).

Outputs are built in a temporary folder beside them (same filesystem, so renames are atomic)
and moved into place only when complete:

* `atomic_dir(final)`: one output folder (prepare, generate, evaluate, plots).
* `atomic_entries(folder, tag)`: several outputs that share a folder with others' files (the
  downstream stage's summary.md, downstream.json, downstream_runs.json and plots/ in reports/,
  beside evaluate/). They are replaced together.
* `atomic_file(final)` / `write_text_atomic`: one file.

A failure removes the temporary and leaves any previous output untouched. A kill leaves the
previous output untouched too; what it leaves behind is cleaned up by the next run writing the
same output: temporaries of dead processes are removed and, when the kill came while a
complete new output was being moved into place (a few renames), the next run finishes moving
it first, so a mix of old and new entries never outlives the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

# Temporaries are named ".<tag>.tmp-<pid>@<host>-<random>"; "commit" instead of "tmp" marks a
# complete staged output being moved into place. Only a dead process of this host is cleaned up.
_HOST = re.sub(r"\W", "_", socket.gethostname()) or "host"
_REPLACED = ".~replaced"        # inside a commit folder: the old entries it has moved aside


def ensure_writable_parent(path: Path) -> None:
    """Create `path`'s parent and fail clearly when it cannot be written."""
    parent = Path(path).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"cannot create output folder {parent}: {err.strerror}. "
                            "Choose a writable location or fix its permissions.") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"output folder {parent} is not writable. "
                            "Choose a writable location or fix its permissions.")


def _prefix(tag: str, kind: str = "tmp") -> str:
    return f".{tag}.{kind}-{os.getpid()}@{_HOST}-"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def finish_interrupted(folder: Path, tag: str) -> None:
    """Clean up after killed runs that wrote `tag` into `folder`: finish moving a complete
    staged output into place, remove unfinished temporaries. Live processes' are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(tag)}\.(tmp|commit)-(\d+)@(\w+)-")
    for entry in sorted(folder.iterdir()):
        m = pattern.match(entry.name)
        if not m or m.group(3) != _HOST or _alive(int(m.group(2))):
            continue
        if m.group(1) == "commit":
            _commit(entry, folder)
        else:
            _remove(entry)


def _commit(ready: Path, folder: Path) -> None:
    """Move every entry of `ready` into `folder`, replacing its namesake; then remove `ready`.

    Safe to run again after a kill at any point: an entry still in `ready` is new; one already
    moved is not in `ready` any more; a folder is replaced by moving the old one aside first.
    """
    aside = ready / _REPLACED
    for entry in sorted(ready.iterdir()):
        if entry.name == _REPLACED:
            continue
        final = folder / entry.name
        if (final.is_dir() and not final.is_symlink()) or (entry.is_dir() and final.exists()):
            # os.replace swaps files atomically but cannot replace a folder: move the old aside.
            aside.mkdir(exist_ok=True)
            _remove(aside / entry.name)
            os.rename(final, aside / entry.name)
        os.replace(entry, final)
    shutil.rmtree(ready, ignore_errors=True)


@contextlib.contextmanager
def atomic_entries(folder: Path, tag: str) -> Iterator[Path]:
    """Yield an empty staging folder inside `folder`. When the block ends without error, each
    entry written into it replaces its namesake in `folder`; other entries of `folder` are left
    alone. The new entries are complete before the first one is moved.
    """
    folder = Path(folder)
    ensure_writable_parent(folder / tag)
    finish_interrupted(folder, tag)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(tag), dir=folder.absolute()))
    try:
        yield staging
        ready = staging.with_name(staging.name.replace(".tmp-", ".commit-", 1))
        os.rename(staging, ready)        # complete: from here a killed move is finished by the next run
        _commit(ready, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` on success.

    The old `final` (if any) is only moved aside after the new one is complete. Hidden files of
    the old folder that the new one does not have (DVC's and git's .gitignore) are kept.
    """
    final = Path(final)
    with atomic_entries(final.absolute().parent, final.name) as staging:
        tmp = staging / final.name
        tmp.mkdir(mode=0o777 & ~_umask())
        yield tmp
        if final.is_dir():
            for entry in final.iterdir():
                if entry.name.startswith(".") and entry.is_file() and not (tmp / entry.name).exists():
                    shutil.copy2(entry, tmp / entry.name)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator:
    """Open a temporary file that replaces `final` when the block ends without error."""
    final = Path(final)
    ensure_writable_parent(final)
    finish_interrupted(final.absolute().parent, final.name)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(final.name), dir=final.absolute().parent)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; the final file gets normal permissions
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def hash_file(path: Path, h=None):
    """`h` (default: a new sha256) updated with the file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file (model checkpoints, manifests, Parquet)."""
    return hash_file(path).hexdigest()


def json_safe(obj: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays as Python numbers and lists, keys as strings,
    and NaN or infinite floats as null (json.dumps would write `NaN`, which JSON readers refuse)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
