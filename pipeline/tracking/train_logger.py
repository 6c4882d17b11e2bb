"""Training runs in MLflow: the driver's plan, and rank 0's logger.

The driver calls `plan_training_run` before Ray starts: it checks the store answers (a
`TrackingError` naming the URI and the fix otherwise), creates the experiment and gathers params
and tags into a `TrainTracking` plan. Rank 0 alone turns the plan into a `TrainRunLogger`, which
implements the engine's Reporter interface (pipeline/training/loop.py): params and tags once,
every tick's scalars with step = images shown, sample grids under samples/, and at the end the EMA
generator as an MLflow model plus the final files. Its run id travels in the training checkpoint
(`state_dict`), so Ray retries and `--resume` continue the same run; steps already logged are not
logged again. A logging call that fails (server gone) is kept and retried on the next tick; the
logger warns once per outage and never raises, so training is never lost to tracking.

Every trained generator becomes a version of the registered model `train.common.register_model`
(default `defect-synth-<family>`), tagged with the dataset hash, the sha256 of generator_ema.pt,
the git commit, the DVC stage and the repro id. The UI shows only some tags of a model version and
folds a run's away, so the same lineage is written into the version's and the run's descriptions.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fsutil import file_sha256
from pipeline.tracking import mlflow_api
from pipeline.tracking.hashing import dataset_hash
from pipeline.tracking.run_metadata import (GENERATOR_SHA_TAG, LAUNCH_TAG, MODEL_VERSION_TAG, NOTE_TAG, REPRO_TAG,
                                            default_model_name, flat_params, lineage_note, run_context_tags,
                                            sanitize_name)
from pipeline.tracking.store import TrackingError, TrackingWarning, check_tracking, ensure_experiment, experiment_name

MODEL_NAME = "generator"          # artifact name of the logged EMA generator


def _model_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


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
        ensure_experiment(mlflow_api.client(uri), name, uri)
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
        self._pending.append(("note", None))     # the description, with the lineage known only now
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
        client = self._client = self._client or mlflow_api.client(self.plan.uri)
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

        params = {k: v for k, v in self.plan.params.items() if k not in run.data.params}
        items = mlflow_api.params(params)
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i:i + 100])
        values = {**self.plan.tags, **self.extra_tags}
        if NOTE_TAG not in run.data.tags:
            values[NOTE_TAG] = self._note({**values, "train_run_id": self.run_id})
        tags = mlflow_api.tags(values)
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
            client.log_batch(self.run_id, metrics=mlflow_api.metrics(values, step))
            self.last_step = step
        elif kind == "artifact":
            path, folder, _step = payload
            if Path(path).exists():  # files of a dead attempt may be gone; the next grid follows
                client.log_artifact(self.run_id, path, artifact_path=folder)
        elif kind == "model":
            info = mlflow_api.log_torch_model(self.plan.uri, self.run_id, payload, MODEL_NAME,
                                              self.plan.pip_requirements)
            self.model_uri = info.model_uri
            client.set_tag(self.run_id, "pipeline.model_uri", info.model_uri)
            if self.plan.register_model:
                self._register(client, info)
        elif kind == "tag":
            client.set_tag(self.run_id, *payload)
        elif kind == "note":
            tags = client.get_run(self.run_id).data.tags
            client.set_tag(self.run_id, NOTE_TAG, self._note({**tags, "train_run_id": self.run_id}))
        elif kind == "finish":
            client.set_terminated(self.run_id, status=payload)

    def _register(self, client, info) -> None:
        """A new version of the registered model, tagged with what the generator was trained on and
        where it came from. Through the client, not `log_model(registered_model_name=...)`, whose
        fluent path prints "Successfully registered model ..." lines of its own."""
        name = self.plan.register_model
        mlflow_api.create_registered_model_once(client, name, description="EMA generators trained by the "
                                                "defect-synth pipeline (pipeline.tracking)")
        run = client.get_run(self.run_id)
        keep = ("dataset_hash", "family", "git_commit", "dvc_stage", REPRO_TAG, GENERATOR_SHA_TAG, "ray.run_name")
        tags = {k: run.data.tags[k] for k in keep if k in run.data.tags}
        tags["train_run_id"] = self.run_id
        title = (f"EMA generator of {tags.get('family', '?')} run {tags.get('ray.run_name', self.run_id)}, "
                 f"trained on dataset {tags.get('dataset_hash', '?')[:12]}")
        version = client.create_model_version(
            name, source=info.model_uri, run_id=self.run_id, tags=tags, model_id=getattr(info, "model_id", None),
            description=title)
        model_version = f"{name}/{version.version}"
        client.set_tag(self.run_id, MODEL_VERSION_TAG, model_version)
        client.update_model_version(name, version.version,
                                    description=lineage_note(title, {**tags, MODEL_VERSION_TAG: model_version}))

    def _note(self, tags: dict[str, str]) -> str:
        """The run's description: what it trained, then its lineage tags."""
        return lineage_note(f"**training** of {tags.get('family', '?')}, run {tags.get('ray.run_name', '?')}", tags)
