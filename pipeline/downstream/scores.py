"""Classification scores on held-out real images, from integer labels (no sklearn needed).

Conventions (as in sklearn with zero_division=0):
  confusion_matrix[i, j]  number of images of true class i predicted as class j
  per_class_recall[k]     TP_k / (TP_k + FN_k); NaN for a class with no test images
  balanced_accuracy       mean of per_class_recall over the classes present in y_true
                          (sklearn's balanced_accuracy_score); 1/K for a classifier that
                          predicts one class, whatever the class shares
  macro_f1                mean over the classes present in y_true or y_pred of
                          F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) (0 when TP_k = 0)
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    recall = per_class_recall(y_true, y_pred, num_classes)
    present = ~np.isnan(recall)
    return float(recall[present].mean()) if present.any() else math.nan


def is_degenerate(y_pred: np.ndarray) -> bool:
    """True for a classifier that predicts a single class for every image (it learned nothing
    beyond a prior); such a run is flagged in the report instead of being read as a result."""
    return len(np.unique(np.asarray(y_pred))) <= 1


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)   # NaN: class absent everywhere


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    f1 = per_class_f1(y_true, y_pred, num_classes)
    present = ~np.isnan(f1)
    return float(f1[present].mean()) if present.any() else math.nan
