"""Experiment tracking in MLflow. One job per module; `mlflow_api` is the only one that imports mlflow.

    store.py         where runs go (MLFLOW_TRACKING_URI or <repo>/mlflow.db) and whether the store
                     answers; experiments; TrackingError / TrackingWarning
    mlflow_api.py    the one mlflow import: the client and the MLflow types the loggers send
    run_metadata.py  key sanitising, flattened params, git commit, repro id, tag names
    hashing.py       dataset_hash, the prepared data's identity
    train_logger.py  the driver's TrainTracking plan and rank 0's TrainRunLogger (a Reporter)
    stage_logger.py  generate / evaluate / downstream runs (log_generation, ...), stage_tags
    lineage.py       which training / generate run produced a model file or a synthetic set
    server.py        `pipeline ui`: the supervised MLflow server

Experiments: one per GAN family, "defect-synth/<family>", and one per later stage
("defect-synth/generate", "defect-synth/evaluate", "defect-synth/downstream"), tagged
`mlflow.experimentKind = custom_model_development` so MLflow 3's UI opens them on their runs (the
model-training view) instead of the GenAI overview. Runs are named by stage (and model:
`generate-<model>-<timestamp>`); their lineage tags are also in the run's description
(`mlflow.note.content`) and the registered model version's description, which the UI shows.

Tracing one `dvc repro` across stages
    Every run of one `dvc repro` (or `dvc exp run`) carries the tag `pipeline.repro_id`
    (`repro_id`: the DVC process's start time and pid, or PIPELINE_REPRO_ID to group commands run
    by hand): search `tags.pipeline.repro_id = '<id>'` to see them side by side. Lineage tags say
    which run used what (pipeline/tracking/lineage.py); the CLI puts them around a stage with
    `stage_tags`.

Callers import from the package (`from pipeline import tracking`), which names everything below.
"""

from __future__ import annotations

from pipeline.fsutil import file_sha256  # re-exported: stages and tests hash files through tracking
from pipeline.tracking.hashing import dataset_hash
from pipeline.tracking.lineage import lineage_for_model, lineage_for_synthetic
from pipeline.tracking.run_metadata import (GENERATOR_SHA_TAG, LAUNCH_TAG, MANIFEST_SHA_TAG, MODEL_VERSION_TAG,
                                            NOTE_TAG, REPRO_ENV, REPRO_TAG, default_model_name, flat_params,
                                            git_commit, lineage_note, repro_id, run_context_tags, sanitize_name)
from pipeline.tracking.server import serve_ui, ui_command
from pipeline.tracking.stage_logger import log_downstream, log_evaluation, log_generation, stage_tags
from pipeline.tracking.store import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, TrackingError, TrackingWarning,
                                     artifact_root, check_tracking, ensure_experiment, experiment_name,
                                     tracking_uri)
from pipeline.tracking.train_logger import TrainRunLogger, TrainTracking, plan_training_run

__all__ = ["TrackingError", "TrackingWarning", "TrainTracking", "TrainRunLogger", "tracking_uri",
           "artifact_root", "experiment_name", "check_tracking", "ensure_experiment", "plan_training_run",
           "sanitize_name", "flat_params", "dataset_hash", "git_commit", "log_generation", "log_evaluation",
           "log_downstream", "serve_ui", "ui_command", "repro_id", "run_context_tags", "stage_tags",
           "lineage_for_model", "lineage_for_synthetic", "default_model_name", "file_sha256", "REPRO_TAG",
           "REPRO_ENV", "LAUNCH_TAG", "GENERATOR_SHA_TAG", "MODEL_VERSION_TAG", "MANIFEST_SHA_TAG",
           "NOTE_TAG", "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND", "lineage_note"]
