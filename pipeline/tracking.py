"""Experiment tracking in MLflow: the only module that imports mlflow.

Where runs go
    `MLFLOW_TRACKING_URI` when set (a tracking server `http(s)://host:port`, or any store URI);
    otherwise the embedded store `sqlite:///<repo>/mlflow.db`, repo = `pipeline.config.REPO_ROOT`
    (the checkout the package is installed from, editable). The repo and not the current
    directory, because Ray workers and DVC stages run with other working directories and must
    all write to the one store. A sqlite store keeps its artifacts in `mlartifacts/` beside the
    database file (`<repo>/mlartifacts/` by default, a tmp folder in tests); experiments are
    created with that explicit artifact location. A tracking server decides its own.

Experiments: one per GAN family, "defect-synth/<family>", and one per later stage
("defect-synth/generate", "defect-synth/evaluate", "defect-synth/downstream").

Training runs
    The driver calls `plan_training_run` before Ray starts: it checks the store answers (a
    `TrackingError` naming the URI and the fix otherwise), creates the experiment and gathers
    params and tags into a `TrainTracking` plan. Rank 0 alone turns the plan into a
    `TrainRunLogger`, which implements the engine's Reporter interface
    (pipeline/training/loop.py): params and tags once, every tick's scalars with step = images
    shown, sample grids under samples/, and at the end the EMA generator as an MLflow model plus
    the final files. Its run id travels in the training checkpoint (`state_dict`), so Ray
    retries and `--resume` continue the same run; steps already logged are not logged again.
    A logging call that fails (server gone) is kept and retried on the next tick; the logger
    warns once per outage and never raises, so training is never lost to tracking.

Other stages call `log_generation` / `log_evaluation` / `log_downstream`, which warn instead
of failing the stage when the store is down.

Model registry
    Every trained generator becomes a version of the registered model `train.common.register_model`
    (default `defect-synth-<family>`), tagged with the dataset hash, the sha256 of
    generator_ema.pt, the git commit, the DVC stage and the repro id.

Tracing one `dvc repro` across stages
    Every run of one `dvc repro` (or `dvc exp run`) carries the tag `pipeline.repro_id`
    (`repro_id`: the DVC process's start time and pid, or PIPELINE_REPRO_ID to group commands run
    by hand): search `tags.pipeline.repro_id = '<id>'` to see them side by side. Lineage tags say
    which run used what (`lineage_for_model` / `lineage_for_synthetic`):
      training run   pipeline.generator_sha256, pipeline.model_version (<name>/<version>)
      generate run   lineage.generator_sha256, lineage.train_run_id, lineage.model_version,
                     pipeline.manifest_sha256 (of the synthetic set's manifest.json)
      evaluate and   lineage.<model>.generate_run_id, lineage.<model>.train_run_id,
      downstream     lineage.<model>.model_version
    The CLI puts them around a stage with `stage_tags`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.config import REPO_ROOT
from pipeline.validation import flatten
from pipeline.errors import PipelineError
from pipeline.fsutil import file_sha256, hash_file  # noqa: F401  (file_sha256 re-exported: stages and tests use it)

EXPERIMENT_PREFIX = "defect-synth"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_NAME = "generator"          # artifact name of the logged EMA generator
LAUNCH_TAG = "pipeline.launch_id"  # one per driver invocation: a retry before any checkpoint finds its run
REPRO_TAG = "pipeline.repro_id"    # the same on every run of one `dvc repro`
REPRO_ENV = "PIPELINE_REPRO_ID"
GENERATOR_SHA_TAG = "pipeline.generator_sha256"
MODEL_VERSION_TAG = "pipeline.model_version"
MANIFEST_SHA_TAG = "pipeline.manifest_sha256"

# Fail fast instead of mlflow's default ~4 minutes of retries: a failed call is retried on the
# next tick by TrainRunLogger anyway. Users can override these in their environment.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(PipelineError):
    """The tracking store cannot be used (raised only before training starts)."""


class TrackingWarning(UserWarning):
    """Tracking failed while work went on; the work itself is unaffected."""

    pipeline_warning = True   # printed as one line by pipeline.console


# --------------------------------------------------------------------------- where runs go

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


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(uri: str | None = None) -> Path | None:
    """Folder for artifacts of a sqlite store (`mlartifacts/` beside the db); None for servers."""
    db = _sqlite_path(uri or tracking_uri())
    return db.parent / ARTIFACTS_DIR if db is not None else None


def experiment_name(kind: str) -> str:
    return f"{EXPERIMENT_PREFIX}/{kind}"


def _client_env() -> None:
    for key, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


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
    if _is_http(uri):
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


def _client(uri: str):
    _client_env()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """Id of experiment `name`, created with an explicit artifact location for sqlite stores."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(uri)
    location = (root / name).as_uri() if root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------- run metadata

_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def sanitize_name(name: str) -> str:
    """A valid MLflow metric/param key: allowed are alphanumerics, _ - . space : and /.

    `D/loss` stays `D/loss`; other characters become `_`; path-like forms MLflow rejects
    (`a//b`, leading `/`, `..`) are normalised.
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    parts = ["_" if p == ".." else p for p in parts]
    return "/".join(parts)[:250] or "_"


def flat_params(config: dict) -> dict[str, str]:
    """Flattened config as MLflow params (string values, MLflow length limit)."""
    return {sanitize_name(k): str(v)[:6000] for k, v in flatten(config).items()}


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the repo, with a `-dirty` suffix when tracked files changed; None without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def repro_id() -> str | None:
    """One id per `dvc repro` / `dvc exp run`, the same in all of its stages: PIPELINE_REPRO_ID when
    set, else (inside a DVC stage, DVC_STAGE set) the start time and pid of the `dvc` process that
    runs the stage; None outside DVC."""
    explicit = os.environ.get(REPRO_ENV, "").strip()
    if explicit:
        return explicit
    if not os.environ.get("DVC_STAGE"):
        return None
    try:
        import psutil

        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return f"dvc-{time.strftime('%Y%m%d-%H%M%S', time.localtime(proc.create_time()))}-{proc.pid}"
    except Exception:  # noqa: BLE001 - no id is better than a failed stage
        return None
    return None


def run_context_tags() -> dict[str, str]:
    """Tags every run gets: repro id, DVC stage and experiment name, git commit (those known)."""
    tags = {REPRO_TAG: repro_id(), "dvc_stage": os.environ.get("DVC_STAGE"),
            "dvc_experiment": os.environ.get("DVC_EXP_NAME")}
    commit = git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")})
    return {k: v for k, v in tags.items() if v}


def default_model_name(family: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{family}"


def dataset_hash(data_dir: Path) -> str:
    """sha256 of the prepared dataset's identity: classes.json and, per Parquet table, the
    (id, split, content_hash) columns in file order (the file bytes when those are missing)."""
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    h = hashlib.sha256()
    for name in ("classes.json", "images.parquet", "paired.parquet"):
        path = data_dir / name
        if not path.exists():
            continue
        h.update(name.encode())
        if path.suffix == ".parquet":
            try:
                table = pq.read_table(path, columns=["id", "split", "content_hash"])
                for col in ("id", "split", "content_hash"):
                    h.update("\x1f".join(table.column(col).to_pylist()).encode())
                continue
            except Exception:  # other layout: hash the bytes
                pass
        hash_file(path, h)
    return h.hexdigest()


def _model_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


# --------------------------------------------------------------------------- training runs

@dataclass
class TrainTracking:
    """What rank 0 needs to log a training run; plain data, built by the driver."""

    uri: str
    experiment: str
    run_name: str
    launch_id: str
    params: dict[str, str]
    tags: dict[str, str]
    register_model: str | None = None
    pip_requirements: list[str] = field(default_factory=list)


def plan_training_run(family: str, run_name: str, launch_id: str, config: dict, data_dir: Path,
                      dvc_stage: str | None, register_model: str | None,
                      tags: dict[str, Any] | None = None) -> TrainTracking:
    """Check the store (TrackingError before any training), create the experiment, collect tags."""
    uri = check_tracking()
    name = experiment_name(family)
    try:
        ensure_experiment(_client(uri), name, uri)
    except Exception as err:
        raise TrackingError(f"cannot use the MLflow store {uri} ({type(err).__name__}: {str(err)[:300]}). "
                            "Check the server / database, or unset MLFLOW_TRACKING_URI.") from None
    all_tags = {"family": family, "dataset_hash": dataset_hash(data_dir), "data_dir": str(data_dir),
                "ray.run_name": run_name, LAUNCH_TAG: launch_id, **run_context_tags()}
    if dvc_stage:
        all_tags["dvc_stage"] = dvc_stage
    all_tags.update(tags or {})
    return TrainTracking(uri=uri, experiment=name, run_name=run_name, launch_id=launch_id,
                         params=flat_params(config), tags={k: str(v) for k, v in all_tags.items()},
                         register_model=register_model or default_model_name(family),
                         pip_requirements=_model_requirements())


class TrainRunLogger:
    """Rank 0's MLflow sink for one training run (the engine's Reporter interface, duck-typed so
    this module does not import the engine). Never raises during training."""

    def __init__(self, plan: TrainTracking, extra_tags: dict[str, Any] | None = None):
        self.plan = plan
        self.extra_tags = {k: str(v) for k, v in (extra_tags or {}).items()}
        self.run_id: str | None = None
        self.last_step = -1               # highest step (nimg) known to be logged
        self.model_uri: str | None = None
        self._pending: list[tuple[str, Any]] = []
        self._ready = False               # run resolved and params/tags sent in this process
        self._warned = False
        self._client = None

    # ---- Reporter interface ------------------------------------------------------------------
    def on_start(self, job, resumed_nimg: int) -> None:
        self._flush()

    def on_tick(self, nimg: int, metrics: dict[str, float]) -> None:
        values = {sanitize_name(k): float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self._pending.append(("metrics", (int(nimg), values)))
        self._flush()

    def on_snapshot(self, nimg, metrics, checkpoint_dir, grid_path) -> None:
        if grid_path is not None:
            self._pending.append(("artifact", (str(grid_path), "samples", int(nimg))))
            self._flush()

    def on_end(self, out_dir: Path | None, metrics: dict[str, float], generator) -> None:
        if out_dir is not None:
            for name in ("metrics.json", "loss_curves.png", "samples.png"):
                if (Path(out_dir) / name).exists():
                    self._pending.append(("artifact", (str(Path(out_dir) / name), "final", None)))
            export = Path(out_dir) / "generator_ema.pt"
            if export.exists():   # delivered byte for byte to models/<family>/: generate finds us by it
                self._pending.append(("tag", (GENERATOR_SHA_TAG, file_sha256(export))))
        if generator is not None:
            self._pending.append(("model", generator))
        self._pending.append(("finish", "FINISHED"))
        for attempt in range(3):
            if self._flush():
                return
            time.sleep(1.0 + attempt)
        n = len(self._pending)
        warnings.warn(f"tracking: {n} logging call(s) could not be sent to {self.plan.uri} at the end of "
                      f"training; MLflow run {self.run_id or '(not created)'} is incomplete. The trained "
                      "model and its files are unaffected.", TrackingWarning, stacklevel=2)

    def state_dict(self) -> dict:
        pending = [list(payload) for kind, payload in self._pending if kind == "metrics"]
        return {"run_id": self.run_id, "last_step": self.last_step, "pending_metrics": pending}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.run_id = state.get("run_id") or self.run_id
        self.last_step = max(self.last_step, int(state.get("last_step", -1)))
        restored = [("metrics", (int(step), dict(values))) for step, values in state.get("pending_metrics", [])]
        self._pending = restored + self._pending
        self._ready = False

    # ---- sending -----------------------------------------------------------------------------
    def _flush(self) -> bool:
        """Send what is pending, in order. False (and one warning per outage) on failure."""
        try:
            if not self._ready:
                self._start_run()
            while self._pending:
                self._send(*self._pending[0])
                self._pending.pop(0)
        except Exception as err:  # tracking must never stop training
            if not self._warned:
                self._warned = True
                warnings.warn(f"tracking: logging to {self.plan.uri} failed ({type(err).__name__}: "
                              f"{str(err)[:200]}); training goes on, {len(self._pending)} call(s) are kept "
                              "and retried each tick.", TrackingWarning, stacklevel=3)
            return False
        if self._warned:
            print(f"tracking: {self.plan.uri} reachable again; buffered calls sent.", file=sys.stderr, flush=True)
            self._warned = False
        return True

    def _start_run(self) -> None:
        """Find or create the run, send params and tags, learn the last logged step."""
        client = self._client = self._client or _client(self.plan.uri)
        exp_id = ensure_experiment(client, self.plan.experiment, self.plan.uri)
        run = None
        if self.run_id:
            try:
                run = client.get_run(self.run_id)
            except Exception as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err) and "not found" not in str(err).lower():
                    raise
                warnings.warn(f"tracking: MLflow run {self.run_id} from the checkpoint no longer exists; "
                              "starting a new run.", TrackingWarning, stacklevel=4)
        if run is None:  # a retry of this launch before any checkpoint: reuse its run
            found = client.search_runs([exp_id], filter_string=f"tags.`{LAUNCH_TAG}` = '{self.plan.launch_id}'",
                                       max_results=1)
            run = found[0] if found else None
        if run is None:
            run = client.create_run(exp_id, run_name=self.plan.run_name, tags=self.plan.tags)
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")

        from mlflow.entities import Param, RunTag

        params = {k: v for k, v in self.plan.params.items() if k not in run.data.params}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i:i + 100])
        tags = [RunTag(k, v) for k, v in {**self.plan.tags, **self.extra_tags}.items()]
        for i in range(0, len(tags), 100):
            client.log_batch(self.run_id, tags=tags[i:i + 100])
        for key in run.data.metrics:  # steps a previous attempt already logged
            history = client.get_metric_history(self.run_id, key)
            if history:
                self.last_step = max(self.last_step, max(m.step for m in history))
        self._ready = True

    def _send(self, kind: str, payload) -> None:
        client = self._client
        if kind == "metrics":
            step, values = payload
            if step <= self.last_step:
                return  # logged before a restart: never duplicate a step
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
            self.last_step = step
        elif kind == "artifact":
            path, folder, _step = payload
            if Path(path).exists():  # files of a dead attempt may be gone; the next grid follows
                client.log_artifact(self.run_id, path, artifact_path=folder)
        elif kind == "model":
            import mlflow
            import mlflow.pytorch

            mlflow.set_tracking_uri(self.plan.uri)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(payload, name=MODEL_NAME, serialization_format="pickle",
                                                pip_requirements=self.plan.pip_requirements)
            self.model_uri = info.model_uri
            client.set_tag(self.run_id, "pipeline.model_uri", info.model_uri)
            if self.plan.register_model:
                self._register(client, info)
        elif kind == "tag":
            client.set_tag(self.run_id, *payload)
        elif kind == "finish":
            client.set_terminated(self.run_id, status=payload)

    def _register(self, client, info) -> None:
        """A new version of the registered model, tagged with what the generator was trained on and
        where it came from. Through the client, not `log_model(registered_model_name=...)`, whose
        fluent path prints "Successfully registered model ..." lines of its own."""
        from mlflow.exceptions import MlflowException

        name = self.plan.register_model
        try:
            client.create_registered_model(name, description="EMA generators trained by the defect-synth "
                                                             "pipeline (pipeline/tracking.py)")
        except MlflowException as err:
            if "ALREADY_EXISTS" not in str(err.error_code):
                raise
        run = client.get_run(self.run_id)
        keep = ("dataset_hash", "family", "git_commit", "dvc_stage", REPRO_TAG, GENERATOR_SHA_TAG, "ray.run_name")
        tags = {k: run.data.tags[k] for k in keep if k in run.data.tags}
        tags["train_run_id"] = self.run_id
        version = client.create_model_version(
            name, source=info.model_uri, run_id=self.run_id, tags=tags, model_id=getattr(info, "model_id", None),
            description=(f"EMA generator of {tags.get('family', '?')} run {tags.get('ray.run_name', self.run_id)}, "
                         f"trained on dataset {tags.get('dataset_hash', '?')[:12]}"))
        client.set_tag(self.run_id, MODEL_VERSION_TAG, f"{name}/{version.version}")


# --------------------------------------------------------------------------- other stages

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
        return _client(uri)
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


def _log_stage(kind: str, params: dict, metrics: dict, artifacts: Iterable[Path],
               tags: dict | None = None) -> str | None:
    """Log one stage's results in "defect-synth/<kind>"; continue MLFLOW_RUN_ID's run when set.

    Returns the run id, or None (with a TrackingWarning) when tracking is unavailable.
    """
    uri = tracking_uri()
    try:
        check_tracking(uri, timeout=2.0)
        from mlflow.entities import Metric, Param, RunTag

        client = _client(uri)
        exp_id = ensure_experiment(client, experiment_name(kind), uri)
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(exp_id, run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}").info.run_id
        all_tags = {"stage": kind, **run_context_tags(), **_STAGE_TAGS, **(tags or {})}
        now = int(time.time() * 1000)
        flat_metrics = {sanitize_name(k): float(v) for k, v in flatten(metrics).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        p = [Param(k, v) for k, v in flat_params(params).items()]
        t = [RunTag(sanitize_name(k), str(v)) for k, v in all_tags.items()]
        m = [Metric(k, v, now, 0) for k, v in flat_metrics.items()]
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
    return _log_stage("generate", params, metrics, artifacts, tags)


def log_evaluation(metrics: dict, artifacts: list[Path]) -> str | None:
    return _log_stage("evaluate", {}, metrics, artifacts)


def log_downstream(metrics: dict, artifacts: list[Path]) -> str | None:
    return _log_stage("downstream", {}, metrics, artifacts)


# --------------------------------------------------------------------------- UI

def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ui_command(host: str, port: int, uri: str | None = None) -> list[str]:
    """`mlflow server` against the pipeline's store: one worker, no job runner (light, ~7 s start)."""
    uri = uri or tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root is not None:  # runs created through the server keep artifacts beside the others
        cmd += ["--artifacts-destination", str(root)]
    return cmd


def serve_ui(host: str = "127.0.0.1", port: int = 5000) -> None:
    """Start the MLflow UI/server on host:port against the same store and block until stopped."""
    uri = tracking_uri()
    if _is_http(uri):
        raise TrackingError(f"MLFLOW_TRACKING_URI points at a server already ({uri}): open it in a browser, "
                            "or unset MLFLOW_TRACKING_URI to serve the embedded store.")
    check_tracking(uri)
    if not _port_free(host, port):
        raise TrackingError(f"port {port} on {host} is in use. Pass --port <free port>, or stop what uses it.")
    root = artifact_root(uri)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI for {uri} at http://{host}:{port}  (Ctrl+C stops it)", flush=True)
    # Own process group: `mlflow server` runs uvicorn as a child; stopping us stops both.
    proc = subprocess.Popen(ui_command(host, port, uri), env=env, start_new_session=True)

    def _stop(signum=None, frame=None):
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _stop_group(proc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        raise TrackingError(f"the MLflow server exited with code {code}; see its output above.")


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; give its children the same signal once more
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        return


__all__ = ["TrackingError", "TrackingWarning", "TrainTracking", "TrainRunLogger", "tracking_uri",
           "artifact_root", "experiment_name", "check_tracking", "ensure_experiment", "plan_training_run",
           "sanitize_name", "flat_params", "dataset_hash", "git_commit", "log_generation", "log_evaluation",
           "log_downstream", "serve_ui", "ui_command", "repro_id", "run_context_tags", "stage_tags",
           "lineage_for_model", "lineage_for_synthetic", "default_model_name", "file_sha256", "REPRO_TAG"]
