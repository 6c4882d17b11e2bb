"""Which run used what, traced through file hashes: the training run and registered model
version behind models/<family>/generator_ema.pt, and the generate run behind a synthetic set.

    training run   pipeline.generator_sha256, pipeline.model_version (<name>/<version>)
    generate run   lineage.generator_sha256, lineage.train_run_id, lineage.model_version,
                   pipeline.manifest_sha256 (of the synthetic set's manifest.json)
    evaluate and   lineage.<model>.generate_run_id, lineage.<model>.train_run_id,
    downstream     lineage.<model>.model_version
Look-ups are optional: without a usable store a stage gets the file hashes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pipeline.fsutil import file_sha256
from pipeline.tracking import mlflow_api
from pipeline.tracking.run_metadata import GENERATOR_SHA_TAG, MANIFEST_SHA_TAG, MODEL_VERSION_TAG
from pipeline.tracking.store import check_tracking, experiment_name, tracking_uri


def _search_one(client, experiment: str, filter_string: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _lineage_client():
    """A client for lineage look-ups, or None when the store is not usable (then no lineage)."""
    uri = tracking_uri()
    try:
        check_tracking(uri, timeout=2.0)
        return mlflow_api.client(uri)
    except Exception:  # noqa: BLE001 - lineage is optional; the stage's own logging warns
        return None


def lineage_for_model(model_dir: Path, client=None) -> dict[str, str]:
    """Tags for a run that uses models/<family>/generator_ema.pt: its sha256, and the training run and
    registered model version that produced it (when the store has them)."""
    export = Path(model_dir) / "generator_ema.pt"
    if not export.exists():
        return {}
    sha = file_sha256(export)
    tags = {"lineage.generator_sha256": sha}
    client = client or _lineage_client()
    if client is None:
        return tags
    try:
        family = Path(model_dir).name
        run = _search_one(client, experiment_name(family), f"tags.`{GENERATOR_SHA_TAG}` = '{sha}'")
    except Exception:  # noqa: BLE001
        return tags
    if run is not None:
        tags["lineage.train_run_id"] = run.info.run_id
        if MODEL_VERSION_TAG in run.data.tags:
            tags["lineage.model_version"] = run.data.tags[MODEL_VERSION_TAG]
    return tags


def lineage_for_synthetic(synthetic_root: Path, models: Iterable[str]) -> dict[str, str]:
    """Tags for a run that reads data/synthetic/<model>/: per model, the generate run that wrote the
    set (found by the manifest's sha256) and the training run / model version behind it."""
    client = _lineage_client()
    tags: dict[str, str] = {}
    for model in models:
        manifest = Path(synthetic_root) / model / "manifest.json"
        if not manifest.exists():
            continue
        sha = file_sha256(manifest)
        tags[f"lineage.{model}.manifest_sha256"] = sha
        if client is None:
            continue
        try:
            run = _search_one(client, experiment_name("generate"), f"tags.`{MANIFEST_SHA_TAG}` = '{sha}'")
        except Exception:  # noqa: BLE001
            continue
        if run is None:
            continue
        tags[f"lineage.{model}.generate_run_id"] = run.info.run_id
        for key in ("train_run_id", "model_version"):
            if f"lineage.{key}" in run.data.tags:
                tags[f"lineage.{model}.{key}"] = run.data.tags[f"lineage.{key}"]
    return tags
