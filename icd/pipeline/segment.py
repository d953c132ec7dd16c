"""icd-run's segment step: DeepLab trained on each of segment.labels (the ICD seeds, the CAM
baseline's, the ground truth: the paper's Tables 7-8), predicted on segment.list, evaluated."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict

from ..config import Config
from ..devices import parse_devices
from ..segment import AUTOTUNE, evaluate_predictions, infer_segmentation
from .settings import PaperSettings
from .steps import Run
from .tables import SEGMENT_LABELS
from .train import train_to_the_end

log = logging.getLogger(__name__)

def step_segment(s: PaperSettings, seed: int, run: Run) -> Dict:
    """DeepLab on each of segment.labels (Tables 7-8): trained, predicted on segment.list,
    evaluated; {"miou": {label: mIoU}}."""
    if s.segmentation(seed) is None:
        return {"skipped": "no segment.config"}
    stage = s.pipeline.segment
    data_list, gt_root = stage.list, stage.gt_root or s.data.gt_root
    if not data_list or not gt_root:
        raise ValueError(f"{s.config}: pipeline: segment: needs `list` (the images to predict) "
                         f"and a gt_root")
    miou = {}
    for label in stage.labels:
        cfg = s.segmentation(seed, label)
        log.info("segmentation on the %s", SEGMENT_LABELS[label])
        final = train_to_the_end(cfg)
        out = s.segmentation_dirs(seed, label)[1]
        predict_segmentation(dataclasses.replace(cfg, data_list=data_list), final, out,
                             s.workers)
        miou[label] = evaluate_predictions(out, gt_root, data_list, cfg.model,
                                           workers=s.workers, classes=cfg.class_names)["miou"]
    return {"miou": miou}


def predict_segmentation(cfg: Config, params: str, out: str, workers: int) -> None:
    """icd-infer-seg's inference (icd.segment.infer_segmentation) in icd-run's process, which
    trains after it: cuDNN autotune is left as it was before (icd-infer-seg's process ends)."""
    autotune = os.environ.get(AUTOTUNE)
    try:
        infer_segmentation(cfg, params, out, parse_devices(cfg.gpus, cfg.cpus), workers)
    finally:
        if autotune is None:
            os.environ.pop(AUTOTUNE, None)
