"""Normalised score maps: each side of a signed map over its own extreme (release section 7).

The paper's normalised positive and negative scores (Sec. 5.4); the seed rule, the threshold
study and the score pictures all read them from here. numpy, (K, H, W) float arrays.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-5   # release: every normaliser floor, proposal and tie tolerance of the seed rule


def foreground_score(icd: np.ndarray) -> np.ndarray:
    """Release: fg_score = max(icd, 0) / max(max_hw icd, 1e-5), per class.

    Args: icd (K, H, W). Returns (K, H, W) in [0, 1].
    """
    peak = icd.reshape(icd.shape[0], -1).max(axis=1)[:, None, None]
    return np.maximum(icd, 0) / np.maximum(peak, EPS)


def background_score(icd: np.ndarray) -> np.ndarray:
    """Release: min(icd, 0) / min(min_hw icd, -1e-5), per class: in [0, 1], 1 = most background.

    This is minus the "normalised negative score" of the paper (Sec. 5.4): bg_score > T is the
    paper's normalised negative score < -T. Args: icd (K, H, W). Returns (K, H, W).
    """
    trough = icd.reshape(icd.shape[0], -1).min(axis=1)[:, None, None]
    return np.minimum(icd, 0) / np.minimum(trough, -EPS)
