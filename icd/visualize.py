"""Pictures for people: score maps (the training demo image, the inference demo sheets) and label
overlays. A low floor (numpy and OpenCV only): training, inference and evaluation draw with it."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .data.classes import VOC_CLASSES, class_palette
from .scores import background_score, foreground_score


def signed_heatmap(score: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(h, w) signed score -> (H, W, 3) uint8 RGB: red where positive (foreground), blue where
    negative (background), each side normalised by its own extreme."""
    score = cv2.resize(score.astype(np.float32), (size[1], size[0]),
                       interpolation=cv2.INTER_LINEAR)
    out = np.zeros(score.shape + (3,), np.float32)
    out[..., 0] = foreground_score(score[None])[0]
    out[..., 2] = background_score(score[None])[0]
    return (out * 255).astype(np.uint8)


def score_panel(image: np.ndarray, scores: Sequence[np.ndarray]) -> np.ndarray:
    """Image beside one signed heat map per score, overlaid at 50%: (H, W * (1 + n), 3) RGB."""
    image = np.clip(image, 0, 255).astype(np.uint8)
    tiles = [image] + [(0.5 * image + 0.5 * signed_heatmap(s, image.shape[:2])).astype(np.uint8)
                       for s in scores]
    return np.concatenate(tiles, axis=1)


def overlay(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
            classes: Sequence[str] = VOC_CLASSES) -> np.ndarray:
    """(H, W, 3) uint8 blend of an RGB image with the colours of a (H, W) mask's labels
    (`class_palette` of the class list: VOC's colour map for VOC)."""
    colours = class_palette(classes)[mask].astype(np.float32)
    return (alpha * colours + (1 - alpha) * image_rgb).astype(np.uint8)
