"""What a user sees while the pipeline runs: one line when a stage starts and one when it ends,
a progress display in between, and quiet libraries.

Verbosity
    Quiet by default: Ray, Ray Train, Ray Data and MLflow log only errors (set through their own
    settings, see `quiet_env` and `pipeline.cluster.connect`). `pipeline --verbose <command>` or
    `PIPELINE_VERBOSE=1` (e.g. `PIPELINE_VERBOSE=1 dvc repro`) brings all of their output back.
    Errors are never hidden: worker tracebacks reach the driver (log_to_driver stays on, errors
    pass every level set here), and a failed training prints the worker's full traceback.

Progress
    `progress(description, total, unit)` is the one progress display of the package:

        from pipeline.console import progress

        with progress("evaluate", total=len(models), unit="model") as bar:
            for model in models:
                ...
                bar.advance(1, note=model)          # or bar.update(completed=..., note=...)

    How it shows depends on where the output goes (`progress_mode`):
      live   a rich bar on stderr that redraws, removed when done (stderr is a terminal);
      plain  one line every PIPELINE_PROGRESS_INTERVAL_S seconds (default 30), never a redraw:
             under `dvc repro` (DVC sets DVC_STAGE for a stage's command), when stderr is not a
             terminal, or TERM=dumb;
      off    nothing.
    PIPELINE_PROGRESS=live|plain|off overrides the choice. Progress displays opened while one
    is live share it (one row each), so nested work never fights over the terminal.

Stage lines
    `stage(name)` prints `▶ <name>` when entered and `✓ <name>  <summary> (<seconds> s)` when left
    (`✗ ... failed` on an error, whose own message follows). The CLI wraps each command in one;
    libraries print nothing else of their own in the normal case, only warnings about real
    problems (one line each, see `setup`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import warnings
from typing import Any, Iterator, Optional

VERBOSE_ENV = "PIPELINE_VERBOSE"
PROGRESS_ENV = "PIPELINE_PROGRESS"
INTERVAL_ENV = "PIPELINE_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
_TRUE = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- verbosity

def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in _TRUE


def set_verbose(on: bool) -> None:
    """Through the environment, so child processes and a local Ray's workers inherit it."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "ERROR",                  # e.g. "Creating initial MLflow database tables"
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "View run ... at: http://..."
    "RAY_DATA_LOG_LEVEL": "ERROR",                    # "Progress bars disabled", execution plans
    # Ray Train's own logging set-up on the controller and the workers puts their root logger at
    # INFO, and some Train records ("Reporting training result N: TrainingReport(...)") come
    # from a logger its level filter does not cover; without that set-up they follow the job's
    # ray.LoggingConfig (errors only, pipeline.cluster.ray_logging). The controller and the
    # workers inherit them from the node or get them through the job's runtime_env
    # (pipeline.cluster.connect).
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
}


def quiet_env() -> dict[str, str]:
    """Environment that keeps the libraries to errors unless verbose (each is the library's own
    switch, QUIET_ENV). Needed before the library is imported and in every Ray worker."""
    return {} if verbose() else dict(QUIET_ENV)


def setup(verbose_flag: Optional[bool] = None) -> None:
    """Called once by the CLI before any library import: verbosity, library quiet settings, one-line
    warnings, and non-interactive rich output under DVC (so other rich displays never redraw there)."""
    if verbose_flag is not None and (verbose_flag or VERBOSE_ENV not in os.environ):
        set_verbose(verbose_flag)
    for key, value in quiet_env().items():
        os.environ.setdefault(key, value)
    if progress_mode() != "live":
        os.environ.setdefault("TTY_INTERACTIVE", "0")      # rich's own switch: no live redraws
    _one_line_warnings()


def _one_line_warnings() -> None:
    """The package's own warnings (categories with `pipeline_warning = True`, e.g. TrackingWarning
    for a tracking outage) print as one `warning: ...` line; every other warning is shown as before."""
    if getattr(warnings.showwarning, "_pipeline", False):
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if getattr(category, "pipeline_warning", False):
            print_line(f"warning: {message}")
        else:
            previous(message, category, filename, lineno, file, line)

    show._pipeline = True  # type: ignore[attr-defined]
    warnings.showwarning = show


# --------------------------------------------------------------------------- where output goes

def progress_mode() -> str:
    """live | plain | off (see the module docstring)."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("live", "plain", "off"):
        return forced
    if os.environ.get("DVC_STAGE") or os.environ.get("TERM") == "dumb":
        return "plain"
    try:
        return "live" if sys.stderr.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


def interval_s() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


_lock = threading.RLock()
_live: Any = None            # the shared rich Progress while one is on screen
_live_users = 0


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_line(text: str) -> None:
    """One line on stderr; above the live display when one is on screen."""
    with _lock:
        if _live is not None:
            _live.console.print(text, markup=False, highlight=False)
            return
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- stage lines

def stage_name(default: str) -> str:
    """The DVC stage (`train@cyclegan`) when DVC runs us, else `default`."""
    return os.environ.get("DVC_STAGE") or default


class Stage:
    def __init__(self, name: str):
        self.name, self.summary, self.start = name, "", time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


@contextlib.contextmanager
def stage(name: str, what: str = "") -> Iterator[Stage]:
    """`▶ name  what` now, `✓ name  <st.summary> (N s)` at the end (`✗ ... failed` on an error)."""
    st = Stage(name)
    print_line(f"▶ {name}" + (f"  {what}" if what else ""))
    try:
        yield st
    except BaseException as err:
        word = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        print_line(f"✗ {name}  {word} after {st.seconds:.1f} s")
        raise
    print_line(f"✓ {name}  " + (f"{st.summary} " if st.summary else "") + f"({st.seconds:.1f} s)")


# --------------------------------------------------------------------------- progress

def _format_count(value: float, precision: int) -> str:
    return f"{value:.{precision}f}"


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Handle of one progress display (see `progress`). Thread-safe."""

    def __init__(self, description: str, total: Optional[float], unit: str, precision: int, mode: str):
        self.description, self.total, self.unit, self.precision = description, total, unit, precision
        self.mode = mode
        self.completed, self.note = 0.0, ""
        self._start = time.monotonic()
        self._last_line = self._start
        self._rate_from: Optional[tuple[float, float]] = None   # (time, completed) of the first update
        self._task = None

    # ---- public API --------------------------------------------------------------------------
    def update(self, completed: Optional[float] = None, total: Optional[float] = None,
               note: Optional[str] = None) -> None:
        """Set the amount done (same unit as total), the total, and a short free-text note
        (e.g. "95 img/s · D 0.41 · G 2.10")."""
        with _lock:
            now = time.monotonic()
            if total is not None:
                self.total = total
            if completed is not None:
                if self._rate_from is None:
                    self._rate_from = (now, float(completed))
                self.completed = float(completed)
            if note is not None:
                self.note = note
            if self._task is not None and _live is not None:
                _live.update(self._task, completed=self.completed, total=self.total, **self._fields())
            elif self.mode == "plain" and now - self._last_line >= interval_s():
                self._last_line = now
                print_line(self.line())

    def advance(self, amount: float = 1.0, note: Optional[str] = None) -> None:
        with _lock:
            self.update(completed=self.completed + amount, note=note)

    # ---- views -------------------------------------------------------------------------------
    def counts(self) -> str:
        """`0.30/0.60 kimg` (rich has no column for float counts)."""
        done = _format_count(self.completed, self.precision)
        text = f"{done}/{_format_count(self.total, self.precision)}" if self.total else done
        return f"{text} {self.unit}".rstrip()

    def eta_s(self) -> Optional[float]:
        """Seconds left at the average rate since the first update (None before two updates)."""
        if self.total is None or self._rate_from is None:
            return None
        t0, c0 = self._rate_from
        done, elapsed = self.completed - c0, time.monotonic() - t0
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (self.total - self.completed) * elapsed / done)

    def line(self) -> str:
        """The plain-text form: `  train cyclegan: 0.30/0.60 kimg (50%), ETA 6 s, 95 img/s · D 0.41`."""
        head = self.counts()
        if self.total:
            head += f" ({100.0 * self.completed / self.total:.0f}%), ETA {format_eta(self.eta_s())}"
        return f"  {self.description}: {head}" + (f", {self.note}" if self.note else "")

    def _fields(self) -> dict[str, str]:
        eta = f"ETA {format_eta(self.eta_s())}" if self.total else ""
        return {"counts": self.counts(), "eta": eta, "note": self.note}


def _new_live():
    from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

    # ETA is ours (rate since the first update), not rich's: a resumed run's first jump is no speed.
    return RichProgress(
        TextColumn("{task.description}"), BarColumn(bar_width=30), TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[note]}"),
        console=_console(), transient=True, refresh_per_second=4)


@contextlib.contextmanager
def progress(description: str, total: Optional[float] = None, unit: str = "", precision: int = 0
             ) -> Iterator[Progress]:
    """A progress display for one piece of work; see the module docstring. `precision`: decimals
    shown for the counts (2 for kimg)."""
    global _live, _live_users
    mode = progress_mode()
    handle = Progress(description, total, unit, precision, mode)
    if mode != "live":
        yield handle
        return
    with _lock:
        if _live is None:
            _live = _new_live()
            _live.start()
        _live_users += 1
        live = _live
        handle._task = live.add_task(description, total=total, **handle._fields())
    try:
        yield handle
    finally:
        with _lock:
            live.remove_task(handle._task)
            handle._task = None
            _live_users -= 1
            if _live_users == 0:
                live.stop()
                _live = None


__all__ = ["verbose", "set_verbose", "quiet_env", "setup", "progress_mode", "print_line", "stage",
           "stage_name", "progress", "Progress", "format_eta"]
