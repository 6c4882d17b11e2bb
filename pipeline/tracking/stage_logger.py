"""The results of generate, evaluate and downstream, one MLflow run per stage in
"defect-synth/<stage>", named `<stage>-<timestamp>` (generate: `generate-<model>-<timestamp>`), its
lineage tags also written out in the run's description. Tracking never fails a stage: an unusable
store is a TrackingWarning. The CLI wraps a stage in `stage_tags` to add its lineage tags
(pipeline.tracking.lineage)."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Iterable

from pipeline.tracking import mlflow_api
from pipeline.tracking.run_metadata import NOTE_TAG, flat_params, lineage_note, run_context_tags, sanitize_name
from pipeline.tracking.store import TrackingWarning, check_tracking, ensure_experiment, experiment_name, tracking_uri
from pipeline.validation import flatten

_STAGE_TAGS: dict[str, str] = {}


@contextlib.contextmanager
def stage_tags(tags: dict[str, str]):
    """Extra tags (lineage) for every stage run logged inside; the CLI wraps one stage in it."""
    saved = dict(_STAGE_TAGS)
    _STAGE_TAGS.update({k: str(v) for k, v in tags.items()})
    try:
        yield
    finally:
        _STAGE_TAGS.clear()
        _STAGE_TAGS.update(saved)


def _log_stage(kind: str, params: dict, metrics: dict, artifacts: Iterable[Path],
               tags: dict | None = None, model: str | None = None) -> str | None:
    """Log one stage's results in "defect-synth/<kind>"; continue MLFLOW_RUN_ID's run when set.
    A new run is named `<kind>[-<model>]-<timestamp>`.

    Returns the run id, or None (with a TrackingWarning) when tracking is unavailable.
    """
    uri = tracking_uri()
    try:
        check_tracking(uri, timeout=2.0)
        client = mlflow_api.client(uri)
        exp_id = ensure_experiment(client, experiment_name(kind), uri)
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            name = "-".join([kind, *([sanitize_name(model).replace("/", "_")] if model else []),
                             time.strftime("%Y%m%d-%H%M%S")])
            run_id = client.create_run(exp_id, run_name=name).info.run_id
        all_tags = {"stage": kind, **({"model": model} if model else {}), **run_context_tags(), **_STAGE_TAGS,
                    **(tags or {})}
        all_tags[NOTE_TAG] = lineage_note(f"**{kind}**" + (f" with the {model} generator" if model else ""),
                                          {k: str(v) for k, v in all_tags.items()})
        flat_metrics = {sanitize_name(k): float(v) for k, v in flatten(metrics).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        p = mlflow_api.params(flat_params(params))
        t = mlflow_api.tags({sanitize_name(k): str(v) for k, v in all_tags.items()})
        m = mlflow_api.metrics(flat_metrics, step=0)
        for i in range(0, max(len(p), len(t)), 100):
            client.log_batch(run_id, params=p[i:i + 100], tags=t[i:i + 100])
        for i in range(0, len(m), 1000):
            client.log_batch(run_id, metrics=m[i:i + 1000])
        for path in map(Path, artifacts):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=path.name)
            elif path.exists():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
        return run_id
    except Exception as err:  # tracking never fails a stage
        warnings.warn(f"tracking: could not log the {kind} results to {uri} ({type(err).__name__}: "
                      f"{str(err)[:300]}); the stage's outputs are unaffected.", TrackingWarning, stacklevel=3)
        return None


def log_generation(params: dict, metrics: dict, artifacts: list[Path], tags: dict | None = None) -> str | None:
    """The generate run; `params["model"]` (the family whose generator was used) names it."""
    return _log_stage("generate", params, metrics, artifacts, tags, model=params.get("model"))


def log_evaluation(metrics: dict, artifacts: list[Path]) -> str | None:
    return _log_stage("evaluate", {}, metrics, artifacts)


def log_downstream(metrics: dict, artifacts: list[Path]) -> str | None:
    return _log_stage("downstream", {}, metrics, artifacts)
