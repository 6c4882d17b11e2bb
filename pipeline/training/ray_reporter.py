"""The engine's Reporter on a Ray Train worker: every snapshot and the end go to Ray Train from
all ranks (Ray's report is collective), rank 0 attaching the engine's checkpoint (which holds every
rank's sampler and RNG state, pipeline/training/loop.py) or the final files; rank 0 also
publishes the live progress and forwards everything to an inner reporter (MLflow's
TrainRunLogger). Never calls MLflow itself."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import ray.train
from ray.train import Checkpoint

from pipeline.training.loop import Reporter
from pipeline.training.ray_progress import progress_figures, publish_progress


class RayReporter(Reporter):
    """Reports to Ray Train from every rank and forwards to `inner` (rank 0's MLflow logger)."""

    def __init__(self, rank: int, inner=None, final_metrics: dict | None = None, run_tag: str = "",
                 progress_key: str | None = None):
        self.rank, self.inner = rank, inner
        self.final_metrics = dict(final_metrics or {})
        self.run_tag = run_tag
        self.progress_key = progress_key if rank == 0 else None
        self.attempt = uuid.uuid4().hex[:8]   # a restarted worker group is a new attempt
        self.report_seconds, self.reports = 0.0, 0

    def on_start(self, job, resumed_nimg):
        if self.progress_key:
            publish_progress(self.progress_key, {"attempt": self.attempt, "nimg": resumed_nimg, "started": True})
        if self.inner is not None:
            self.inner.on_start(job, resumed_nimg)

    def on_tick(self, nimg, metrics):
        if self.progress_key:
            publish_progress(self.progress_key, {"attempt": self.attempt, "nimg": nimg, **progress_figures(metrics)})
        if self.inner is not None:
            self.inner.on_tick(nimg, metrics)

    def on_snapshot(self, nimg, metrics, checkpoint_dir, grid_path):
        if self.inner is not None:
            self.inner.on_snapshot(nimg, metrics, checkpoint_dir, grid_path)
        self._report({**metrics, "nimg": nimg}, checkpoint_dir, f"checkpoint-{nimg:09d}")

    def on_end(self, out_dir, metrics, generator):
        if self.inner is not None:
            self.inner.on_end(out_dir, metrics, generator)
        final = {**metrics, **self.final_metrics, "final": 1,
                 "ray_reports": self.reports + 1, "ray_report_seconds": self.report_seconds}
        if self.inner is not None and getattr(self.inner, "run_id", None):
            final["mlflow_run_id"] = self.inner.run_id
        self._report(final, out_dir, f"final-{int(metrics.get('kimg', 0) * 1000):09d}-{self.run_tag}")

    def _report(self, metrics: dict, directory: Path | None, name: str) -> None:
        """Collective: every rank calls it; `directory` (None = nothing to add) goes to storage."""
        start = time.perf_counter()
        checkpoint = Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)
        self.report_seconds += time.perf_counter() - start
        self.reports += 1

    def state_dict(self):
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state):
        if self.inner is not None:
            self.inner.load_state_dict(state)
