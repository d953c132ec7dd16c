"""The fully connected CRF call (pydensecrf) and its two named presets: the seeds' and DeepLab's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

UNARY_FLOOR = 1e-5  # release: unary = -log(max(p, 1e-5))


@dataclass(frozen=True)
class CRFPreset:
    """The pairwise kernels and iterations of a dense CRF.

    gaussian: pydensecrf `addPairwiseGaussian` arguments (sxy, compat).
    bilateral: pydensecrf `addPairwiseBilateral` arguments (sxy, srgb, compat).
    iterations: mean-field iterations.
    """
    gaussian: Mapping[str, float]
    bilateral: Mapping[str, float]
    iterations: int


# The release's seed CRF (docs/release.md section 7): Gaussian sxy 3 compat 3, bilateral sxy 80
# srgb 13 compat 10, 10 iterations.
SEEDS_CRF = CRFPreset(gaussian=dict(sxy=3, compat=3), bilateral=dict(sxy=80, srgb=13, compat=10),
                      iterations=10)
# DeepLab-LargeFOV's inference CRF, for the predictions of the paper's Tables 7-8 (docs/release.md
# section 12; not the release's, which never released DeepLab's code: Chen et al., "Semantic Image
# Segmentation with Deep Convolutional Nets and Fully Connected CRFs", ICLR 2015, Sec. 4 and the
# authors' released DeepLab-LargeFOV setting): Gaussian kernel w2 = 3, theta_gamma = 3; bilateral
# kernel w1 = 4, theta_alpha (xy) = 121, theta_beta (rgb) = 5; 10 mean-field iterations.
DEEPLAB_CRF = CRFPreset(gaussian=dict(sxy=3, compat=3), bilateral=dict(sxy=121, srgb=5, compat=4),
                        iterations=10)


def dense_crf(image_rgb: np.ndarray, probabilities: np.ndarray, preset: CRFPreset) -> np.ndarray:
    """Mean-field marginals of a dense CRF (Krähenbühl and Koltun, 2011) on an image.

    Args:
        image_rgb: (H, W, 3) uint8 RGB.
        probabilities: (K, H, W) per-pixel label probabilities; unary = -log(max(p, 1e-5)).
        preset: the kernels and iterations (SEEDS_CRF, DEEPLAB_CRF).
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
    crf.addPairwiseGaussian(**preset.gaussian)
    crf.addPairwiseBilateral(rgbim=np.ascontiguousarray(image_rgb, np.uint8), **preset.bilateral)
    return np.asarray(crf.inference(preset.iterations), np.float32).reshape(labels, height, width)
