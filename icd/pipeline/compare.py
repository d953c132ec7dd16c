"""ICD's seeds against the CAM baseline's with their uncertainty (icd.stats.compare_runs): the
`compare` step of icd-run --repeat N (over the training seeds and the images) and the test of
one run's tables (over the images)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Mapping, Sequence

from ..data.voc import read_list
from ..evaluate import image_confusions
from ..io import atomic_path, write_json
from ..metrics import percent
from ..stats import compare_runs

if TYPE_CHECKING:   # settings -> tables -> this module: a cycle at import
    from .settings import PaperSettings
    from .steps import Run


def seed_comparison(s: PaperSettings, seeds: Sequence[int], split: str) -> Dict[str, object]:
    """ICD seeds + CRF against the baseline's (mIoU over all labels, the release's rule) on
    the evaluation list of `split`: `compare_runs` over `seeds` (one model each)."""
    names = read_list(s.eval_list(split))
    labels = list(range(len(s.data.class_names) + 1))
    sides = [[image_confusions(os.path.join(s.results(k, model, split), "seeds", folder),
                               s.data.gt_root, names, s.workers, s.data.class_names) for k in seeds]
             for model, folder in (("icd", "crf"), ("cam", "crf_cam"))]
    return compare_runs(sides[0], sides[1], labels)


def step_compare(s: PaperSettings, seed: int, run: Run) -> Dict:
    """ICD vs the baseline over every training seed (two-level bootstrap) -> compare.md."""
    if s.cam is None or "crf" not in s.pipeline.seeds.rows:
        return {"skipped": "needs the CAM baseline and the crf seeds"}
    results = {split: seed_comparison(s, s.seeds, split) for split in s.splits}
    lines = [f"# ICD vs the CAM baseline over {len(s.seeds)} training seeds", ""]
    for split, test in results.items():
        lines += [f"- {split}: " + describe_comparison(test)]
    write_json(s.folder("compare", "compare.json"), results)
    path = s.folder("compare", "compare.md")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"compare": path}


def describe_comparison(test: Mapping) -> str:
    """One line of `compare_runs`' result: values, difference, interval, each level's share."""
    levels = "; ".join(f"{name} alone [{percent(v['low'])}, {percent(v['high'])}], "
                       f"{100 * v['share']:.0f}% of the variance"
                       for name, v in test["levels"].items())
    return (f"mIoU {percent(test['value'])} vs {percent(test['reference'])} (means over "
            f"{test['models'][0]} and {test['models'][1]} trained models): difference "
            f"{percent(test['difference'])} [{percent(test['low'])}, {percent(test['high'])}] "
            f"{test['verdict']}; {levels}")
