"""The fully connected CRF call (pydensecrf), shared by the seeds and the DeepLab predictions."""
from __future__ import annotations

from typing import Mapping

import numpy as np

UNARY_FLOOR = 1e-5  # release: unary = -log(max(p, 1e-5))


def dense_crf(image_rgb: np.ndarray, probabilities: np.ndarray, gaussian: Mapping[str, float],
              bilateral: Mapping[str, float], iterations: int) -> np.ndarray:
    """Mean-field marginals of a dense CRF (Krähenbühl and Koltun, 2011) on an image.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        probabilities: (K, H, W) per-pixel label probabilities; unary = -log(max(p, 1e-5)).
        gaussian: pydensecrf `addPairwiseGaussian` arguments (sxy, compat).
        bilateral: pydensecrf `addPairwiseBilateral` arguments (sxy, srgb, compat).
        iterations: mean-field iterations.
    Returns:
        (K, H, W) float32 marginals.
    """
    import pydensecrf.densecrf as dcrf  # compiled extension: imported where used

    labels, height, width = probabilities.shape
    if image_rgb.shape != (height, width, 3):
        raise ValueError(f"image {image_rgb.shape} does not match the probabilities "
                         f"{probabilities.shape}")
    unary = -np.log(np.maximum(probabilities, UNARY_FLOOR)).reshape(labels, -1)
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
    crf.addPairwiseGaussian(**gaussian)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(image_rgb, np.uint8), **bilateral)
    return np.asarray(crf.inference(iterations), np.float32).reshape(labels, height, width)
