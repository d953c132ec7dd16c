"""icd-run's evaluate step: pixel mAP, the threshold study and the seeds' mIoU of every model and
split against gt_root (icd.evaluate), under results_<model>/<split>/eval/."""
from __future__ import annotations

import dataclasses
from typing import Dict

from ..evaluate import EvalSettings, evaluate
from .seeds import seed_dirs
from .settings import PaperSettings
from .steps import Run


def step_evaluate(s: PaperSettings, seed: int, run: Run) -> Dict:
    if not s.data.gt_root:
        raise ValueError(f"{s.config}: pipeline: gt_root: the ground-truth folder is needed to "
                         f"evaluate (or leave the evaluate step out with --steps)")
    summary = {}
    for split in s.splits:
        for model in s.models:
            report = evaluate(
                s.results(seed, model, split), s.data.gt_root,
                dataclasses.replace(s.data, data_list=s.eval_list(split)),
                EvalSettings(seed_dirs=seed_dirs(s, model),
                             thresholds=s.pipeline.evaluate.thresholds,
                             folders={"cam": "scores_cam",
                                      "icd": "scores_icd" if model == "icd" else "scores_cam"}),
                workers=s.workers)
            summary[f"{model}/{split}"] = {d: r["miou"] for d, r in report["seeds"].items()}
    return summary
