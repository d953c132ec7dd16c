"""icd-run's seeds step: the seeds of each Table 3 row of seeds.rows from the ICD model's scores,
and the CAM baseline's (icd.seeds.make_seeds), under results_<model>/<split>/seeds/."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List

from ..seeds import SeedSettings, make_seeds
from .settings import PaperSettings
from .steps import Run
from .tables import CAM_ROWS, SEED_ROWS


def step_seeds(s: PaperSettings, seed: int, run: Run) -> Dict:
    rows = s.pipeline.seeds.rows
    saliency = SeedSettings(saliency_root=s.pipeline.seeds.saliency_root)
    common = dict(workers=s.workers, shard=s.shard)
    written = {}
    for split, data_list in s.splits.items():
        data = dataclasses.replace(s.data, data_list=data_list)
        results = s.results(seed, "icd", split)
        for row in rows:
            _, folder, scores, crf = SEED_ROWS[row]
            written[f"icd/{split}/{folder}"] = make_seeds(
                results, data, dataclasses.replace(saliency, crf=crf, icd_folder=scores),
                out_dir=os.path.join(results, "seeds", folder), **common)["written"]
        if s.cam is not None:
            results = s.results(seed, "cam", split)
            for row in ("nocrf", "crf"):
                if row in rows:
                    _, folder, crf = CAM_ROWS[row]
                    written[f"cam/{split}/{folder}"] = make_seeds(
                        results, data, dataclasses.replace(
                            saliency, crf=crf, icd_folder="scores_cam", cam_folder="scores_cam"),
                        out_dir=os.path.join(results, "seeds", folder), **common)["written"]
    return {"written": written}


def seed_dirs(s: PaperSettings, model: str) -> List[str]:
    """The seed folders of `model` ("icd" or "cam") under its results, seeds.rows' order."""
    rows = s.pipeline.seeds.rows
    if model == "icd":
        return [os.path.join("seeds", SEED_ROWS[r].folder) for r in rows]
    return [os.path.join("seeds", CAM_ROWS[r].folder) for r in ("nocrf", "crf") if r in rows]
