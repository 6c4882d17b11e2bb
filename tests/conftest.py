"""Shared test set-up: offline, quiet library defaults and small deterministic fixtures."""

import os

for key, value in {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tests share 2 cores; determinism over speed


@pytest.fixture
def tiny_spec():
    from pipeline.models.base import DataSpec

    return DataSpec(resolution=16, channels=3, classes=("normal", "scratch", "spot"))
