"""Scores of a defect segmenter: pixel-level average precision and F1, per-class IoU, and the
image-level AUROC of its maximum pixel score (numpy only).

Pixel AP is the area under the precision-recall curve over all pixels of all images, defined as
scikit-learn's `average_precision_score`: AP = sum_n (R_n - R_{n-1}) P_n over the distinct
scores taken as thresholds from high to low (pred = score >= threshold), pixels of equal score
forming ONE threshold, so a tie between a defect and a background pixel costs both at once
instead of depending on their order. It needs no threshold and does not reward predicting
background everywhere, which matters when defects cover 1-2 % of the pixels. The F1 threshold is
chosen on validation pixels (`best_f1_threshold`) and applied unchanged to test
(`segmentation_scores`), so the test split never picks it. Every curve sorts the pixels once.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per distinct score, high to low: (threshold, predicted-positive count, true-positive
    count, number of positive pixels). One sort of all pixels."""
    s = np.asarray(scores).ravel()
    t = np.asarray(targets).ravel().astype(bool)
    if s.shape != t.shape:
        raise ValueError(f"scores and targets must have the same number of pixels; got {s.size} and {t.size}")
    order = np.argsort(s, kind="stable")[::-1]          # descending; ties are grouped below anyway
    s, t = s[order], t[order]
    tp = np.cumsum(t, dtype=np.int64)
    # The last position of each run of equal scores closes one threshold.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.zeros(0, np.int64)
    return s[last], last + 1, tp[last], int(tp[-1]) if tp.size else 0


def pixel_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP over all pixels (module docstring); NaN when no pixel is positive."""
    _, predicted, tp, positives = _curve(scores, targets)
    if positives == 0:
        return math.nan
    recall = tp / positives
    precision = tp / predicted
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def best_f1_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) of the threshold with the highest pixel F1 (pred = score >= threshold),
    the highest such threshold on a tie; (NaN, NaN) when no pixel is positive."""
    threshold, predicted, tp, positives = _curve(scores, targets)
    if positives == 0:
        return math.nan, math.nan
    f1 = 2 * tp / (predicted + positives)                # 2TP / (2TP + FP + FN)
    best = int(np.argmax(f1))                            # first maximum = highest threshold
    return float(threshold[best]), float(f1[best])


def f1_at_threshold(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """Pixel F1 of pred = score >= threshold; NaN when there is no positive pixel and none is
    predicted, or when the threshold is NaN (no threshold could be chosen on val)."""
    if math.isnan(threshold):
        return math.nan
    pred = np.asarray(scores).ravel() >= threshold
    t = np.asarray(targets).ravel().astype(bool)
    tp = int(np.count_nonzero(pred & t))
    denominator = int(np.count_nonzero(pred)) + int(np.count_nonzero(t))
    return 2 * tp / denominator if denominator else math.nan


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """|pred & target| / |pred | target| over boolean arrays; NaN when the union is empty."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    union = int(np.count_nonzero(p | t))
    return int(np.count_nonzero(p & t)) / union if union else math.nan


def image_auroc(image_scores: np.ndarray, image_is_defect: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a defect image > score of a normal one), ties
    counted 1/2 (the Mann-Whitney U statistic over n_pos * n_neg); NaN when a class is missing."""
    s = np.asarray(image_scores, np.float64).ravel()
    y = np.asarray(image_is_defect).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # Average 1-based rank of each run of equal scores (midranks): a tie then counts 1/2.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def segmentation_scores(test_scores: np.ndarray, test_masks: np.ndarray, test_labels: np.ndarray,
                        class_names: Sequence[str], threshold: float) -> dict[str, float]:
    """Test figures of a segmenter from its pixel probabilities.

    test_scores float (N, H, W); test_masks 0/1 (N, 1, H, W) or (N, H, W); test_labels (N,) with
    0 = normal; class_names[k] names label k; threshold: the F1-max threshold chosen on val.
    Returns pixel_ap and pixel_f1 over all test pixels, image_auroc (image score = its maximum
    pixel score, defect = label >= 1), iou_<class> per defect class (pooled pixels of that
    class's test images, pred = score >= threshold; NaN without images, with an empty union or
    a NaN threshold) and mean_iou over the defect classes whose IoU is defined (NaN if none).
    """
    scores = np.asarray(test_scores)
    labels = np.asarray(test_labels, np.int64).ravel()
    if scores.ndim != 3:
        raise ValueError(f"test_scores must be (N, H, W); got shape {scores.shape}")
    masks = np.asarray(test_masks).reshape(scores.shape).astype(bool)   # (N, 1, H, W) -> (N, H, W)
    if len(labels) != len(scores):
        raise ValueError(f"test_labels has {len(labels)} entries for {len(scores)} images")
    out = {
        "pixel_ap": pixel_average_precision(scores, masks),
        "pixel_f1": f1_at_threshold(scores, masks, threshold),
        "image_auroc": image_auroc(scores.max(axis=(1, 2)), labels >= 1),
    }
    per_class = []
    for k in range(1, len(class_names)):
        chosen = labels == k
        defined = chosen.any() and not math.isnan(threshold)
        value = iou(scores[chosen] >= threshold, masks[chosen]) if defined else math.nan
        out[f"iou_{class_names[k]}"] = value
        if not math.isnan(value):
            per_class.append(value)
    out["mean_iou"] = float(np.mean(per_class)) if per_class else math.nan
    return out
