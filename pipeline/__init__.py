"""Synthetic defect dataset pipeline: prepare -> train GANs on Ray -> generate -> evaluate -> downstream."""

import os as _os

__version__ = "0.1.0"

# Offline-safe, quiet defaults for the libraries we drive, set once for the CLI, the DVC stage
# scripts, tests and Ray workers alike (measured on this machine: docs/STACK_NOTES.md). A user's
# own environment wins.
for _key, _value in {
    "NO_ALBUMENTATIONS_UPDATE": "1",           # albumentations checks PyPI at import otherwise
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",               # a second node fails with InvalidAuthToken otherwise
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # default 2 s poll costs ~1.7 s per report
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Spinning OpenMP workers stall whenever another process holds a core (measured: the same
    # cyclegan step at 0.06 img/s spinning vs 0.2-0.8 img/s passive under load; bench/README.md).
    # Must be set before torch is imported, which is why it lives here.
    "OMP_WAIT_POLICY": "PASSIVE",
}.items():
    _os.environ.setdefault(_key, _value)
