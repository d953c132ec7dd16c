"""Joint image/superpixel transforms of the release's data pipeline (section 5).

Images are (H, W, 3) uint8 RGB and superpixels (H, W) int32 ids; every geometric step is applied
to both so that they stay pixel-aligned. Training: scale, mirror, pad, random crop, relabel.
Inference: pad, centre crop.
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

from ..constants import MEAN_VALUE, NUM_SUPERPIXEL_IDS

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # release: random scale set
PAD_VALUE = MEAN_VALUE  # release: images are padded with the mean the graph subtracts
TRAIN_SIZE = 321  # release: training crop
INFER_SIZE = 513  # release: inference size

Pair = Tuple[np.ndarray, np.ndarray]


def rescale(image: np.ndarray, superpixels: np.ndarray, scale: float) -> Pair:
    """Resize both to (int(h*s+0.5), int(w*s+0.5)): bilinear image, nearest superpixels."""
    h, w = image.shape[:2]
    size = (int(w * scale + 0.5), int(h * scale + 0.5))  # cv2 takes (width, height)
    if size == (w, h):
        return image, superpixels
    return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(superpixels, size, interpolation=cv2.INTER_NEAREST))


def mirror(image: np.ndarray, superpixels: np.ndarray) -> Pair:
    """Horizontal flip of both."""
    return image[:, ::-1], superpixels[:, ::-1]


def pad_to(image: np.ndarray, superpixels: np.ndarray, size: int) -> Pair:
    """Pad bottom/right to at least size x size.

    release: image pad value 127, superpixel pad value max id + 1 (a region of its own).
    """
    h, w = image.shape[:2]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h == 0 and pad_w == 0:
        return image, superpixels
    image = cv2.copyMakeBorder(np.ascontiguousarray(image), 0, pad_h, 0, pad_w,
                               cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    superpixels = np.pad(superpixels, ((0, pad_h), (0, pad_w)),
                         constant_values=int(superpixels.max()) + 1)
    return image, superpixels


def crop(image: np.ndarray, superpixels: np.ndarray, top: int, left: int, size: int) -> Pair:
    """The size x size window at (top, left) of both."""
    window = (slice(top, top + size), slice(left, left + size))
    return image[window], superpixels[window]


def relabel(superpixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map the k distinct ids present to a random permutation of 0..k-1 (release, section 5).

    The pad id counts as one of the k; with at most MAX_REGIONS regions plus the pad id,
    k <= NUM_SUPERPIXEL_IDS, so every id stays below the model's fixed bound.
    """
    distinct, inverse = np.unique(superpixels, return_inverse=True)
    if len(distinct) > NUM_SUPERPIXEL_IDS:
        raise ValueError(f"{len(distinct)} superpixels in a crop, more than the "
                         f"{NUM_SUPERPIXEL_IDS} ids the model supports")
    permutation = rng.permutation(len(distinct)).astype(np.int32)
    return permutation[inverse].reshape(superpixels.shape)


def train_transform(image: np.ndarray, superpixels: np.ndarray, size: int,
                    rng: np.random.Generator) -> Pair:
    """Training augmentation: (H, W, 3) uint8, (H, W) int -> (S, S, 3) uint8, (S, S) int32.

    release order: random scale from SCALES, mirror with p = 0.5, pad to >= S, random S crop,
    random relabelling of the ids.
    """
    image, superpixels = rescale(image, superpixels, float(rng.choice(SCALES)))
    if rng.random() < 0.5:
        image, superpixels = mirror(image, superpixels)
    image, superpixels = pad_to(image, superpixels, size)
    h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    image, superpixels = crop(image, superpixels, top, left, size)
    return np.ascontiguousarray(image), relabel(superpixels, rng)


def infer_window(height: int, width: int, size: int) -> Tuple[int, int]:
    """(top, left) of the S x S window inference scores in an (height, width) image: the centre
    crop of the image padded bottom/right to >= S (release, section 5); (0, 0) unless a side
    exceeds S, in which case only the window is scored."""
    return max(height - size, 0) // 2, max(width - size, 0) // 2


def infer_transform(image: np.ndarray, superpixels: np.ndarray, size: int) -> Pair:
    """Inference: pad bottom/right to >= S, then the centre S x S crop (release, section 5).

    An image no larger than S stays at the top-left; a larger one loses what lies outside
    `infer_window` (the release does so silently; `icd.infer.infer` warns and records it).
    Ids are kept as they are.
    """
    image, superpixels = pad_to(image, superpixels, size)
    top, left = infer_window(*image.shape[:2], size)
    image, superpixels = crop(image, superpixels, top, left, size)
    return np.ascontiguousarray(image), np.ascontiguousarray(superpixels, np.int32)
