"""The downstream stage: does synthetic data help a defect classifier, and a defect segmenter,
with few real defects?

For each few-shot cap in `downstream.shots` and each seed in `downstream.seeds`, one classifier
(classifier.py: class-balanced, early-stopped on the val split) is trained per condition and
scored on the held-out real TEST split:

  real_only                   the capped real training images
  real_classical              + the strong classical preset (flips, rotate90, brightness /
                              contrast, affine; augment.py) applied on the fly
  real_copy_paste             + `synthetic_per_class` copy-paste images per defect class: real
                              training defects cut by their masks, flipped, rotated, placed at
                              random and blended onto real normal training images (copy_paste.py);
                              skipped, with a note, where the data has no defect masks
  real_synth_<model>          + up to `synthetic_per_class` synthetic images per defect class
                              from data/synthetic/<model> (class-labelled samples, label_idx >= 1;
                              samples labelled only "defect" count as the defect class where the
                              data has one, and are skipped with a note otherwise)
  real_synth_<model>_classical  the same images with the strong classical preset on top: for the
                              model whose real_synth_<model> classifiers scored best on val
                              (`synthetic_classical: best`, default) or for every model ("all")

The segmenter (segmenter.py, `downstream.segmenter`): a small U-Net per (shots, seed, condition) on
the same real subset with its masks (normals with empty masks; defect images without a known mask
left out), the same early-stopping rule (on val pixel AP) and the same paired statistics. What the
anomaly-synthesis papers report (DFMGAN, AnomalyDiffusion): pixel AP, pixel F1 (threshold chosen
on val), image AUROC from the maximum pixel score, IoU per defect class, on the real test split.
Its conditions: real_only, real_classical (the same geometry on the mask), real_copy_paste (the
pasted defect's mask), real_draem (DRAEM-style Perlin-mask anomalies on the real normals, draem.py:
the baseline those papers beat), and real_synth_<model> for every synthetic set with masks
(class-labelled or not: a segmenter needs no class). Keys "segment/shots_<k>/<condition>/...".
Each synthetic condition is also compared with copy-paste, paired per seed
("..._vs_copy_paste_{mean,ci_low,ci_high}" of macro-F1 and pixel AP).

Fidelity: the classification accuracy score (CAS, Ravuri & Vinyals 2019): per seed, a
classifier of the defect classes trained on one model's synthetic defects only, scored on the
real test defects, per class; `cas/real` trains on the real training defects (all of them) as
the reference. Needs >= 2 defect classes.

Fairness rules:
  * The cap applies to DEFECT classes: at most `shots` real images per defect class, drawn with
    the run's seed. Normal images are kept uncapped by default (on a production line they are
    plentiful); `downstream.cap_normals: true` caps them at `shots` too. Class-balanced sampling
    keeps the uncapped normals from swamping the defects.
  * Within one (shots, seed) every condition sees the same real subset and starts from the same
    initial weights; every classifier trains under the same early-stopping rule and is selected
    on the real val split. The test split is used for nothing but scoring.
  * Conditions are compared as paired per-seed differences against real_only with a t interval
    (stats.py); "helped" only where the interval excludes 0. A classifier that predicts one
    class for every test image is flagged degenerate.

Speed: images are decoded once per stage; classifiers run in `downstream.workers` processes
(one torch thread each; every classifier is seeded on its own, so results do not depend on it).

Outputs in `out_dir`, replaced together (fsutil.atomic_entries; evaluate/ beside them is left alone):
  downstream.json       flat keys "shots_<k>/<condition>/<metric>_{mean,std}", the paired
                        "<metric>_delta_{mean,ci_low,ci_high}" for balanced_accuracy and macro_f1,
                        "degenerate" (1/0), and "cas/<model>/<metric>_{mean,std}"
  downstream_runs.json  every run (seed, subset sizes, steps, scores, confusion matrix) and notes
  plots/*.png           scores vs shots, paired differences with intervals, confusion matrices
  summary.md            the report (report.py)
MLflow: through `pipeline.tracking.log_downstream(metrics, artifacts)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from pipeline.console import progress
from pipeline.downstream import scores, stats
from pipeline.downstream.augment import strong_classical
from pipeline.downstream.classifier import StopRule, predict, train_classifier
from pipeline.downstream.conditions import (CLASSICAL_SUFFIX, COPY_PASTE, DRAEM, HEADLINE, REFERENCE, SEGMENT, SEGMENT_HEADLINE,
                                           SEGMENT_SCORES, SYNTH_PREFIX)
from pipeline.downstream.copy_paste import classes_without_masks, copy_paste
from pipeline.downstream.draem import draem_anomalies
from pipeline.errors import DataError
from pipeline.fsutil import atomic_entries, json_safe
from pipeline.metrics.data import (ImageSet, PreparedInfo, SyntheticSet, find_model_folders, load_real,
                                   load_synthetic, read_prepared_info)

log = logging.getLogger(__name__)

CAS_REAL = "real"


@dataclass
class Condition:
    name: str
    description: str
    classical: bool = False                       # strong classical preset on the fly
    added: Optional[str] = None                   # None | "copy_paste" | "synthetic"
    synthetic: Optional[SyntheticSet] = None

    @property
    def model(self) -> Optional[str]:
        return self.synthetic.model if self.synthetic is not None else None


def few_shot_indices(labels: np.ndarray, shots: int, seed: int, cap_normals: bool = False) -> np.ndarray:
    """Indices of at most `shots` images per defect class (all normals unless cap_normals), seeded."""
    rng = np.random.default_rng(seed)
    keep = []
    for k in np.unique(labels):
        idx = np.nonzero(labels == k)[0]
        idx = idx[rng.permutation(len(idx))]
        keep.append(idx if (k == 0 and not cap_normals) else idx[:shots])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def synthetic_indices(synth: SyntheticSet, per_class: int, seed: int) -> np.ndarray:
    """Up to `per_class` class-labelled (label_idx >= 1) samples per class, seeded."""
    rng = np.random.default_rng(seed + 1_000_003)
    keep = []
    for k in np.unique(synth.label_idx[synth.label_idx >= 1]):
        idx = np.nonzero(synth.label_idx == k)[0]
        keep.append(idx[rng.permutation(len(idx))][:per_class])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def build_conditions(synth: dict[str, SyntheticSet], copy_paste_ok: bool, notes: list[str],
                     per_model_classical: bool = True, defect_classes: int = 2) -> list[Condition]:
    conds = [Condition(REFERENCE, "real images only"),
             Condition("real_classical", "real + strong classical augmentation (flips, rotate90, "
                                         "brightness/contrast, affine)", classical=True)]
    if copy_paste_ok:
        conds.append(Condition(COPY_PASTE, "real + copy-paste: real training defects cut by their masks, "
                                                  "flipped, rotated, placed at random and blended onto real "
                                                  "normal training images", added="copy_paste"))
    for model, s in synth.items():
        if not s.class_labelled and defect_classes == 1:
            # One defect class: a sample labelled only "defect" can only be of that class.
            s = dataclasses.replace(s, label_idx=np.where(s.label_idx == -1, 1, s.label_idx))
            notes.append(f"{model}: its samples are labelled only 'defect'; the data has one defect class, "
                         "so they count as that class.")
        if not s.class_labelled:
            note = (f"{model}: its samples are labelled only 'defect' (no class chosen), so they cannot "
                    "train a class-labelled classifier; skipped in the downstream comparison and CAS.")
            # Expected for the image-to-image families in the default DAG: a note in summary.md (the
            # stage's end line counts the notes), not a console line of its own.
            log.info(note)
            notes.append(note)
            continue
        conds.append(Condition(f"{SYNTH_PREFIX}{model}", f"real + synthetic images from {model}",
                               added="synthetic", synthetic=s))
        if per_model_classical:
            conds.append(Condition(f"{SYNTH_PREFIX}{model}{CLASSICAL_SUFFIX}",
                                   f"real + synthetic images from {model}, with the strong classical augmentation",
                                   classical=True, added="synthetic", synthetic=s))
    return conds


# --------------------------------------------------------------------------- one classifier (worker side)

@dataclass
class Task:
    """One classifier to train: its data, seed and the evaluation set it is selected/scored on."""

    key: tuple                  # ("downstream" | "segment", shots, seed, condition) | ("cas", model, seed)
    images: np.ndarray
    labels: np.ndarray          # classifier: the targets; segmenter: only for class-balanced draws
    num_classes: int
    seed: int
    classical: bool
    eval_set: str               # "all" (every class) | "defects" (CAS: defect classes, label - 1) | "segment"
    masks: Optional[np.ndarray] = None   # segmenter: the pixel targets (N, 1, H, W) 0/1


_WORKER: dict[str, Any] = {}    # eval sets and training settings, set once per process


def _die_with_parent(parent_pid: int) -> None:
    """Linux: a worker process is killed when the stage process dies (even by SIGKILL) instead of
    training on as an orphan (measured: orphans kept running after a killed stage)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:          # the parent died before prctl took effect
        os._exit(1)


def _init_worker(eval_sets: dict[str, tuple[np.ndarray, ...]], settings: dict[str, Any], threads: Optional[int],
                 parent_pid: Optional[int] = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(eval_sets=eval_sets, settings=settings)


def _run_task(task: Task) -> tuple[tuple, dict[str, Any]]:
    """Train, select on val, predict test: (task key, {"pred", "log"}), or for a segmenter
    (task key, {"scores", "threshold", "log"}): the test scores are computed in the worker, so
    no pixel map travels back."""
    st = _WORKER["settings"]
    if task.key[0] == SEGMENT:
        return task.key, _run_segmenter(task, _WORKER["eval_sets"][task.eval_set], st)
    val_x, val_y, test_x, _ = _WORKER["eval_sets"][task.eval_set]
    model, train_log = train_classifier(task.images, task.labels, task.num_classes, val_images=val_x,
                                        val_labels=val_y, stop=st["stop"], batch_size=st["batch_size"],
                                        lr=st["lr"], seed=task.seed, width=st["width"],
                                        augment=strong_classical if task.classical else None,
                                        precision=st["precision"])
    return task.key, {"pred": predict(model, test_x, precision=st["precision"]), "log": train_log}


def _run_segmenter(task: Task, ev: dict[str, Any], st: dict[str, Any]) -> dict[str, Any]:
    """Train one segmenter (early-stopped on val pixel AP), choose the pixel threshold on val
    (F1-max), score the test split at that threshold."""
    from pipeline.downstream import pixel_scores
    from pipeline.downstream.augment import strong_classical_joint
    from pipeline.downstream.segmenter import SegTrainLog, predict_pixel_scores, train_segmenter

    if not task.masks.any():
        # A subset whose defect images all lack masks has nothing to learn from: no figures (NaN),
        # reported in the runs, instead of a segmenter trained to find nothing.
        nan = float("nan")
        return {"scores": {**{k: nan for k in SEGMENT_SCORES}, **{f"iou_{c}": nan for c in ev["classes"][1:]},
                           "degenerate": False, "skipped": "no defect pixel in the training masks"},
                "threshold": nan, "log": SegTrainLog()}
    stop = dataclasses.replace(st["stop"], max_steps=st["segmenter_max_steps"])
    model, train_log = train_segmenter(task.images, task.masks, task.labels, val_images=ev["val_images"],
                                       val_masks=ev["val_masks"], stop=stop, batch_size=st["segmenter_batch_size"],
                                       lr=st["segmenter_lr"], seed=task.seed, width=st["segmenter_width"],
                                       augment=strong_classical_joint if task.classical else None,
                                       precision=st["precision"])
    val_scores = predict_pixel_scores(model, ev["val_images"], precision=st["precision"])
    threshold, _ = pixel_scores.best_f1_threshold(val_scores, ev["val_masks"][:, 0] > 0)
    test_scores = predict_pixel_scores(model, ev["test_images"], precision=st["precision"])
    found = pixel_scores.segmentation_scores(test_scores, ev["test_masks"][:, 0] > 0, ev["test_labels"],
                                             ev["classes"], threshold)
    predicted = test_scores >= threshold
    # Degenerate: one answer for every test pixel (nothing found, or everything flagged).
    found["degenerate"] = bool(not predicted.any() or predicted.all())
    return {"scores": found, "threshold": float(threshold), "log": train_log}


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:                      # not Linux
        return max(1, os.cpu_count() or 1)


class TaskRunner:
    """Runs Tasks in this process (workers 1) or in spawned worker processes; more tasks may be
    submitted while results come in. Each classifier runs on one torch thread either way, so the
    results are the same for any worker count."""

    def __init__(self, eval_sets: dict, settings: dict, workers: int, total: int):
        self.eval_sets, self.settings, self.workers, self.total = eval_sets, settings, workers, total
        self._queue: list[Task] = []
        self._futures: set = set()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "TaskRunner":
        if self.workers > 1:
            # fork where there is one: a spawned worker re-imports torch (~4 CPU-s, 15-20 s wall on
            # this machine under load, measured) and gets the images pickled. A forked worker runs
            # torch on one thread from its first call (_init_worker), the pattern of torch's own
            # DataLoader workers, so the parent's OpenMP pool is never entered after the fork.
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            self._pool = self._stack.enter_context(ProcessPoolExecutor(
                max_workers=self.workers, mp_context=get_context(method), initializer=_init_worker,
                initargs=(self.eval_sets, self.settings, 1, os.getpid())))
            # The first submit starts every worker (all at once for fork): do it before the progress
            # display starts its thread, so no thread of ours is forked in the middle of a write.
            self._pool.submit(int).result()
        else:
            self._pool = None
            _init_worker(self.eval_sets, self.settings, None)
            self._stack.enter_context(_torch_threads(1))
        self._bar = self._stack.enter_context(progress("downstream classifiers and segmenters", total=self.total, unit="model"))
        return self

    def __exit__(self, *exc) -> None:
        for fut in self._futures:
            fut.cancel()
        self._stack.close()

    def submit(self, tasks: list[Task]) -> None:
        if self._pool is None:
            self._queue.extend(tasks)
        else:
            self._futures.update(self._pool.submit(_run_task, t) for t in tasks)

    def completed(self) -> Iterator[tuple[tuple, dict]]:
        """(key, result) as tasks finish, including tasks submitted while iterating."""
        while self._queue or self._futures:
            if self._pool is None:
                done = [_run_task(self._queue.pop(0))]
            else:
                finished, _ = wait(self._futures, return_when=FIRST_COMPLETED)
                self._futures -= finished
                done = [f.result() for f in finished]
            for item in done:
                self._bar.advance(1)
                yield item


# --------------------------------------------------------------------------- the stage

def _score(y_true: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    return {"accuracy": scores.accuracy(y_true, pred),
            "balanced_accuracy": scores.balanced_accuracy(y_true, pred, num_classes),
            "macro_f1": scores.macro_f1(y_true, pred, num_classes),
            "recall": scores.per_class_recall(y_true, pred, num_classes).tolist(),
            "confusion": scores.confusion_matrix(y_true, pred, num_classes).tolist(),
            "degenerate": scores.is_degenerate(pred),
            "predicted_classes": sorted(int(c) for c in np.unique(pred))}


def _log_fields(train_log) -> dict[str, Any]:
    return {"steps": train_log.steps, "best_step": train_log.best_step, "stopped_by": train_log.stopped_by,
            "val_balanced_accuracy": train_log.best_val_balanced_accuracy, "val_loss": train_log.best_val_loss,
            "history": [list(h) for h in train_log.history]}       # (step, val balanced accuracy, val loss)


def run_downstream(params, prepared_dir: Path, synthetic_root: Path, out_dir: Path, models: list[str], *,
                   evaluate_dir: Optional[Path] = None) -> dict:
    """Train and score every (shots, seed, condition) and the CAS runs; write downstream.json,
    downstream_runs.json, plots and summary.md. Returns the flat metrics of downstream.json.
    `evaluate_dir` (default `out_dir/evaluate`) is where the evaluate stage's table.md is looked for.
    """
    prepared_dir, synthetic_root, out_dir = Path(prepared_dir), Path(synthetic_root), Path(out_dir)
    # ---- inputs checked (and decoded, once) before any training
    info = read_prepared_info(prepared_dir)
    found, notes = find_model_folders(synthetic_root, models)
    synth = {m: load_synthetic(p, info, m) for m, p in found.items()}
    train = load_real(prepared_dir, ["train"])
    val = load_real(prepared_dir, ["val"])
    test = load_real(prepared_dir, ["test"])
    if len(test) == 0:
        raise DataError(f"{prepared_dir} has no test images: the downstream classifier is scored on the "
                        "held-out test split. Re-run `pipeline prepare` with prepare.split.test > 0.")
    if len(val) == 0:
        raise DataError(f"{prepared_dir} has no val images: the downstream classifier is early-stopped and "
                        "selected on the val split. Re-run `pipeline prepare` with prepare.split.val > 0.")
    if len(np.unique(train.labels[train.labels >= 1])) == 0:
        raise DataError(f"{prepared_dir} has no defect images in the training split; nothing to compare.")
    num_classes = len(info.classes)
    missing_val = [info.classes[k] for k in range(num_classes) if not (val.labels == k).any()]
    if missing_val:
        notes.append(f"the val split has no images of {missing_val}: model selection uses the other classes.")

    no_masks = classes_without_masks(train.masks, train.labels, num_classes)
    defect_classes = [k for k in range(1, num_classes) if (train.labels == k).any()]
    copy_paste_ok = len(no_masks) < len(defect_classes)
    if not copy_paste_ok:
        notes.append(f"copy-paste needs defect masks and {prepared_dir} has none (every defect training image "
                     "has an empty mask), so the copy-paste baseline was not run.")
    elif no_masks:
        notes.append(f"copy-paste: classes {[info.classes[k] for k in no_masks]} have no masked training "
                     "images, so copy-paste adds no images of them.")
    conditions = build_conditions(synth, copy_paste_ok, notes, params.synthetic_classical == "all",
                                  num_classes - 1)
    seg_eval = _segment_eval_set(val, test, info, notes) if params.segmenter else None
    seg_conditions = (build_segment_conditions(synth, copy_paste_ok, bool((train.labels == 0).any()), notes)
                      if seg_eval is not None else [])

    # ---- the classifiers to train
    subsets: dict[tuple, dict[str, Any]] = {}
    real_sets: dict[tuple[int, int], tuple[ImageSet, Optional[tuple[np.ndarray, np.ndarray]]]] = {}
    for shots in params.shots:
        short = [info.classes[k] for k in range(1, num_classes) if 0 < int((train.labels == k).sum()) < shots]
        if short:
            notes.append(f"shots {shots}: classes {short} have fewer real training images than the cap; "
                         "all of theirs are used.")
        for seed in params.seeds:
            real = train.take(few_shot_indices(train.labels, shots, seed, params.cap_normals))
            pasted = (copy_paste(real.images, real.masks, real.labels, params.synthetic_per_class, seed,
                                 params.copy_paste_blend_sigma) if copy_paste_ok else None)
            real_sets[shots, seed] = (real, pasted)

    def downstream_task(cond: Condition, shots: int, seed: int) -> Task:
        real, pasted = real_sets[shots, seed]
        x, y = real.images, real.labels
        if cond.added == "copy_paste":
            x, y = np.concatenate([x, pasted[0]]), np.concatenate([y, pasted[1]])
        elif cond.added == "synthetic":
            idx = synthetic_indices(cond.synthetic, params.synthetic_per_class, seed)
            x = np.concatenate([x, cond.synthetic.images[idx]])
            y = np.concatenate([y, cond.synthetic.label_idx[idx]])
        key = ("downstream", shots, seed, cond.name)
        subsets[key] = {"n_train": int(len(y)), "n_real": int(len(real)), "n_added": int(len(y) - len(real)),
                        "train_per_class": np.bincount(y, minlength=num_classes).tolist()}
        return Task(key, x, y, num_classes, seed, cond.classical, "all")

    # real + synthetic first: with synthetic_classical "best", the synthetic + classical runs wait for them
    order = sorted(conditions, key=lambda c: c.added != "synthetic")
    tasks = [downstream_task(c, shots, seed) for c in order for shots in params.shots for seed in params.seeds]
    eval_sets = {"all": (val.images, val.labels, test.images, test.labels)}
    cas_models = _cas_sources(conditions, train, params, notes, num_classes, val, test)
    if cas_models:
        dv, dt = val.labels >= 1, test.labels >= 1
        eval_sets["defects"] = (val.images[dv], val.labels[dv] - 1, test.images[dt], test.labels[dt] - 1)
        for seed in params.seeds:
            for name, source in cas_models.items():
                x, y = source(seed)
                key = ("cas", name, seed)
                subsets[key] = {"n_train": int(len(y)), "train_per_class": np.bincount(y, minlength=num_classes - 1).tolist()}
                tasks.append(Task(key, x, y, num_classes - 1, seed, False, "defects"))

    def segment_task(cond: Condition, shots: int, seed: int) -> Task:
        real, pasted = real_sets[shots, seed]
        known = real.known_masks()           # a defect image without a mask cannot teach where it is
        x, m, y = real.images[known], real.masks[known], real.labels[known]
        if cond.added == "copy_paste":
            x, m, y = np.concatenate([x, pasted[0]]), np.concatenate([m, pasted[2]]), np.concatenate([y, pasted[1]])
        elif cond.added == "draem":
            count = params.synthetic_per_class * len(defect_classes)
            ax, am = draem_anomalies(real.images[real.labels == 0], count, seed, texture=params.draem_texture,
                                     area_range=tuple(params.draem_area))
            x, m = np.concatenate([x, ax]), np.concatenate([m, am])
            y = np.concatenate([y, _spread_over(defect_classes, count)])
        elif cond.added == "synthetic":
            s = cond.synthetic
            idx = segment_synthetic_indices(s, params.synthetic_per_class * len(defect_classes), seed)
            labels = s.label_idx[idx]
            unlabelled = labels < 1
            labels[unlabelled] = _spread_over(defect_classes, int(unlabelled.sum()))
            x, m, y = np.concatenate([x, s.images[idx]]), np.concatenate([m, s.masks[idx]]), np.concatenate([y, labels])
        key = (SEGMENT, shots, seed, cond.name)
        subsets[key] = {"n_train": int(len(y)), "n_real": int(known.sum()), "n_added": int(len(y) - known.sum()),
                        "train_per_class": np.bincount(y, minlength=num_classes).tolist()}
        return Task(key, x, y, num_classes, seed, cond.classical, SEGMENT, masks=m)

    if seg_eval is not None:
        eval_sets[SEGMENT] = seg_eval
        tasks += [segment_task(c, shots, seed) for c in seg_conditions for shots in params.shots
                  for seed in params.seeds]

    synth_conds = [c for c in conditions if c.added == "synthetic" and not c.classical]
    later = len(params.shots) * len(params.seeds) if params.synthetic_classical == "best" and synth_conds else 0
    settings = {"stop": StopRule(params.eval_every, params.patience, params.min_steps, params.max_steps),
                "batch_size": params.batch_size, "lr": params.lr, "width": params.width,
                "precision": params.precision, "segmenter_lr": params.segmenter_lr,
                "segmenter_width": params.segmenter_width, "segmenter_batch_size": params.segmenter_batch_size,
                "segmenter_max_steps": params.segmenter_max_steps}
    workers = min(params.workers or default_workers(), len(tasks))
    results: dict[tuple, dict] = {}
    with TaskRunner(eval_sets, settings, workers, len(tasks) + later) as runner:
        runner.submit(tasks)
        waiting = {("downstream", s, seed, c.name) for c in synth_conds for s in params.shots for seed in params.seeds}
        for key, out in runner.completed():
            results[key] = out
            if later and waiting and waiting <= results.keys():
                waiting = set()
                best = _best_on_val(synth_conds, results, params)
                cond = Condition(f"{SYNTH_PREFIX}{best.model}{CLASSICAL_SUFFIX}",
                                 f"real + synthetic images from {best.model} (the synthetic set whose real + "
                                 "synthetic classifiers scored best on val), with the strong classical augmentation",
                                 classical=True, added="synthetic", synthetic=best.synthetic)
                conditions.append(cond)
                extra = [downstream_task(cond, shots, seed) for shots in params.shots for seed in params.seeds]
                tasks += extra
                runner.submit(extra)

    # ---- scores, in task order (independent of which worker finished first)
    runs: list[dict[str, Any]] = []
    for task in tasks:
        out = results[task.key]
        if task.key[0] == SEGMENT:
            runs.append({"kind": SEGMENT, "shots": task.key[1], "seed": task.seed, "condition": task.key[3],
                         **subsets[task.key], **_segment_log_fields(out["log"]), "threshold": out["threshold"],
                         **out["scores"]})
            continue
        y_test = eval_sets[task.eval_set][3]
        head = ({"kind": "downstream", "shots": task.key[1], "seed": task.seed, "condition": task.key[3]}
                if task.key[0] == "downstream" else {"kind": "cas", "model": task.key[1], "seed": task.seed})
        runs.append({**head, **subsets[task.key], **_log_fields(out["log"]),
                     **_score(y_test, out["pred"], task.num_classes)})
    order = {"downstream": 0, SEGMENT: 1, "cas": 2}
    runs.sort(key=lambda r: (order[r["kind"]], r.get("shots", 0), r["seed"]))

    metrics = aggregate(runs, info.classes, params.shots, [c.name for c in conditions], params.ci_level)
    metrics.update(aggregate_segmentation(runs, info.classes, params.shots, [c.name for c in seg_conditions],
                                          params.ci_level))
    write_outputs(out_dir, metrics, runs, notes, conditions, info, params, prepared_dir, synthetic_root,
                  evaluate_dir if evaluate_dir is not None else out_dir / "evaluate", test, val, workers,
                  seg_conditions, seg_eval)
    return metrics


def _spread_over(classes: list[int], count: int) -> np.ndarray:
    """Labels for added images that carry no class (DRAEM anomalies, "defect" samples): spread evenly
    over the defect classes. They only steer the segmenter's class-balanced draws."""
    return np.resize(np.asarray(classes, np.int64), count) if classes else np.ones(count, np.int64)


def _segment_log_fields(train_log) -> dict[str, Any]:
    return {"steps": train_log.steps, "best_step": train_log.best_step, "stopped_by": train_log.stopped_by,
            "val_pixel_ap": train_log.best_val_pixel_ap,
            "history": [list(h) for h in train_log.history]}


def _segment_eval_set(val: ImageSet, test: ImageSet, info: PreparedInfo, notes: list[str]) -> Optional[dict]:
    """The segmenter's val and test images: those whose mask is known (normals always). None, with a
    note, where the test or val split has no defect image with a mask (nothing to score)."""
    vk, tk = val.known_masks(), test.known_masks()
    has_defect = lambda s, k: bool((s.masks[k & (s.labels >= 1)].reshape(-1) > 0).any())  # noqa: E731
    if not has_defect(test, tk) or not has_defect(val, vk):
        notes.append("the segmenter needs defect images with pixel masks in the val and test splits; there are "
                     "none, so the segmentation comparison was not run.")
        return None
    dropped = int((~tk).sum() + (~vk).sum())
    if dropped:
        notes.append(f"segmenter: {dropped} val/test defect image(s) without a pixel mask are left out of its "
                     "selection and scores.")
    return {"val_images": val.images[vk], "val_masks": val.masks[vk], "test_images": test.images[tk],
            "test_masks": test.masks[tk], "test_labels": test.labels[tk], "classes": list(info.classes),
            "test_per_class": np.bincount(test.labels[tk], minlength=len(info.classes)).tolist()}


def build_segment_conditions(synth: dict[str, SyntheticSet], copy_paste_ok: bool, have_normals: bool,
                             notes: list[str]) -> list[Condition]:
    """The segmenter's conditions: real only, classical, copy-paste, DRAEM-style anomalies, and every
    synthetic set whose samples carry masks (class-labelled or not: a segmenter needs no class)."""
    conds = [Condition(REFERENCE, "real images with their masks"),
             Condition("real_classical", "real + strong classical augmentation, the same geometry on the mask",
                       classical=True)]
    if copy_paste_ok:
        conds.append(Condition(COPY_PASTE, "real + copy-paste, the pasted defect's mask as target",
                               added="copy_paste"))
    if have_normals:
        conds.append(Condition(DRAEM, "real + DRAEM-style anomalies: Perlin-noise masks on real normal training "
                                      "images, filled with foreign texture (Zavrtanik et al. 2021)", added="draem"))
    else:
        notes.append("segmenter: no normal training image, so the DRAEM-style baseline was not run.")
    for model, s in synth.items():
        if not s.masks.any():
            notes.append(f"segmenter: {model}'s samples carry no mask (it draws whole images), so it has no "
                         "segmentation condition.")
            continue
        conds.append(Condition(f"{SYNTH_PREFIX}{model}", f"real + synthetic images and masks from {model}",
                               added="synthetic", synthetic=s))
    return conds


def segment_synthetic_indices(synth: SyntheticSet, total: int, seed: int) -> np.ndarray:
    """Up to `total` samples with a non-empty mask for the segmenter: per class as the classifier
    draws them (`synthetic_indices`) where the samples carry classes, else `total` drawn at random."""
    has_mask = synth.masks.reshape(len(synth), -1).any(axis=1)
    if synth.class_labelled:
        n_classes = max(1, len(np.unique(synth.label_idx[synth.label_idx >= 1])))
        idx = synthetic_indices(synth, total // n_classes, seed)
        return idx[has_mask[idx]]
    rng = np.random.default_rng(seed + 2_000_003)
    pool = np.flatnonzero(has_mask)
    return np.sort(pool[rng.permutation(len(pool))][:total])


def _best_on_val(synth_conds: list[Condition], results: dict[tuple, dict], params) -> Condition:
    """The real + synthetic condition with the highest mean val balanced accuracy over every
    (shots, seed); ties go to the earlier model of generate.models. Chosen on val, never on test."""
    def mean_val(c: Condition) -> float:
        return float(np.mean([results[("downstream", s, seed, c.name)]["log"].best_val_balanced_accuracy
                              for s in params.shots for seed in params.seeds]))
    return max(synth_conds, key=mean_val)         # max keeps the first of equal values


def _cas_sources(conditions: list[Condition], train: ImageSet, params, notes: list[str], num_classes: int,
                 val: ImageSet, test: ImageSet) -> dict[str, Any]:
    """{name: seed -> (images, labels - 1)} for the CAS runs: each model's synthetic defects and the
    real training defects as the reference; {} (with a note) where CAS cannot be computed."""
    if num_classes - 1 < 2:
        notes.append("CAS (train on synthetic only, test on real) needs at least 2 defect classes; this data "
                     f"has {num_classes - 1}, so it was not computed.")
        return {}
    if not (test.labels >= 1).any() or not (val.labels >= 1).any():
        notes.append("CAS needs defect images in the val and test splits; there are none, so it was not computed.")
        return {}
    sources: dict[str, Any] = {}
    real_defects = train.labels >= 1
    sources[CAS_REAL] = lambda seed: (train.images[real_defects], train.labels[real_defects] - 1)
    for cond in conditions:
        if cond.added == "synthetic" and not cond.classical:
            s = cond.synthetic

            def from_model(seed: int, s: SyntheticSet = s) -> tuple[np.ndarray, np.ndarray]:
                idx = synthetic_indices(s, params.synthetic_per_class, seed)
                return s.images[idx], s.label_idx[idx] - 1
            if len(np.unique(s.label_idx[s.label_idx >= 1])) < 2:
                notes.append(f"CAS of {s.model}: its samples cover fewer than 2 defect classes; not computed.")
                continue
            sources[s.model] = from_model
    return sources


# --------------------------------------------------------------------------- aggregation

def aggregate(runs: list[dict], classes: list[str], shots_list: list[int], conditions: list[str],
              ci_level: float = 0.95) -> dict[str, float]:
    """Flat metrics: per (shots, condition) mean/std of the scores, the paired differences against
    real_only with their t interval, the degenerate flag; per CAS source mean/std per class."""
    flat: dict[str, float] = {}
    down = [r for r in runs if r["kind"] == "downstream"]
    for shots in shots_list:
        ref = {r["seed"]: r for r in down if r["shots"] == shots and r["condition"] == REFERENCE}
        for cond in conditions:
            group = [r for r in down if r["shots"] == shots and r["condition"] == cond]
            if not group:
                continue
            key = f"shots_{shots}/{cond}"
            _condition_stats(flat, key, group, ref, ("accuracy",) + HEADLINE, HEADLINE, ci_level)
            for k, cls in enumerate(classes):
                flat[f"{key}/recall_{cls}_mean"], flat[f"{key}/recall_{cls}_std"] = \
                    stats.mean_std([r["recall"][k] for r in group])
        _versus_copy_paste(flat, f"shots_{shots}/", down, shots, conditions, "macro_f1", ci_level)
    for name in dict.fromkeys(r["model"] for r in runs if r["kind"] == "cas"):
        group = [r for r in runs if r["kind"] == "cas" and r["model"] == name]
        key = f"cas/{name}"
        for m in ("accuracy", "balanced_accuracy"):
            flat[f"{key}/{m}_mean"], flat[f"{key}/{m}_std"] = stats.mean_std([r[m] for r in group])
        for k, cls in enumerate(classes[1:]):
            flat[f"{key}/recall_{cls}_mean"], flat[f"{key}/recall_{cls}_std"] = \
                stats.mean_std([r["recall"][k] for r in group])
        flat[f"{key}/degenerate"] = float(any(r["degenerate"] for r in group))
    return flat


def _condition_stats(flat: dict[str, float], key: str, group: list[dict], ref: dict[int, dict],
                     names: tuple[str, ...], paired_names: tuple[str, ...], ci_level: float) -> None:
    """One condition's figures into `flat` under `key`: mean/std per score, the paired per-seed
    differences against the reference runs `ref` ({seed: run}) with their t interval for
    `paired_names`, the degenerate flag, the mean training size and steps. Shared by the
    classifier and the segmenter, so both are compared by the same statistics."""
    for name in names:
        flat[f"{key}/{name}_mean"], flat[f"{key}/{name}_std"] = stats.mean_std([r[name] for r in group])
        paired = [r[name] - ref[r["seed"]][name] for r in group if r["seed"] in ref]
        if name in paired_names and paired:
            (flat[f"{key}/{name}_delta_mean"], flat[f"{key}/{name}_delta_ci_low"],
             flat[f"{key}/{name}_delta_ci_high"]) = stats.paired_t_interval(paired, ci_level)
    flat[f"{key}/degenerate"] = float(any(r["degenerate"] for r in group))
    flat[f"{key}/degenerate_seeds"] = float(sum(r["degenerate"] for r in group))
    flat[f"{key}/n_train"] = float(np.mean([r["n_train"] for r in group]))
    flat[f"{key}/steps_mean"] = float(np.mean([r["steps"] for r in group]))


def _versus_copy_paste(flat: dict[str, float], prefix: str, group_runs: list[dict], shots: int,
                       conditions: list[str], name: str, ci_level: float) -> None:
    """Each synthetic condition against copy-paste (the baseline a practitioner tries first), paired
    per seed like every other comparison: "<prefix><condition>/<name>_vs_copy_paste_{mean,ci_low,ci_high}"."""
    paste = {r["seed"]: r for r in group_runs if r["shots"] == shots and r["condition"] == COPY_PASTE}
    if not paste:
        return
    for cond in conditions:
        if not cond.startswith(SYNTH_PREFIX):
            continue
        d = [r[name] - paste[r["seed"]][name] for r in group_runs
             if r["shots"] == shots and r["condition"] == cond and r["seed"] in paste]
        if d:
            key = f"{prefix}{cond}/{name}_vs_copy_paste"
            flat[f"{key}_mean"], flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = stats.paired_t_interval(d, ci_level)


def aggregate_segmentation(runs: list[dict], classes: list[str], shots_list: list[int], conditions: list[str],
                           ci_level: float = 0.95) -> dict[str, float]:
    """The segmenter's flat figures, keys "segment/shots_<k>/<condition>/...": mean/std of pixel AP,
    pixel F1, image AUROC, mean IoU and IoU per defect class, paired differences against real_only
    for SEGMENT_HEADLINE, the degenerate flag (`_condition_stats`, as for the classifier)."""
    flat: dict[str, float] = {}
    seg = [r for r in runs if r["kind"] == SEGMENT]
    names = SEGMENT_SCORES + tuple(f"iou_{c}" for c in classes[1:])
    for shots in shots_list:
        ref = {r["seed"]: r for r in seg if r["shots"] == shots and r["condition"] == REFERENCE}
        for cond in conditions:
            group = [r for r in seg if r["shots"] == shots and r["condition"] == cond]
            if group:
                _condition_stats(flat, f"{SEGMENT}/shots_{shots}/{cond}", group, ref,
                                 tuple(n for n in names if n in group[0]), SEGMENT_HEADLINE, ci_level)
        _versus_copy_paste(flat, f"{SEGMENT}/shots_{shots}/", seg, shots, conditions, SEGMENT_HEADLINE[0], ci_level)
    return flat


def majority_baseline(test_labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Scores of always predicting the test split's most frequent class: what a degenerate
    classifier gets, the floor every condition must clear."""
    pred = np.full(len(test_labels), int(np.argmax(np.bincount(test_labels, minlength=num_classes))))
    return {"accuracy": scores.accuracy(test_labels, pred),
            "balanced_accuracy": scores.balanced_accuracy(test_labels, pred, num_classes),
            "macro_f1": scores.macro_f1(test_labels, pred, num_classes)}


def write_outputs(out_dir: Path, metrics: dict, runs: list[dict], notes: list[str], conditions: list[Condition],
                  info: PreparedInfo, params, prepared_dir: Path, synthetic_root: Path, evaluate_dir: Path,
                  test: ImageSet, val: ImageSet, workers: int,
                  seg_conditions: Optional[list[Condition]] = None, seg_eval: Optional[dict] = None) -> None:
    from pipeline.config import to_dict
    from pipeline.downstream import report

    num_classes = len(info.classes)
    details = {"params": {**to_dict(params), "workers_used": workers}, "classes": info.classes,
               "test_per_class": np.bincount(test.labels, minlength=num_classes).tolist(),
               "val_per_class": np.bincount(val.labels, minlength=num_classes).tolist(),
               "majority_baseline": majority_baseline(test.labels, num_classes),
               "conditions": {c.name: c.description for c in conditions},
               "synthetic_models": [c.model for c in conditions if c.added == "synthetic" and not c.classical],
               "segment_conditions": {c.name: c.description for c in seg_conditions or []},
               "segment_test_per_class": seg_eval["test_per_class"] if seg_eval is not None else [],
               "notes": notes, "runs": runs}
    # The four outputs share reports/ with the evaluate stage's folder: replaced together.
    with atomic_entries(out_dir, "downstream") as staging:
        (staging / "plots").mkdir()
        names = report.write_plots(staging / "plots", runs, metrics, info.classes, list(params.shots),
                                   [c.name for c in conditions], params.ci_level,
                                   [c.name for c in seg_conditions or []])
        plots = [out_dir / "plots" / n for n in names]
        (staging / "downstream.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
        (staging / "downstream_runs.json").write_text(json.dumps(json_safe(details), indent=2) + "\n")
        summary = report.render_summary(out_dir=out_dir, metrics=metrics, details=details, plots=plots,
                                        prepared_dir=prepared_dir, synthetic_root=synthetic_root,
                                        models=details["synthetic_models"], evaluate_dir=evaluate_dir)
        (staging / "summary.md").write_text(summary)
    artifacts = [out_dir / "downstream.json", out_dir / "downstream_runs.json", out_dir / "summary.md", *plots]
    from pipeline.tracking import log_downstream

    log_downstream({k: v for k, v in metrics.items() if math.isfinite(v)}, artifacts)
