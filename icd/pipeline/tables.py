"""The paper's tables, one module for icd-run's `tables` step (tables/tables.md, tables.json) and
the demo's report (icd.pipeline.report): Table 1's methods, Table 3's rows, Tables 7-8's label
sources, and their markdown.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ..data.voc import read_mask
from ..io import atomic_path, read_json, write_json
from ..metrics import percent
from ..model.pretrained import MODELZOO, describe_pretrained
from ..seeds import EPS
from .compare import seed_comparison

if TYPE_CHECKING:
    from .settings import PaperSettings
    from .steps import Run


class SeedRow(NamedTuple):
    """A row of Table 3: its name, its seed folder under seeds/, the ICD score folder it is made
    from and whether the dense CRF runs."""
    name: str
    folder: str
    scores: str
    crf: bool


class CamRow(NamedTuple):
    """A CAM-baseline row beside Table 3: the CAM-only model's scores_cam as both the cam and
    the icd input of the same seed rule."""
    name: str
    folder: str
    crf: bool


# Table 3 (seeds.rows), each row adding one component of ICD to the one before
SEED_ROWS = {"bu": SeedRow("bottom-up (S)", "nocrf_icd_bu", "scores_icd_bu", False),
             "bu_sp": SeedRow("+ superpixel refinement (S')", "nocrf_icd_bu_sp",
                              "scores_icd_bu_sp", False),
             "nocrf": SeedRow("+ top-down (S'')", "nocrf", "scores_icd", False),
             "crf": SeedRow("+ CRF", "crf", "scores_icd", True)}
CAM_ROWS = {"nocrf": CamRow("CAM baseline", "nocrf_cam", False),
            "crf": CamRow("CAM baseline + CRF", "crf_cam", True)}
# Table 1's score maps: key -> name
METHODS = (("cam_baseline", "CAM (CAM-only baseline)"),
           ("cam_head", "CAM (head of the ICD model)"),
           ("icd", "Ours (ICD)"))
# What DeepLab trains on (segment.labels): the ICD seeds of row segment.seeds, the CAM
# baseline's seeds + CRF, or gt_root's masks (the fully-supervised upper bound; Tables 7-8)
SEGMENT_LABELS = {"icd": "ICD seeds", "cam": "CAM-baseline seeds + CRF",
                  "gt": "ground-truth masks (upper bound)"}


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    """A markdown table's lines (and a blank line after it)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def present_miou(miou_all: float, num_present: int, num_labels: int) -> float:
    """mIoU over the classes present in the ground truth from the release's mIoU over all
    K = num_labels labels (background + C classes; 21 on VOC).

    A class without ground-truth pixels has IoU 0/(0 + col + 1e-10) = 0 whatever the seeds say,
    so the K-label mean is Σ_present IoU / K and the present-class mean is that times
    K / num_present (exact).
    """
    if num_present <= 0:
        raise ValueError("no class is present in the ground truth")
    return miou_all * num_labels / num_present


def present_classes(gt_root: str, names: Sequence[str], num_labels: int) -> List[int]:
    """Sorted label values 0..K-1 (0 = background, K = num_labels) with at least one
    ground-truth pixel."""
    found = np.zeros(num_labels, bool)
    for name in names:
        values = np.unique(read_mask(os.path.join(gt_root, name + ".png")))
        found[values[values < num_labels]] = True
    return [int(c) for c in np.flatnonzero(found)]


# ---------------------------------------------------------------------------------------------
# The demo report's tables of a split (icd.pipeline.report.split_tables' numbers)

def split_markdown(tables: Mapping, split: str, claims_split: bool) -> List[str]:
    n = len(tables["present"])
    k = tables["num_labels"]
    lines = [f"## {split.capitalize()} split ({tables['num_images']} images"
             + (", used for the claims)" if claims_split
                else ", held out: not used for the claims)"),
             "",
             f"mIoU (present) averages over the {n} classes present in the ground truth "
             f"({', '.join(tables['present'])}); mIoU ({k}) is the release's rule over all {k} "
             f"labels (background + the {k - 1} classes of the list), where each absent class "
             f"counts 0 (so it is mIoU (present) × {n}/{k}). All values in %.", "",
             "### Table 1. Pixel-level mAP of the score maps", ""]
    lines += md_table(["Method", "mAP (%)"] + list(tables["present"][1:]),
                       [[label, percent(tables["map"][key])] +
                        [percent(tables["ap"][key][c]) for c in tables["present"][1:]]
                        for key, label in METHODS])
    lines += ["### Table 2. Seeds by threshold (no CRF)", ""]
    shorts = ("CAM base", "CAM head", "ICD")
    header = ["Threshold"] + [f"mIoU {short} (present)" for short in shorts] \
        + [f"mIoU {short} ({k})" for short in shorts] + [f"recall {short}" for short in shorts]
    rows = []
    for t, row in tables["thresholds"].items():
        rows.append([f"{float(t):.1f}"] + [percent(row[key]["miou"]) for key, _ in METHODS]
                    + [percent(row[key]["miou21"]) for key, _ in METHODS]
                    + [percent(row[key]["recall"]) for key, _ in METHODS])
    lines += md_table(header, rows)
    lines += ["CAM base: the CAM-only baseline model's CAM, fed to the seed rule as both inputs "
              "(the evaluation's \"CAM\" column); CAM head: the same for the CAM branch trained "
              "inside the ICD model; ICD: the release's rule on (CAM head, S'').", "",
              f"### Table 3. Components of ICD (seed mIoU, threshold {EPS:g} as in the release)",
              ""]
    marks = ["✓ | | | ", "✓ | ✓ | | ", "✓ | ✓ | ✓ | ", "✓ | ✓ | ✓ | ✓"]
    lines += [f"| Bottom-up | Refine | Top-down | CRF | seeds from | mIoU (present) | mIoU ({k}) |",
              "|---|---|---|---|---|---|---|"]
    for mark, (name, folder, scores, crf) in zip(marks, SEED_ROWS.values()):
        r = tables["seeds"][name]
        lines.append(f"| {mark} | {scores}{' + CRF' if crf else ''} | {percent(r['miou'])} | "
                     f"{percent(r['miou21'])} |")
    lines += ["", "CAM-baseline seeds for comparison (the CAM-only model's scores_cam as both the "
              "cam and the icd input of the same rule):", ""]
    lines += md_table(["Seeds", "mIoU (present)", f"mIoU ({k})"],
                       [[name, percent(tables["seeds"][name]["miou"]),
                         percent(tables["seeds"][name]["miou21"])]
                        for name, *_ in CAM_ROWS.values()])
    lines += ["Per-class seed IoU (%):", ""]
    names = [r.name for r in SEED_ROWS.values()] + [r.name for r in CAM_ROWS.values()]
    lines += md_table(["Seeds"] + list(tables["present"]),
                       [[name] + [percent(tables["seeds"][name]["iou"][c])
                                  for c in tables["present"]] for name in names])
    return lines


# ---------------------------------------------------------------------------------------------
# icd-run's tables step

def step_tables(s: PaperSettings, seed: int, run: Run) -> Dict:
    """tables/tables.md and tables.json: the paper's Tables 1, 2, 3 and 7/8 of this run (all
    labels, the release's rule) and ICD vs the baseline's seeds + CRF with its interval."""
    imagenet = imagenet_source(s.icd.pretrained)
    lines = [f"# Tables of `{s.config}` (training seed {seed})", "",
             f"ImageNet weights: {imagenet['made_from']}"
             + (f" (`{imagenet['file']}`, SHA-256 {imagenet['sha256'][:12]}...)"
                if imagenet.get("sha256") else ""), ""]
    numbers: Dict = {"imagenet": imagenet}
    for split in s.splits:
        icd = read_json(os.path.join(s.results(seed, "icd", split), "eval", "eval.json"))
        cam = (read_json(os.path.join(s.results(seed, "cam", split), "eval", "eval.json"))
               if s.cam is not None else None)
        numbers[split] = {"icd": icd, "cam": cam}
        lines += [f"## Split {split} ({icd['num_images']} images)", ""]
        lines += run_split_lines(icd, cam, s.pipeline.seeds.rows)
        if cam is not None and "crf" in s.pipeline.seeds.rows:
            test = seed_comparison(s, [seed], split)
            numbers[split]["icd_vs_cam"] = test
            lines += [f"ICD seeds + CRF vs CAM-baseline seeds + CRF: {percent(test['value'])} "
                      f"vs {percent(test['reference'])}, difference "
                      f"{percent(test['difference'])} [{percent(test['low'])}, "
                      f"{percent(test['high'])}] (95% bootstrap over the images: "
                      f"{test['verdict']}; one trained model, not the method's spread over "
                      f"training seeds: `--repeat N`)", ""]
    rows = []
    for label in s.pipeline.segment.labels:
        segmentation = os.path.join(s.segmentation_dirs(seed, label)[1], "eval.json")
        if os.path.isfile(segmentation):
            numbers.setdefault("segmentation", {})[label] = read_json(segmentation)
            rows.append([s.segmentation(seed, label).model, SEGMENT_LABELS[label],
                         percent(numbers["segmentation"][label]["miou"])])
    if rows:
        lines += ["### Tables 7-8. DeepLab trained on the seeds", ""]
        lines += md_table(["Network", "Trained on", "mIoU (%)"], rows)
    path = os.path.join(s.root(seed), "tables", "tables.md")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    write_json(os.path.join(s.root(seed), "tables", "tables.json"), numbers)
    return {"tables": path}


def imagenet_source(pretrained: Optional[str]) -> Dict:
    """Which ImageNet file the run's networks started from (icd.model.pretrained's
    `describe_pretrained`: the release's file, icd-pretrained's conversion, a model store's
    file), or that they started from a random initialisation."""
    if not pretrained:
        return {"file": None, "made_from": "none (random initialisation)"}
    if pretrained.startswith(MODELZOO):
        return {"file": None, "made_from": f"the model store's file ({pretrained})"}
    return describe_pretrained(pretrained)


def run_split_lines(icd: Mapping, cam: Optional[Mapping], rows: Sequence[str]) -> List[str]:
    """Tables 1-3 of one split in icd-run's tables from the evaluation reports (eval.json) of
    the ICD model and the CAM baseline (None: not trained); `rows`: seeds.rows."""
    names = dict(METHODS)
    methods = [(names["cam_head"], icd["pixel_ap"]["cam"]), (names["icd"], icd["pixel_ap"]["icd"])]
    if cam is not None:
        methods.insert(0, (names["cam_baseline"], cam["pixel_ap"]["cam"]))
    lines = ["### Table 1. Pixel-level mAP", ""]
    lines += md_table(["Method", "mAP (%)"], [[m, percent(v["map"])] for m, v in methods])
    lines += ["### Table 2. Seed mIoU by threshold (no CRF)", ""]
    study = icd["threshold_study"]
    table2 = [[t, percent(study["cam"][t]["miou"]), percent(study["icd"][t]["miou"])]
              + ([percent(cam["threshold_study"]["cam"][t]["miou"])] if cam else [])
              for t in study["icd"]]
    lines += md_table(["T", "CAM head", "ICD"] + (["CAM baseline"] if cam else []), table2)
    lines += ["### Table 3. Components of ICD (seed mIoU)", ""]
    table3 = [[SEED_ROWS[r].name, percent(icd["seeds"][os.path.join(
        "seeds", SEED_ROWS[r].folder)]["miou"])] for r in rows]
    if cam is not None:
        table3 += [[r.name, percent(cam["seeds"][os.path.join("seeds", r.folder)]["miou"])]
                   for r in CAM_ROWS.values() if os.path.join("seeds", r.folder) in cam["seeds"]]
    return lines + md_table(["Seeds", "mIoU (%)"], table3)
