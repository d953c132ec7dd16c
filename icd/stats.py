"""Bootstrap comparisons with intervals, for any two result folders (issue #13, #23).

A comparison resamples the images with replacement RESAMPLES times (seeded: deterministic, and
every comparison of a split sees the same resamples); each resample recomputes the metric the
way the evaluation does (mIoU from the summed per-image confusion matrices, pixel mAP from the
pooled pixels, binned per class) for both sides, and the LEVEL percentile interval of the
differences decides (`judge`): PASS above 0, FAIL below 0, UNCLEAR when it contains 0.

Training-seed variance (`compare_runs`): with several trained models per side (one per training
seed), a two-level bootstrap first resamples the models of each side, then the images; each
level alone gives its own interval, and their variances' shares say how much of the uncertainty
comes from the training seed and how much from the choice of images.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .metrics import IOU_EPS

RESAMPLES = 1000         # bootstrap resamples of the image set
LEVEL = 0.95             # two-sided percentile interval of the bootstrap differences
BOOTSTRAP_SEED = 0
AP_BINS = 1000           # score bins per class for the resampled pixel AP
VERDICTS = ("PASS", "UNCLEAR", "FAIL")


def resample_weights(num_images: int, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, num_images) float64: how often each image is drawn in each resample."""
    if num_images <= 0:
        raise ValueError("no images to resample")
    picks = np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))
    weights = np.zeros((resamples, num_images))
    np.add.at(weights, (np.arange(resamples)[:, None], picks), 1.0)
    return weights


Statistic = Callable[[np.ndarray], np.ndarray]   # (R, N) image weights -> (R,) values


def miou_statistic(confusions: np.ndarray, classes: Sequence[int]) -> Statistic:
    """mIoU over `classes` of the weighted sum of (N, K, K) per-image confusion matrices
    (the release's IoU = diag / (row + col - diag + 1e-10))."""
    def statistic(weights: np.ndarray) -> np.ndarray:
        total = np.tensordot(weights, confusions, axes=1)                     # (R, K, K)
        diag = np.diagonal(total, axis1=1, axis2=2)
        iou = diag / (total.sum(axis=1) + total.sum(axis=2) - diag + IOU_EPS)
        return iou[:, list(classes)].mean(axis=1)
    return statistic


def class_histograms(pixels: Sequence[Tuple[int, np.ndarray, np.ndarray]], num_images: int,
                     bins: int = AP_BINS) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Per-image counts (N, B) of positive and negative pixels of one class in B score bins.

    pixels: [(image index, positive scores, negative scores)] (`image_statistics`). The bins'
    lower edges are quantiles of the pooled positive scores (every distinct positive score
    when there are at most `bins`); negatives below the lowest edge never count. None when the
    class has no positive pixel (no AP, as in `pixel_ap`).
    """
    positives = np.concatenate([p for _, p, _ in pixels]) if pixels else np.empty(0)
    if positives.size == 0:
        return None
    edges = np.unique(np.quantile(positives, np.linspace(0, 1, bins), method="lower"))
    counts = np.zeros((2, num_images, edges.size))
    for i, positive, negative in pixels:
        for k, values in enumerate((positive, negative)):
            index = np.searchsorted(edges, values, side="right") - 1
            counts[k, i] += np.bincount(index[index >= 0], minlength=edges.size)
    return counts[0], counts[1]


def binned_ap(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """(R,) AP = Σ_k (R_k − R_{k−1}) P_k from (R, B) pixel counts per score bin, bins in
    increasing score order, thresholds at the bins' lower edges; nan without positives."""
    tp = np.cumsum(positive[:, ::-1], axis=1)
    fp = np.cumsum(negative[:, ::-1], axis=1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
    gained = np.diff(tp, axis=1, prepend=0.0)
    total = tp[:, -1]
    return np.divide((gained * precision).sum(axis=1), total, out=np.full(total.shape, np.nan),
                     where=total > 0)


def map_statistic(histograms: Sequence[Optional[Tuple[np.ndarray, np.ndarray]]]) -> Statistic:
    """Mean AP over the classes with positives in the resample (`class_histograms` per class)."""
    used = [h for h in histograms if h is not None]

    def statistic(weights: np.ndarray) -> np.ndarray:
        if not used:
            return np.full(len(weights), np.nan)
        ap = np.stack([binned_ap(weights @ pos, weights @ neg) for pos, neg in used])   # (C, R)
        counted = ~np.isnan(ap)
        return np.divide(np.where(counted, ap, 0.0).sum(axis=0), counted.sum(axis=0),
                         out=np.full(len(weights), np.nan), where=counted.any(axis=0))
    return statistic


def judge(low: float, high: float) -> str:
    """PASS if the interval of the difference lies above 0, FAIL if below, else UNCLEAR."""
    return "PASS" if low > 0 else "FAIL" if high < 0 else "UNCLEAR"


def _number(value) -> Optional[float]:
    return None if value is None or np.isnan(value) else float(value)


def compare(better: Statistic, worse: Statistic, weights: np.ndarray,
            level: float = LEVEL) -> Dict[str, object]:
    """The claim `better > worse` on the image set: both values, their difference and its
    bootstrap interval over the resamples `weights` (R, N), and the verdict (`judge`).
    A missing value (nan) gives None numbers and FAIL."""
    ones = np.ones((1, weights.shape[1]))
    a, b = float(better(ones)[0]), float(worse(ones)[0])
    differences = better(weights) - worse(weights)
    differences = differences[~np.isnan(differences)]
    if np.isnan(a) or np.isnan(b) or differences.size == 0:
        return dict(value=_number(a), reference=_number(b), difference=None, low=None,
                    high=None, verdict="FAIL")
    low, high = np.percentile(differences, [50 * (1 - level), 50 * (1 + level)])
    return dict(value=a, reference=b, difference=a - b, low=float(low), high=float(high),
                verdict=judge(low, high))


def _interval(differences: np.ndarray, level: float) -> Tuple[float, float]:
    low, high = np.percentile(differences, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def compare_runs(better: Sequence[np.ndarray], worse: Sequence[np.ndarray],
                 classes: Sequence[int], resamples: int = RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Dict[str, object]:
    """The claim `better > worse` in mIoU over `classes` for several trained models per side
    (one per training seed), by a two-level bootstrap: each resample draws each side's models
    with replacement, then the images (the same image weights for both sides: paired), and
    compares the means over the drawn models.

    better, worse: per model, the (N, K, K) per-image confusion matrices of the same N images.
    Returns `compare`'s keys (value and reference: the mean mIoU over each side's models) and
    "levels": {"training seeds" | "images": {"low", "high", "share"}}: the interval of each
    level resampled alone (the other held at its observed value) and its share of the two
    levels' summed bootstrap variance. With one model per side the seed level is 0.
    """
    if not better or not worse:
        raise ValueError("each side needs at least one trained model")
    sizes = {c.shape[0] for c in list(better) + list(worse)}
    if len(sizes) != 1:
        raise ValueError(f"the models were evaluated on different image sets ({sorted(sizes)} "
                         f"images)")
    num_images = sizes.pop()
    weights = resample_weights(num_images, resamples, seed)                       # (R, N)
    rng = np.random.default_rng(seed + 1)
    ones = np.ones((1, num_images))
    sides = []
    for models in (better, worse):
        statistics = [miou_statistic(c, classes) for c in models]
        resampled = np.stack([s(weights) for s in statistics])                    # (M, R)
        observed = np.array([s(ones)[0] for s in statistics])                     # (M,)
        picks = rng.integers(0, len(models), size=(resamples, len(models)))       # (R, M)
        sides.append(dict(
            observed=observed,
            both=np.take_along_axis(resampled, picks.T, axis=0).mean(axis=0),
            seeds=observed[picks].mean(axis=1), images=resampled.mean(axis=0)))
    a, b = sides
    value, reference = float(a["observed"].mean()), float(b["observed"].mean())
    low, high = _interval(a["both"] - b["both"], level)
    levels, variances = {}, {}
    for key, name in (("seeds", "training seeds"), ("images", "images")):
        differences = a[key] - b[key]
        variances[name] = float(differences.var())
        levels[name] = dict(zip(("low", "high"), _interval(differences, level)))
    total = sum(variances.values())
    for name in levels:
        levels[name]["share"] = variances[name] / total if total > 0 else 0.0
    return dict(value=value, reference=reference, difference=value - reference, low=low,
                high=high, verdict=judge(low, high), levels=levels,
                models=(len(better), len(worse)), per_model=dict(
                    better=a["observed"].tolist(), worse=b["observed"].tolist()))
