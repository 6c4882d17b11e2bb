"""Atomic writes: nothing is ever left half-written.

Outputs are built in a temporary sibling (same filesystem, so the final rename is atomic) and
moved into place only when complete. A failure removes the temporary and leaves any previous
output untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError


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


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` on success.

    The old `final` (if any) is only removed after the new one is complete.
    """
    final = Path(final)
    ensure_writable_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.absolute().parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700; the final folder gets normal permissions
    try:
        yield tmp
        old = None
        if final.is_dir():
            # Keep hidden files the new output does not replace (DVC's and git's .gitignore).
            for entry in final.iterdir():
                if entry.name.startswith(".") and entry.is_file() and not (tmp / entry.name).exists():
                    shutil.copy2(entry, tmp / entry.name)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator:
    """Open a temporary file that replaces `final` when the block ends without error."""
    final = Path(final)
    ensure_writable_parent(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.absolute().parent)
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
