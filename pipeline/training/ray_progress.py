"""The live progress of a Ray Train run: rank 0 publishes each tick's figures in Ray's GCS
key-value store (a few hundred bytes per tick, no extra actor); a driver thread polls them and
moves the progress display (pipeline.console.progress: kimg done/total, img/s, ETA, D and G loss)."""

from __future__ import annotations

import json
import threading

from pipeline import console

PROGRESS_NAMESPACE = "defect-synth-progress"       # GCS key-value namespace of the live progress


def progress_figures(metrics: dict) -> dict[str, float]:
    """What the progress display shows of a tick: img/s and the D and G totals."""
    return {k: float(metrics[k]) for k in ("img_per_s", "D/loss", "G/loss") if k in metrics}


def publish_progress(key: str, figures: dict) -> None:
    """Rank 0: put this tick's figures where the driver polls them. Never fails training."""
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key, json.dumps(figures), overwrite=True, namespace=PROGRESS_NAMESPACE)
    except Exception:  # noqa: BLE001 - progress is cosmetic; the run goes on without it
        pass


def progress_note(figures: dict) -> str:
    """`95 img/s · D 0.412 · G 2.1`."""
    parts = []
    if "img_per_s" in figures:
        parts.append(f"{figures['img_per_s']:.0f} img/s")
    parts += [f"{net} {figures[f'{net}/loss']:.3g}" for net in ("D", "G") if f"{net}/loss" in figures]
    return " · ".join(parts)


class ProgressWatch(threading.Thread):
    """Driver side: polls rank 0's figures and moves the progress display; says when Ray Train
    restarted the worker group (a new attempt), so a jump back in kimg is explained."""

    def __init__(self, key: str, bar: "console.Progress", label: str, poll_s: float = 0.5):
        super().__init__(daemon=True, name="train-progress")
        self.key, self.bar, self.label, self.poll_s = key, bar, label, poll_s
        self.stop = threading.Event()
        self.attempts: list[str] = []

    def run(self) -> None:
        from ray.experimental import internal_kv

        last = None
        while not self.stop.wait(self.poll_s):
            try:
                raw = internal_kv._internal_kv_get(self.key, namespace=PROGRESS_NAMESPACE)
            except Exception:  # noqa: BLE001 - Ray going down; nothing to show
                continue
            if raw is None or raw == last:
                continue
            last = raw
            self.show(json.loads(raw))

    def show(self, figures: dict) -> None:
        attempt = figures.get("attempt")
        if attempt not in self.attempts:
            if self.attempts:
                console.print_line(f"  {self.label}: Ray Train restarted the workers; resuming from "
                                   f"{figures.get('nimg', 0) / 1000:.3f} kimg")
            self.attempts.append(attempt)
        note = "workers started" if figures.get("started") else progress_note(figures)
        self.bar.update(completed=figures.get("nimg", 0) / 1000, note=note)

    def close(self) -> None:
        self.stop.set()
        self.join(2.0)
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_del(self.key, namespace=PROGRESS_NAMESPACE)
        except Exception:  # noqa: BLE001
            pass
