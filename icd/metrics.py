"""The numbers of the evaluation, on arrays: confusion matrices, IoU and mIoU by the release's
rule, the values of a label map outside the class list, step-wise average precision, and a
fraction shown as a percentage (icd.evaluate applies them to result folders; the definitions are
in its module doc and docs/release.md section 8)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .constants import IGNORE_LABEL

IOU_EPS = 1e-10                     # release: IoU = diag / (row + col - diag + 1e-10)


def confusion_matrix(gt: np.ndarray, seed: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows gt, columns seed, over the pixels where both
    gt and seed are < num_classes (release rule). gt, seed: (H, W) integer label maps."""
    if gt.shape != seed.shape:
        raise ValueError(f"ground truth {gt.shape} and seed {seed.shape} differ in shape")
    gt = gt.astype(np.int64).ravel()
    seed = seed.astype(np.int64).ravel()
    keep = (gt < num_classes) & (seed < num_classes)
    return np.bincount(gt[keep] * num_classes + seed[keep],
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def unknown_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(256,) int64 pixel counts of the values of an (H, W) uint8 label map that are no label of a
    list of num_classes labels: num_classes..254 (255, the ignore label, is no unknown label)."""
    counts = np.bincount(labels.ravel(), minlength=256).astype(np.int64)
    counts[:num_classes] = 0
    counts[IGNORE_LABEL] = 0
    return counts


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """(K,) IoU per class from a (K, K) confusion matrix: diag / (row + col − diag + 1e-10)."""
    diag = np.diag(confusion).astype(np.float64)
    return diag / (confusion.sum(axis=0) + confusion.sum(axis=1) - diag + IOU_EPS)


def mean_iou(confusion: np.ndarray) -> float:
    """Release mIoU: the mean of `class_iou` over all classes."""
    return float(class_iou(confusion).mean())


def average_precision(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Step-wise AP = Σ_k (R_k − R_{k−1}) P_k over distinct thresholds, decreasing.

    Recall only moves at thresholds equal to a positive score, so the sum runs over the distinct
    positive scores t: TP(t) = #positives ≥ t, FP(t) = #negatives ≥ t (ties form one threshold).
    Both arrays are sorted IN PLACE (no index arrays: 4 bytes per pixel in all).

    Args: positive_scores (P,), negative_scores (N,) float arrays (1-D, writable).
    Returns: AP in [0, 1]; nan when there is no positive.
    """
    if positive_scores.size == 0:
        return float("nan")
    positive_scores.sort()
    negative_scores.sort()
    distinct = np.ones(positive_scores.size, bool)
    distinct[:-1] = positive_scores[1:] != positive_scores[:-1]
    thresholds = positive_scores[distinct][::-1]                     # decreasing
    tp = positive_scores.size - np.searchsorted(positive_scores, thresholds, side="left")
    fp = negative_scores.size - np.searchsorted(negative_scores, thresholds, side="left")
    precision = tp / (tp + fp).astype(np.float64)
    recall_step = np.diff(tp, prepend=0) / float(positive_scores.size)
    return float(np.sum(recall_step * precision))


def percent(value: Optional[float]) -> str:
    """A fraction as a percentage with one decimal; "–" for a missing value."""
    return "–" if value is None else f"{100 * value:.1f}"
