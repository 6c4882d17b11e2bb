"""Where MLflow runs go, and whether that store can be used (before any work starts).

`MLFLOW_TRACKING_URI` when set (a tracking server `http(s)://host:port`, or any store URI);
otherwise the embedded store `sqlite:///<repo>/mlflow.db`, repo = `pipeline.config.REPO_ROOT` (the
checkout the package is installed from, editable). The repo and not the current directory, because
Ray workers and DVC stages run with other working directories and must all write to the one store.
A sqlite store keeps its artifacts in `mlartifacts/` beside the database file; experiments are
created with that explicit artifact location. A tracking server decides its own.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.config import REPO_ROOT
from pipeline.errors import PipelineError

EXPERIMENT_PREFIX = "defect-synth"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# MLflow 3's UI opens an experiment by this tag: without it, on the GenAI "Overview" (traces), with
# training runs filed under "Evaluation runs"; `custom_model_development` is the model-training view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(PipelineError):
    """The tracking store cannot be used (raised only before training starts)."""


class TrackingWarning(UserWarning):
    """Tracking failed while work went on; the work itself is unaffected."""

    pipeline_warning = True   # printed as one line by pipeline.console


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a relative sqlite path made absolute), else the embedded
    sqlite store at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{REPO_ROOT / DB_FILE}"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():  # workers run elsewhere: pin it to this directory
        return f"sqlite:///{db.resolve()}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(uri: str | None = None) -> Path | None:
    """Folder for artifacts of a sqlite store (`mlartifacts/` beside the db); None for servers."""
    db = _sqlite_path(uri or tracking_uri())
    return db.parent / ARTIFACTS_DIR if db is not None else None


def experiment_name(kind: str) -> str:
    return f"{EXPERIMENT_PREFIX}/{kind}"


def _server_down_message(uri: str, why: str) -> str:
    return (f"the MLflow tracking server at {uri} is not reachable ({why}). Start it with "
            "`pipeline ui` (or the infra server script), or unset MLFLOW_TRACKING_URI to log to the "
            f"embedded store sqlite:///{REPO_ROOT / DB_FILE}.")


def check_tracking(uri: str | None = None, timeout: float = 3.0) -> str:
    """Fail with a TrackingError unless the store at `uri` can be used. Returns the URI.

    http(s): GET <uri>/health, then the experiments search API (proxies may hide /health).
    sqlite: the database folder must be writable.
    """
    uri = uri or tracking_uri()
    if is_http(uri):
        base = uri.rstrip("/")
        why = ""
        for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
            try:
                with urllib.request.urlopen(base + path, timeout=timeout) as resp:
                    if resp.status == 200:
                        return uri
                    why = f"HTTP {resp.status} from {path}"
            except urllib.error.HTTPError as err:
                why = f"HTTP {err.code} from {path}"
            except (urllib.error.URLError, OSError, ValueError) as err:
                reason = getattr(err, "reason", err)
                raise TrackingError(_server_down_message(uri, str(reason))) from None
        raise TrackingError(_server_down_message(uri, why))
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow store folder {db.parent} ({err.strerror}). "
                                "Set MLFLOW_TRACKING_URI to a writable sqlite:///<abs path> or a server.") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow store folder {db.parent} is not writable. "
                                "Set MLFLOW_TRACKING_URI to a writable sqlite:///<abs path> or a server.")
    return uri


def ensure_experiment(client, name: str, uri: str) -> str:
    """Id of experiment `name`, created with an explicit artifact location for sqlite stores and
    tagged as model development, so MLflow's UI opens it on its runs (an older experiment of ours
    without the tag gets it too; one a user set to another kind is left alone)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    root = artifact_root(uri)
    location = (root / name).as_uri() if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
