"""Helpers every stage shares: JSON-safe figures, file hashes, the library environment defaults,
DataSpec's stored form and its compatibility check."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import environment
from pipeline.errors import DataError
from pipeline.fsutil import file_sha256, hash_file, json_safe
from pipeline.models.base import DataSpec


def test_json_safe_turns_numpy_and_non_finite_values_into_plain_json():
    data = {1: np.float32(0.5), "n": np.int64(3), "b": np.bool_(True), "nan": float("nan"),
            "inf": np.float64("inf"), "arr": np.array([[1.5, np.nan], [2.0, 3.0]]), "t": (np.float16(2), "x")}
    safe = json_safe(data)
    assert safe == {"1": 0.5, "n": 3, "b": True, "nan": None, "inf": None, "arr": [[1.5, None], [2.0, 3.0]],
                    "t": [2.0, "x"]}
    text = json.dumps(safe, allow_nan=False)       # strict JSON: would raise on NaN or numpy types
    assert type(json.loads(text)["n"]) is int and type(json.loads(text)["b"]) is bool
    assert json_safe(math.pi) == math.pi and json_safe(None) is None


def test_file_hash_is_the_sha256_of_the_bytes_also_past_one_chunk(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom((1 << 20) + 17)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    h = hashlib.sha256(b"prefix")
    assert hash_file(path, h).hexdigest() == hashlib.sha256(b"prefix" + data).hexdigest()


def test_environment_defaults_fill_in_and_a_set_variable_wins():
    """In a fresh interpreter: importing pipeline fills in every default before torch is imported,
    keeps a value the user set, and a node's environment follows the same rule."""
    key, other = "OMP_WAIT_POLICY", "RAY_USAGE_STATS_ENABLED"
    env = {k: v for k, v in os.environ.items() if k not in environment.DEFAULTS}
    env[key] = "ACTIVE"
    script = ("import os, sys, json\nimport pipeline\nfrom pipeline import cluster, environment\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'env': {k: os.environ.get(k) for k in "
              "environment.DEFAULTS}, 'node': {k: cluster._node_env()[k] for k in environment.DEFAULTS}}))")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["env"][key] == "ACTIVE" and out["node"][key] == "ACTIVE"
    assert out["env"][other] == environment.DEFAULTS[other] == out["node"][other]
    assert {k for k, v in out["env"].items() if v is None} == set()
    assert environment.with_defaults({key: "x"})[key] == "x"


def test_data_spec_round_trips_and_names_what_differs():
    spec = DataSpec(resolution=16, channels=3, classes=("normal", "scratch"))
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert DataSpec.from_dict({**spec.to_dict(), "schema_version": 1, "counts": {}}) == spec   # classes.json
    spec.require_same(DataSpec.from_dict(spec.to_dict()), "model m", "the data d", "Retrain.", DataError)
    other = DataSpec(resolution=16, channels=3, classes=("normal", "spot"))
    with pytest.raises(DataError) as err:
        spec.require_same(other, "model m", "the data d", "Retrain.", DataError)
    assert str(err.value) == ("model m was trained on 16 px, 3 channels, classes ['normal', 'scratch']; the data d "
                              "has 16 px, 3 channels, classes ['normal', 'spot']. Retrain.")
