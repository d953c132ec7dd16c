"""A training step's device memory, estimated before the first step (docs/gpus.md).

Per registered model, two figures measured by `icd-bench` on CPU in float32 at full width and
321 px crops (`icd.bench.memory_per_image`: the peak resident memory of a child process running
two steps, at one and at two images): `fixed_mb`, what a step holds whatever its batch
(weights, gradients, optimizer states, workspaces), and `per_image_mb`, what each image adds
(activations kept for the backward; scaled by the crop's area). A device's estimate is
fixed + per-image x its images x (crop / 321)^2. Measured on a CPU, not on a GPU: cuDNN
workspaces and MXNet's pool rounding come on top; --amp fp16 was not measured; a variant of a
model (Tables 4-6) uses the model's figures.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Sequence

import mxnet as mx

log = logging.getLogger(__name__)

MEASURED_SIZE = 321   # the crop side of MEASURED
# icd-bench --memory-only on a shared 2-core AMD EPYC (CPU, float32, width 1.0, 321 px;
# 2026-12-06); MiB
MEASURED: Dict[str, Dict[str, float]] = {
    "resnet101_largefov": {"fixed_mb": 1342, "per_image_mb": 1025},
    "vgg16_aspp": {"fixed_mb": 856, "per_image_mb": 603},
    "vgg16_bn_cam": {"fixed_mb": 446, "per_image_mb": 409},
    "vgg16_cam": {"fixed_mb": 486, "per_image_mb": 299},
    "vgg16_icd": {"fixed_mb": 613, "per_image_mb": 365},
    "vgg16_largefov": {"fixed_mb": 461, "per_image_mb": 350},
}


def estimate_mb(model: str, image_size: int, images: int, width: float = 1.0,
                figures: Optional[Dict[str, Dict[str, float]]] = None) -> Optional[float]:
    """Estimated MiB on a device training `model` on `images` crops of `image_size` px, from
    `figures` (default MEASURED, full width); None for a model or a width not measured."""
    figures = MEASURED if figures is None else figures
    if model not in figures or (figures is MEASURED and width != 1.0):
        return None
    measured = figures[model]
    size = measured.get("size", MEASURED_SIZE)
    return measured["fixed_mb"] + measured["per_image_mb"] * images * (image_size / size) ** 2


def warn_if_short(cfg, contexts: Sequence[mx.Context]) -> Optional[float]:
    """Warn, naming --batch-size, when the estimate for cfg's step exceeds the free memory of
    one of `contexts`' GPUs (asked only of GPU contexts); returns the estimate per device."""
    images = math.ceil(cfg.batch_size / len(contexts))
    estimate = estimate_mb(cfg.model, cfg.image_size, images, cfg.width)
    if estimate is None:
        return None
    for ctx in contexts:
        if ctx.device_type != "gpu":
            continue
        free, _ = mx.context.gpu_memory_info(ctx.device_id)
        if estimate > free / 2 ** 20:
            log.warning("%s: about %.0f MiB per device for %d images of %d px (--batch-size %d "
                        "over %d devices), more than the %.0f MiB free on %s: lower "
                        "--batch-size or use more GPUs (docs/gpus.md; a CPU-measured "
                        "estimate)", cfg.model, estimate, images, cfg.image_size, cfg.batch_size,
                        len(contexts), free / 2 ** 20, ctx)
    return estimate
