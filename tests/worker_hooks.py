"""Fault injection for the Ray Train tests: a Reporter wrapper that each worker puts around its
own reporter (`launch_training(..., wrap_reporter=reporter_wrapper(hook_dir))`), so production
code holds no test branch.

In `hook_dir`, on every attempt of every rank: rank<r>.pid (the worker's pid), a line
"<pid> <nimg resumed from>" appended to rank<r>.log, and rank<r>.env.json (the worker's Ray
runtime_env and the environment variables the package sets for Ray Train). A rank that started from scratch waits after
its first checkpoint was reported until <hook_dir>/release exists (having written held-rank<r>),
so a test can kill a worker process at a known point. When <hook_dir>/raise exists, every rank
raises a RuntimeError (a bug, not a PipelineError) as training starts.

Run as a script, `python tests/worker_hooks.py HOOK_DIR <pipeline arguments>` is the `pipeline`
command with the wrapper installed, for tests that need the CLI in a process of its own.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import ray
import ray.cloudpickle

from pipeline.training.loop import Reporter

ENV_KEYS = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")


class HookedReporter(Reporter):
    def __init__(self, inner: Reporter, hook_dir: str, hold_limit_s: float = 300.0):
        self.inner, self.hook_dir, self.hold_limit_s = inner, Path(hook_dir), hold_limit_s
        self.rank = inner.rank
        self.hold = False

    def on_start(self, job, resumed_nimg):
        (self.hook_dir / f"rank{self.rank}.pid").write_text(str(os.getpid()))
        (self.hook_dir / f"rank{self.rank}.env.json").write_text(json.dumps({
            "runtime_env": dict(ray.get_runtime_context().runtime_env),
            **{k: os.environ.get(k) for k in ENV_KEYS}}))
        with open(self.hook_dir / f"rank{self.rank}.log", "a") as fh:
            fh.write(f"{os.getpid()} {resumed_nimg}\n")
        if (self.hook_dir / "raise").exists():
            raise RuntimeError("injected by the test hook: a worker bug")
        self.hold = resumed_nimg == 0
        self.inner.on_start(job, resumed_nimg)

    def on_tick(self, nimg, metrics):
        self.inner.on_tick(nimg, metrics)

    def on_snapshot(self, nimg, metrics, checkpoint_dir, grid_path):
        self.inner.on_snapshot(nimg, metrics, checkpoint_dir, grid_path)
        if self.hold:
            self.hold = False
            (self.hook_dir / f"held-rank{self.rank}").write_text(str(os.getpid()))
            deadline = time.monotonic() + self.hold_limit_s
            while not (self.hook_dir / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def on_end(self, out_dir, metrics, generator):
        self.inner.on_end(out_dir, metrics, generator)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def reporter_wrapper(hook_dir: Path):
    """launch_training's wrap_reporter for `hook_dir`. This module is pickled by value: the Ray
    workers cannot import it from tests/."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return functools.partial(HookedReporter, hook_dir=str(hook_dir))


def install(hook_dir: Path, setattr_=setattr) -> None:
    """Make `pipeline train` (which imports launch_training when it runs) launch with the hooks;
    pass monkeypatch.setattr to have the change undone after a test."""
    from pipeline.training import ray_train

    setattr_(ray_train, "launch_training",
             functools.partial(ray_train.launch_training, wrap_reporter=reporter_wrapper(hook_dir)))


if __name__ == "__main__":
    install(Path(sys.argv[1]))
    from pipeline.cli import app

    sys.exit(app(sys.argv[2:]))
