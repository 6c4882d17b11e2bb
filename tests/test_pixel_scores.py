"""Segmentation scores against values computed by hand (and by brute force from the definitions)."""

import itertools
import math

import numpy as np
import pytest

from pipeline.downstream.pixel_scores import (best_f1_threshold, f1_at_threshold, image_auroc, iou,
                                              pixel_average_precision, segmentation_scores)


def brute_force_ap(scores, targets):
    """AP from its definition, one threshold at a time: for every distinct score t, high to low,
    precision and recall of pred = score >= t recounted from scratch; sum of dR * P."""
    s, t = np.asarray(scores, float).ravel(), np.asarray(targets, bool).ravel()
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(s.tolist()), reverse=True):
        pred = s >= threshold
        tp = int((pred & t).sum())
        recall, precision = tp / t.sum(), tp / pred.sum()
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def brute_force_auroc(scores, is_defect):
    """Fraction of (defect, normal) pairs ranked right, a tie counting 1/2."""
    s, y = np.asarray(scores, float), np.asarray(is_defect, bool)
    pairs = list(itertools.product(s[y], s[~y]))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


# --------------------------------------------------------------------------- pixel AP

def test_pixel_ap_groups_a_tie_into_one_threshold():
    # Thresholds high to low:
    #   0.9: pred {0.9}        TP 1 -> P = 1,   R = 1/2
    #   0.8: pred + both 0.8s  TP 2 -> P = 2/3, R = 1     (the tie is one threshold)
    #   0.1: pred all          TP 2 -> R unchanged, adds 0
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 (putting the tied positive first would give 1.0).
    assert pixel_average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # One tied group of 2 positives and 1 negative: P = 2/3 at R = 1 -> AP = 2/3. Ordering the tie
    # negative-first would give 1/2 * 1/2 + 1/2 * 2/3 = 7/12, positive-first 1.0: neither.
    assert pixel_average_precision(np.array([0.5, 0.5, 0.5]), np.array([1, 1, 0])) == pytest.approx(2 / 3)


def test_pixel_ap_pools_all_pixels_and_an_all_background_image_costs_its_false_alarm():
    scores = np.array([[[0.9, 0.2], [0.1, 0.1]],          # a defect image, its defect at 0.9
                       [[0.95, 0.3], [0.05, 0.0]]])       # a normal image with one confident false alarm
    masks = np.array([[[[1, 0], [0, 0]]], [[[0, 0], [0, 0]]]])
    # 0.95 (background): P = 0, R = 0; 0.9 (the defect): P = 1/2, R = 1 -> AP = 1/2.
    assert pixel_average_precision(scores, masks) == pytest.approx(0.5)
    # The defect image alone is ranked perfectly.
    assert pixel_average_precision(scores[:1], masks[:1]) == 1.0


def test_pixel_ap_is_nan_without_positives_and_one_for_a_perfect_ranking():
    assert math.isnan(pixel_average_precision(np.random.default_rng(0).random((3, 8, 8)), np.zeros((3, 8, 8))))
    assert math.isnan(pixel_average_precision(np.zeros(0), np.zeros(0)))
    targets = np.zeros((4, 6, 6), np.uint8)
    targets[1, 2:4, 2:4] = 1
    # Every positive above every negative.
    scores = targets * 0.5 + 0.25 + np.random.default_rng(1).random(targets.shape) * 0.1
    assert pixel_average_precision(scores, targets) == 1.0
    # All positives: precision 1 at every threshold.
    assert pixel_average_precision(np.array([0.3, 0.3, 0.7]), np.ones(3)) == 1.0


def test_pixel_ap_matches_the_brute_force_definition_with_many_ties():
    rng = np.random.default_rng(2)
    for trial in range(60):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 4, n) / 3.0 if trial % 2 else rng.random(n)   # heavy ties half the time
        targets = rng.random(n) < 0.4
        if not targets.any():
            targets[0] = True
        assert pixel_average_precision(scores, targets) == pytest.approx(brute_force_ap(scores, targets), abs=1e-12)


def test_pixel_ap_and_auroc_agree_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    scores = (rng.integers(0, 50, 5000) / 49.0).astype(np.float32)
    targets = rng.random(5000) < 0.05
    assert pixel_average_precision(scores, targets) == pytest.approx(metrics.average_precision_score(targets, scores))
    assert image_auroc(scores, targets) == pytest.approx(metrics.roc_auc_score(targets, scores))


def test_pixel_ap_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="same number of pixels"):
        pixel_average_precision(np.zeros(4), np.zeros(5))


# --------------------------------------------------------------------------- F1, IoU, AUROC

def test_best_f1_threshold_by_hand():
    scores = np.array([0.9, 0.7, 0.6, 0.3, 0.2])
    targets = np.array([1, 0, 1, 1, 0])
    # 3 positives; F1 = 2TP / (predicted + 3):
    #   >= 0.9: 2/4 = 0.5; >= 0.7: 2/5; >= 0.6: 4/6; >= 0.3: 6/7 (best); >= 0.2: 6/8.
    threshold, f1 = best_f1_threshold(scores, targets)
    assert threshold == 0.3 and f1 == pytest.approx(6 / 7)
    assert f1_at_threshold(scores, targets, 0.3) == pytest.approx(6 / 7)
    assert f1_at_threshold(scores, targets, 0.65) == pytest.approx(2 / 5)     # pred {0.9, 0.7}: TP 1
    assert f1_at_threshold(scores, targets, 2.0) == 0.0                        # nothing predicted
    # Equal F1 (2/3) at 0.9 and at 0.3: the higher threshold is kept.
    assert best_f1_threshold(np.array([0.9, 0.5, 0.4, 0.3]), np.array([1, 0, 0, 1])) == (0.9, pytest.approx(2 / 3))
    # Ties: the two 0.5s are predicted together.
    assert best_f1_threshold(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == (0.5, pytest.approx(2 / 3))


def test_f1_is_nan_only_when_nothing_is_positive_or_predicted():
    assert all(math.isnan(v) for v in best_f1_threshold(np.array([0.2, 0.8]), np.zeros(2)))
    assert math.isnan(f1_at_threshold(np.array([0.2, 0.8]), np.zeros(2), 0.9))
    assert f1_at_threshold(np.array([0.2, 0.8]), np.zeros(2), 0.5) == 0.0     # a false alarm
    assert math.isnan(f1_at_threshold(np.array([0.2, 0.8]), np.array([0, 1]), math.nan))


def test_iou_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    target = np.array([[1, 0, 0], [0, 1, 1]], bool)
    assert iou(pred, target) == 0.5                                 # intersection 2, union 4
    assert iou(target, target) == 1.0
    assert iou(pred, ~pred) == 0.0
    assert math.isnan(iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))


def test_image_auroc_counts_ties_as_half():
    # Pairs (defect, normal): (0.8, 0.5) 1, (0.8, 0.2) 1, (0.5, 0.5) 1/2, (0.5, 0.2) 1 -> 3.5 / 4.
    scores, is_defect = np.array([0.8, 0.5, 0.5, 0.2]), np.array([1, 1, 0, 0])
    assert image_auroc(scores, is_defect) == 0.875
    assert image_auroc(np.full(4, 0.3), is_defect) == 0.5
    assert image_auroc(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0
    assert math.isnan(image_auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    rng = np.random.default_rng(4)
    for _ in range(30):
        s, y = rng.integers(0, 5, 20) / 4.0, rng.random(20) < 0.5
        if y.any() and (~y).any():
            assert image_auroc(s, y) == pytest.approx(brute_force_auroc(s, y), abs=1e-12)


# --------------------------------------------------------------------------- the test figures

def test_segmentation_scores_by_hand():
    scores = np.array([[[0.1, 0.85], [0.0, 0.2]],      # normal, a false alarm at 0.85
                       [[0.9, 0.6], [0.3, 0.1]],       # scratch
                       [[0.55, 0.8], [0.2, 0.0]]])     # spot, an extra pixel at 0.55
    masks = np.zeros((3, 1, 2, 2), np.uint8)
    masks[1, 0, 0, :] = 1
    masks[2, 0, 0, 1] = 1
    labels = np.array([0, 1, 2])
    out = segmentation_scores(scores, masks, labels, ("normal", "scratch", "spot", "pit"), threshold=0.5)
    # Pixels high to low: 0.9+ (P 1, R 1/3), 0.85- , 0.8+ (P 2/3, R 2/3), 0.6+ (P 3/4, R 1), rest after.
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/4 = 29/36.
    assert out["pixel_ap"] == pytest.approx(29 / 36)
    # >= 0.5 predicts 0.9, 0.85, 0.8, 0.6, 0.55: TP 3 of 5 predicted, 3 positives -> F1 = 6/8.
    assert out["pixel_f1"] == pytest.approx(0.75)
    # Image scores (max): normal 0.85; defects 0.9 (above) and 0.8 (below) -> AUROC 1/2.
    assert out["image_auroc"] == 0.5
    assert out["iou_scratch"] == 1.0                    # predicted the top row, which is the scratch
    assert out["iou_spot"] == 0.5                       # predicted 2 pixels, 1 is the spot
    assert math.isnan(out["iou_pit"])                   # no test image of that class
    assert out["mean_iou"] == 0.75                      # over the classes with images
    assert "iou_normal" not in out
    # Masks may come as (N, H, W) too.
    assert segmentation_scores(scores, masks[:, 0], labels, ("normal", "scratch", "spot"), 0.5)["pixel_ap"] == \
        pytest.approx(29 / 36)


def test_segmentation_scores_rejects_bad_shapes():
    with pytest.raises(ValueError, match="test_scores"):
        segmentation_scores(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros(2), ("normal", "a"), 0.5)
    with pytest.raises(ValueError, match="test_labels"):
        segmentation_scores(np.zeros((2, 2, 2)), np.zeros((2, 1, 2, 2)), np.zeros(3), ("normal", "a"), 0.5)


def test_a_nan_threshold_gives_nan_f1_and_iou():
    scores = np.array([[[0.9, 0.1]], [[0.2, 0.3]]])
    masks = np.array([[[[1, 0]]], [[[0, 0]]]])
    out = segmentation_scores(scores, masks, np.array([1, 0]), ("normal", "crack"), threshold=math.nan)
    assert out["pixel_ap"] == 1.0 and out["image_auroc"] == 1.0
    assert math.isnan(out["pixel_f1"]) and math.isnan(out["iou_crack"]) and math.isnan(out["mean_iou"])
