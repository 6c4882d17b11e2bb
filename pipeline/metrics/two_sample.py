"""Classifier two-sample test (C2ST): can a classifier tell a set's images from real defect images?

Lopez-Paz & Oquab, "Revisiting Classifier Two-Sample Tests", ICLR 2017: train a binary
classifier on part of two samples (label 0 = real, 1 = the other set) and score it on held-out
images of both. Under the null hypothesis (same distribution) its held-out accuracy is 0.5; the
further above 0.5, the more visibly the set differs from real data. `fid_domain`'s features come
from a network trained to separate the real *classes*, which never learned what makes an image
look real (it can rank colour noise above "doing nothing"); the classifier here is
trained on exactly the question "real or not", so no feature space has to be trusted and a set
cannot game it by landing near real images in someone else's embedding.

Figure: `c2st` = mean held-out accuracy over `splits` seeded splits (0.5 indistinguishable,
1.0 always detected; values a little under 0.5 are chance), `c2st_std` its standard deviation
over the splits, `c2st_n` the balanced images per side. Per split i (seed `seed + i`):
  1. balance the sides: draw min(N_real, N_fake) images of each side without replacement (the
     larger side is subsampled, a new draw per split), so chance is exactly 0.5;
  2. split each side the same way into train / val / test (50/25/25): stratified by side;
  3. train the project's downstream classifier (pipeline/downstream/classifier.py
     `train_classifier`: the small VGG-style CNN, Adam, early stopping on the val split's
     balanced accuracy, best validated weights; one CNN trainer in the project) on train;
  4. accuracy of its predictions on the test images (balanced by construction).
Deterministic for a seed: train_classifier is seeded and leaves the global RNG alone, the draws
come from numpy generators seeded by (seed, split), and training runs on one torch thread, so
the figure does not depend on the machine's core count.

Choices, measured on the built-in classic data (32 px, 48 real defect images in test + val, 2
CPU cores shared with other work):
  * no augmentation: flips and shifts would make the test blind to orientation and position
    (a generator that paints every scratch the same way); with them the figures below moved
    within about their split-to-split spread (box blur 0.96 instead of 1.0);
  * one torch thread (`_one_torch_thread`): 4-7 ms per step against ~8 ms on two threads of a
    quiet 2-core machine, and 400-580 ms on two threads while other processes hold the cores
    (OpenMP's waiting threads spin);
  * batch 32, lr 3e-3 (the downstream defaults), at most 200 steps: noise is separated well
    within them, and 300 steps gave the same figures;
  * overall only (`overall_only`): a class's dozen real images would leave a test split of 3.
  Figures vs the 48 real test + val defects (seed 0, these defaults): uniform noise 1.0 ± 0;
  normal training images 0.75 ± 0.06 (the evaluate stage's do_nothing row: 0.78 ± 0.02); the
  real training defects 0.53 ± 0.05; those blurred by a 3x3 box 0.99 ± 0.02, brightened by 12
  levels 0.51 ± 0.07, transposed 0.50 ± 0.03 (at 48 images a side the test has little power
  against small global changes); the evaluate stage's real_vs_real (24 vs 24) 0.44 ± 0.10.
  Cost: 1.5-5 s per row (3 splits) on one thread; the default DAG's evaluate stage has 8 rows.

Small samples make the figure noisy: with n images per side the test split holds n/2 images,
so one split's accuracy has a standard deviation of about 0.5 / sqrt(n/2) under the null (n = 24:
~0.14; the mean over 3 splits ~0.08). Read `c2st` against the `real_vs_real` row of the evaluate
stage (two halves of the real defect images: the floor at that sample size), and `noise` (1.0).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pipeline.metrics.registry import MetricContext, register_metric

MIN_PER_SIDE = 4      # fewer balanced images per side leave a split without a train, val or test image


@dataclass(frozen=True)
class C2STSettings:
    """Training and splitting settings (evaluate.c2st_* params)."""

    splits: int = 3
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)    # train, val, test (per side)
    batch_size: int = 32
    lr: float = 3e-3
    max_steps: int = 200
    width: int = 8                # the downstream classifier's default
    eval_every: int = 25          # early stopping: score val every 25 steps, stop after 3 scores
    patience: int = 3             # without improvement, not before step 50
    min_steps: int = 50


@dataclass
class C2STResult:
    accuracy: float                                   # mean held-out accuracy over the splits
    std: float                                        # standard deviation over the splits (ddof 0)
    n_per_side: int                                   # balanced images per side
    n_test: int                                       # test images per split (both sides)
    accuracies: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)    # optimizer steps each split's classifier took


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, val, test) counts of one side, each >= 1 for n >= 3."""
    _, f_val, f_test = fractions
    n_test = max(1, int(round(n * f_test)))
    n_val = max(1, int(round(n * f_val)))
    return n - n_val - n_test, n_val, n_test


def c2st(real: np.ndarray, fake: np.ndarray, *, seed: int, settings: C2STSettings = C2STSettings()) -> C2STResult:
    """Held-out accuracy of a classifier separating `real` from `fake` (uint8 (N, C, H, W) each);
    NaN when either side has fewer than MIN_PER_SIDE images."""
    n = min(len(real), len(fake))
    if n < MIN_PER_SIDE:
        return C2STResult(math.nan, math.nan, n, 0)
    with _one_torch_thread():
        runs = [_split_accuracy(real, fake, n, seed, split, settings) for split in range(settings.splits)]
    accuracies = [acc for acc, _ in runs]
    n_test = _split_sizes(n, settings.fractions)[2]
    return C2STResult(float(np.mean(accuracies)), float(np.std(accuracies)), n, 2 * n_test, accuracies,
                      [steps for _, steps in runs])


def _split_accuracy(real: np.ndarray, fake: np.ndarray, n: int, seed: int, split: int,
                    settings: C2STSettings) -> tuple[float, int]:
    """One split: (test accuracy, optimizer steps) of a classifier trained on n balanced images a side."""
    from pipeline.downstream.classifier import StopRule, predict, train_classifier   # lazy: torch

    n_train, n_val, _ = _split_sizes(n, settings.fractions)
    rng = np.random.default_rng([seed, split])
    sides = [images[rng.choice(len(images), n, replace=False)] for images in (real, fake)]   # balanced
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for side in sides:                                        # the same counts on both sides: stratified
        order = rng.permutation(n)
        parts["train"].append(side[order[:n_train]])
        parts["val"].append(side[order[n_train:n_train + n_val]])
        parts["test"].append(side[order[n_train + n_val:]])
    x = {k: np.concatenate(v) for k, v in parts.items()}
    y = {k: np.repeat(np.asarray([0, 1], np.int64), len(v[0])) for k, v in parts.items()}   # real 0, then set 1
    stop = StopRule(eval_every=settings.eval_every, patience=settings.patience,
                    min_steps=min(settings.min_steps, settings.max_steps), max_steps=settings.max_steps)
    model, log = train_classifier(x["train"], y["train"], 2, val_images=x["val"], val_labels=y["val"], stop=stop,
                                  batch_size=settings.batch_size, lr=settings.lr, seed=seed + split,
                                  width=settings.width)
    return float(np.mean(predict(model, x["test"]) == y["test"])), log.steps


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Train on one torch thread (restored afterwards): see the module docstring."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def settings_from(params) -> C2STSettings:
    """The C2ST settings of EvaluateParams (evaluate.c2st_*)."""
    return C2STSettings(splits=params.c2st_splits, batch_size=params.c2st_batch_size, lr=params.c2st_lr,
                        max_steps=params.c2st_max_steps)


@register_metric("c2st", overall_only=True,
                 description="classifier two-sample test: held-out accuracy of a small CNN telling the set's "
                             "images from real defect images (0.5 = indistinguishable, 1 = always detected; "
                             "compare with the real_vs_real row)")
def c2st_metric(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Mean held-out accuracy over evaluate.c2st_splits splits; details `c2st_std` (over the
    splits) and `c2st_n` (balanced images per side)."""
    result = c2st(real, fake, seed=ctx.seed, settings=settings_from(ctx.params))
    ctx.detail("std", result.std)
    ctx.detail("n", result.n_per_side)
    return result.accuracy
