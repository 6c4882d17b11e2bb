"""The environment variables the package sets for the libraries it drives: one table, one rule.

Rule: a variable that is already set (by the user or a parent process) wins; the package only
fills in what is missing. `apply_defaults` runs when `pipeline` is imported (the CLI, the DVC
stage scripts, the tests, every Ray worker that loads pipeline code), before torch is; processes
that do not import the package first get the table explicitly: the `ray start` nodes of
`pipeline cluster` (`with_defaults`), and the Ray workers of a stage inherit it from the node
(a local Ray started by the stage, or a `cluster up` node started with the same values) or, on
any other cluster, get it through the job's runtime_env (pipeline.cluster.connect). A leaf
module: it imports nothing of the package.
"""

from __future__ import annotations

import os
from typing import Mapping

DEFAULTS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",           # albumentations checks PyPI at import otherwise
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",               # a stray ~/.ray/auth_token breaks joining a node otherwise
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # default 2 s poll costs ~1.7 s per report
    # Ray Train's preemption watcher is one more actor process per fit() (and an error-level
    # core_worker.cc log line about its constructor arguments); on-premise nodes are not preempted.
    # Set it to 1 on spot/preemptible cloud nodes.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train sets this on its controller actor (a runtime_env, so a fresh process); our controller
    # runs without a runtime_env (pipeline.training.ray_cluster) and inherits it from here instead.
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Spinning OpenMP workers stall whenever another process holds a core (measured: the same
    # cyclegan step at 0.06 img/s spinning vs 0.2-0.8 img/s passive under load; bench/README.md).
    # Must be set before torch is imported.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def apply_defaults() -> None:
    """Fill in this process's environment (variables already set are kept)."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def with_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the defaults filled in (its own values kept), for a child process."""
    return {**DEFAULTS, **env}
