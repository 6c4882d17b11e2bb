"""The one module that imports mlflow: a client for a store and the few calls the loggers make
through MLflow's own types. Everything else in pipeline.tracking talks to MLflow through here, so
an MLflow upgrade is read and tested in one place. mlflow is imported inside each function: it
takes seconds to import, and stages that never log must not pay for it."""

from __future__ import annotations

import os
import time

# Fail fast instead of mlflow's default ~4 minutes of retries: a failed call is retried on the
# next tick by TrainRunLogger anyway. Users can override these in their environment.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def client(uri: str):
    """An MlflowClient for the store at `uri`, with the fail-fast HTTP defaults."""
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def params(values: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in values.items()]


def tags(values: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in values.items()]


def metrics(values: dict[str, float], step: int) -> list:
    """Metric entities of one step, stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in values.items()]


def log_torch_model(uri: str, run_id: str, module, name: str, pip_requirements: list[str]):
    """Log `module` as an MLflow pytorch model into run `run_id`; returns MLflow's model info."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(module, name=name, serialization_format="pickle",
                                        pip_requirements=pip_requirements)


def create_registered_model_once(client, name: str, description: str) -> None:
    """Create registered model `name` unless it exists already."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if "ALREADY_EXISTS" not in str(err.error_code):
            raise
