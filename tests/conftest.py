"""Shared test set-up: offline, quiet library defaults and small deterministic fixtures."""

import pipeline  # noqa: F401  (sets the offline, quiet library defaults before torch is imported)
import pytest
import torch

torch.set_num_threads(1)  # tests share 2 cores; determinism over speed


@pytest.fixture
def tiny_spec():
    from pipeline.models.base import DataSpec

    return DataSpec(resolution=16, channels=3, classes=("normal", "scratch", "spot"))
