"""Evaluation of seeds and score maps: seed mIoU (Table 3), threshold study (Table 2),
pixel-level AP (Table 1, Fig. 5) of result folders, with JSON and markdown reports; the
numbers on arrays are icd.metrics', the figures icd.plots'.

Definitions (docs/release.md section 8 and the paper, Sec. 5.4):

Counts follow the dataset's class list (`icd.data.classes`, VOC's 20 by default): K = C + 1
label ids, background 0 and class index + 1 (VOC: K = 21).

- Seed mIoU (release): a K×K confusion matrix (rows ground truth, columns seed) accumulated over
  the pixels where both the ground truth and the seed are < K (255 ignored on either side);
  IoU_k = diag_k / (row_k + col_k − diag_k + 1e-10); mIoU = mean over all K classes (a class
  absent from both counts as 0). gluoncv's SegmentationMetric is not used: it takes score maps
  (argmax), keeps pixels whose prediction alone is ignored in the union, and bins classes with
  np.histogram(bins=nclass, range=(1, nclass)), so it cannot reproduce this rule.
- Threshold study (Table 2): for each T, the seed rule of `icd.seeds.seed_from_scores` with
  `threshold=T` in place of the release's 1e-5 and no CRF: fg = normalised score > T, bg = every
  class's normalised negative score < −T. "Ours" feeds (CAM, ICD); "CAM" feeds the CAM maps as
  both inputs, i.e. treats them exactly as the ICD maps. mIoU = the seed mIoU above, which only
  counts defined (non-255) seed pixels; recall = defined seed pixels on valid ground truth
  (both < K) / valid ground-truth pixels (gt < K).
- Pixel-level AP (Sec. 5.4): for class c, all valid pixels (gt ≠ 255) of the images whose
  annotation contains c are ranked by c's score (mapped onto the image with
  `icd.seeds.resize_scores`); positives are gt == c + 1. AP = Σ_k (R_k − R_{k−1}) P_k over the
  distinct score thresholds in decreasing order (equal scores form one threshold), which equals
  sklearn's `average_precision_score`. mAP = mean over the classes that have positives.

Label maps are read against the class list (`read_labels`): a value K..254 in a ground truth,
seed or prediction is the label of no class (255 is the ignore label). Left out silently it
would change or keep the numbers without a word, so it is an error naming the file and the
value; with `ignore_unknown` such pixels are left out like 255 and counted in the report. The
folders of label maps an evaluation reads are checked first (`check_label_folders`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data.classes import classes_of_data, segmentation_classes
from .data.dataset import DataPaths
from .data.voc import IGNORE_LABEL, VOC_CLASSES, read_image_labels, read_list, \
    read_mask
from .io import atomic_path, write_json
from .metrics import average_precision, class_iou, confusion_matrix, mean_iou, percent, \
    unknown_labels
from .plots import METHOD_NAMES, plot_class_ap, plot_seed_overlays, plot_threshold_study
from .provenance import read_record, require_complete, require_folder_classes, \
    score_infer_size
from .pool import map_images
from .seeds import INFER_SIZE, load_image_scores, load_scores, resize_scores, \
    seed_from_scores

SEG_CLASSES = segmentation_classes(VOC_CLASSES)   # VOC's 21 label names, the default
NUM_SEG_CLASSES = len(SEG_CLASSES)
THRESHOLDS = (0.0, 0.1, 0.3, 0.5)   # Table 2
# method of Tables 1-2 -> the score folder its seeds and AP come from
METHOD_SCORE_FOLDERS = {"cam": "scores_cam", "icd": "scores_icd"}
# what writes a folder of label maps, by the stage its provenance record names (for messages)
WRITERS = {"seeds": "make_seeds.py", "infer-seg": "infer_seg.py"}
UNKNOWN_SIDES = ("ground truth", "labels")   # the rows of a worker's unknown-label counts


# ---------------------------------------------------------------------------------------------
# Label maps and their folders

def read_labels(path: str, num_labels: int,
                ignore_unknown: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """A label map (`read_mask`) checked against the num_labels = C + 1 labels of a class list.

    Values num_labels..254 are labels of no class (255 is the ignore label): an error naming the
    file, each value and its pixels, unless `ignore_unknown`, which sets them to 255 (left out
    like it). Returns (mask (H, W) uint8, (256,) int64 pixels of each such value).
    """
    mask = read_mask(path)
    counts = unknown_labels(mask, num_labels)
    if counts.any():
        if not ignore_unknown:
            shown = ", ".join(f"{v} ({counts[v]} pixels)" for v in np.flatnonzero(counts))
            raise ValueError(
                f"{path}: holds labels outside the class list of {num_labels - 1} classes "
                f"(labels 0..{num_labels - 1}, {IGNORE_LABEL} = ignore): {shown}; fix the file "
                f"or give the class list it was made with (icd-eval and icd-compare leave such "
                f"pixels out with --ignore-unknown-labels)")
        mask = np.where(counts[mask] > 0, np.uint8(IGNORE_LABEL), mask)
    return mask, counts


def unknown_report(counts: np.ndarray) -> Dict[str, Dict[str, Dict[str, int]]]:
    """The unknown labels of (2, 2, 256) counts ([ground truth | labels][pixels | images][value],
    summed `_seed_confusion`s) for a report: {"ground truth" | "labels": {value: {"images",
    "pixels"}}}, the values found only."""
    return {side: {str(v): {"images": int(counts[k, 1, v]), "pixels": int(counts[k, 0, v])}
                   for v in np.flatnonzero(counts[k, 0])}
            for k, side in enumerate(UNKNOWN_SIDES)}


def unknown_lines(found: Mapping[str, Mapping[str, Mapping[str, int]]]) -> List[str]:
    """Markdown lines naming the labels outside the class list that were left out, from
    {where (ground truth, a folder): {value: {"images", "pixels"}}}; none when there were none."""
    lines = [f"- {where}: " + ", ".join(f"label {v}: {c['pixels']} pixels in {c['images']} "
                                        f"image{'s' * (c['images'] != 1)}"
                                        for v, c in values.items())
             for where, values in found.items() if values]
    return ["Labels outside the class list, left out (--ignore-unknown-labels):", ""] + lines \
        + [""] if lines else []


def check_label_folders(folders: Sequence[str], classes: Sequence[str]) -> None:
    """What every reader of folders of label maps (seeds, predictions) checks before reading them
    (icd-eval, icd-compare): each folder given once (by its real path: one folder is one set of
    labels, never two trained models), its provenance record complete (`require_complete`) and
    made with `classes` (`require_folder_classes`). Folders without a record pass with a warning.
    """
    seen: Dict[str, str] = {}
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            also = "" if seen[real] == folder else f" (also as {seen[real]})"
            raise ValueError(f"{folder}: given twice{also}; a folder of label maps is one set "
                             f"of results (one trained model): give it once")
        seen[real] = folder
    for folder in folders:
        stage = (read_record(folder) or {}).get("stage")
        require_folder_classes(folder, require_complete(
            folder, WRITERS.get(stage, f"the {stage} stage")), classes)


# ---------------------------------------------------------------------------------------------
# Seed mIoU

def _map_sum(func: Callable[[str], Tuple[np.ndarray, ...]], names: Sequence[str],
             workers: int, desc: str) -> Tuple[np.ndarray, ...]:
    """Element-wise sum of the tuples of arrays func(name) over names (see `map_images`)."""
    total = None
    for result in map_images(func, names, workers, desc):
        total = result if total is None else tuple(t + r for t, r in zip(total, result))
    return total


def _seed_confusion(name: str, seed_dir: str, gt_root: str, num_labels: int = NUM_SEG_CLASSES,
                    ignore_unknown: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Worker: ((K, K) confusion of `<seed_dir>/<name>.png` against the ground truth, (2, 2, 256)
    counts of their unknown labels: [ground truth | labels][pixels | images][value])."""
    seed_path = os.path.join(seed_dir, name + ".png")
    gt_path = os.path.join(gt_root, name + ".png")
    seed, seed_unknown = read_labels(seed_path, num_labels, ignore_unknown)
    gt, gt_unknown = read_labels(gt_path, num_labels, ignore_unknown)
    if seed.shape != gt.shape:
        raise ValueError(f"{seed_path}: shape {seed.shape} differs from {gt_path} {gt.shape}")
    pixels = np.stack([gt_unknown, seed_unknown])
    return confusion_matrix(gt, seed, num_labels), np.stack([pixels, pixels > 0], axis=1)


def evaluate_seeds(seed_dir: str, gt_root: str, names: Sequence[str],
                   workers: int = 1, classes: Optional[Sequence[str]] = None,
                   ignore_unknown: bool = False) -> Dict[str, object]:
    """Seed mIoU of `<seed_dir>/<name>.png` against `<gt_root>/<name>.png` (release rule);
    labels outside `classes` are refused, or left out with `ignore_unknown` (`read_labels`).

    Returns {"miou": float, "iou": {class name: float} (background + the C `classes`),
    "num_images": int, "unknown_labels": `unknown_report`}, values as fractions.
    """
    classes = classes_of_data(classes, gt_root)
    seg_classes = segmentation_classes(classes)
    confusion, unknown = _map_sum(
        functools.partial(_seed_confusion, seed_dir=seed_dir, gt_root=gt_root,
                          num_labels=len(seg_classes), ignore_unknown=ignore_unknown),
        names, workers, f"mIoU {os.path.basename(seed_dir)}")
    iou = class_iou(confusion)
    return {"miou": float(iou.mean()), "iou": dict(zip(seg_classes, iou.tolist())),
            "num_images": len(names), "unknown_labels": unknown_report(unknown)}


# ---------------------------------------------------------------------------------------------
# Threshold study (Table 2)

def threshold_seeds(cam: np.ndarray, icd: np.ndarray, labels: Sequence[int],
                    thresholds: Sequence[float] = THRESHOLDS) -> Dict[str, List[np.ndarray]]:
    """Table 2 seeds of one image without CRF: {"cam": [seed per T], "icd": [seed per T]}.

    Args: cam, icd (|L|, H, W) scores on the image; labels the present classes.
    The ICD seed is the release rule on (cam, icd); the CAM seed the same rule on (cam, cam).
    """
    return {"cam": [seed_from_scores(cam, cam, labels, threshold=t) for t in thresholds],
            "icd": [seed_from_scores(cam, icd, labels, threshold=t) for t in thresholds]}


def _threshold_counts(name: str, results_dir: str, gt_root: str, annotation_root: str,
                      thresholds: Sequence[float], infer_size: int,
                      folders: Mapping[str, str], classes: Sequence[str] = VOC_CLASSES,
                      ignore_unknown: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Worker: ((2, nT, K, K) confusions for (cam, icd), (1,) valid gt pixel count)."""
    num_labels = len(classes) + 1
    gt, _ = read_labels(os.path.join(gt_root, name + ".png"), num_labels, ignore_unknown)
    labels, scores = load_image_scores(results_dir, annotation_root, name,
                                       (folders["cam"], folders["icd"]), classes)
    cam, icd = (resize_scores(s, gt.shape, infer_size) for s in scores)
    seeds = threshold_seeds(cam, icd, labels, thresholds)
    confusion = np.stack([np.stack([confusion_matrix(gt, s, num_labels) for s in seeds[kind]])
                          for kind in ("cam", "icd")])
    return confusion, np.array([np.count_nonzero(gt < num_labels)], np.int64)


def threshold_study(results_dir: str, gt_root: str, annotation_root: str, names: Sequence[str],
                    thresholds: Sequence[float] = THRESHOLDS, infer_size: int = INFER_SIZE,
                    folders: Mapping[str, str] = METHOD_SCORE_FOLDERS, workers: int = 1,
                    classes: Optional[Sequence[str]] = None, ignore_unknown: bool = False
                    ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Table 2: {"cam"|"icd": {str(T): {"miou": .., "recall": ..}}}, fractions (module doc)."""
    classes = classes_of_data(classes, gt_root, annotation_root)
    confusion, (valid,) = _map_sum(
        functools.partial(_threshold_counts, results_dir=results_dir, gt_root=gt_root,
                          annotation_root=annotation_root, thresholds=tuple(thresholds),
                          infer_size=infer_size, folders=dict(folders),
                          classes=tuple(classes), ignore_unknown=ignore_unknown),
        names, workers, "threshold study")
    return {kind: {str(float(t)): {"miou": mean_iou(confusion[k, i]),
                                   "recall": float(confusion[k, i].sum() / max(valid, 1))}
                   for i, t in enumerate(thresholds)}
            for k, kind in enumerate(("cam", "icd"))}


# ---------------------------------------------------------------------------------------------
# Pixel-level AP (Table 1, Fig. 5)

def _image_size(path: str) -> Tuple[int, int]:
    """(H, W) of a PNG from its header (no decoding)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: mask not found")
    with Image.open(path) as im:
        return im.size[1], im.size[0]


def class_pixel_scores(results_dir: str, folder: str, gt_root: str, names: Sequence[str],
                       labels: Mapping[str, Sequence[int]], cls: int,
                       infer_size: int = INFER_SIZE, num_labels: int = NUM_SEG_CLASSES,
                       ignore_unknown: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Scores of class `cls` on the valid pixels of the images containing it, split by gt (of
    num_labels labels, `read_labels`).

    One float32 buffer of Σ H·W over those images holds the positives (gt == cls + 1) from the
    front and the negatives from the back: 4 bytes per pixel, no concatenation copy.
    Returns (positive_scores (P,), negative_scores (N,)), views of that buffer.
    """
    images = [n for n in names if cls in labels[n]]
    gt_paths = {n: os.path.join(gt_root, n + ".png") for n in images}
    buffer = np.empty(sum(int(np.prod(_image_size(p))) for p in gt_paths.values()), np.float32)
    head, tail = 0, buffer.size
    for name in images:
        gt, _ = read_labels(gt_paths[name], num_labels, ignore_unknown)
        path = os.path.join(results_dir, folder, name + ".npy")
        channel = list(labels[name]).index(cls)
        scores = load_scores(path, labels[name])[channel:channel + 1]
        score = resize_scores(scores, gt.shape, infer_size)[0]
        valid = gt != IGNORE_LABEL
        positive = gt == cls + 1
        pos, neg = score[positive], score[valid & ~positive]
        buffer[head:head + pos.size] = pos
        buffer[tail - neg.size:tail] = neg
        head, tail = head + pos.size, tail - neg.size
    return buffer[:head], buffer[tail:]


def pixel_ap(results_dir: str, gt_root: str, annotation_root: str, names: Sequence[str],
             infer_size: int = INFER_SIZE,
             folders: Mapping[str, str] = METHOD_SCORE_FOLDERS,
             classes: Optional[Sequence[str]] = None,
             ignore_unknown: bool = False) -> Dict[str, Dict[str, object]]:
    """Table 1 / Fig. 5: per-class pixel-level AP and mAP of each score folder, over `classes`.

    Exact (every pixel ranked). Cost: one pass per (class, folder) over the images containing the
    class; peak memory 4 bytes per pixel of the largest class's images (VOC train_aug, person:
    ~4k images × ~190k pixels ≈ 3 GB), released before the next class.
    Returns {kind: {"map": float, "ap": {class name: float, None without positive pixels}}}.
    """
    classes = classes_of_data(classes, gt_root, annotation_root)
    labels = {n: read_image_labels(os.path.join(annotation_root, n + ".xml"), classes)
              for n in names}
    report = {}
    for kind, folder in folders.items():
        ap = []
        for cls in tqdm(range(len(classes)), desc=f"pixel AP {kind}", unit="class"):
            positive, negative = class_pixel_scores(results_dir, folder, gt_root, names, labels,
                                                    cls, infer_size, len(classes) + 1,
                                                    ignore_unknown)
            ap.append(average_precision(positive, negative))
            del positive, negative
        scored = [v for v in ap if not np.isnan(v)]
        # classes without positive pixels have no AP: null in the report, left out of the mAP
        report[kind] = {"map": float(np.mean(scored)) if scored else None,
                        "ap": {c: None if np.isnan(v) else v for c, v in zip(classes, ap)}}
    return report


# ---------------------------------------------------------------------------------------------
# Reports

def markdown_report(report: Mapping[str, object]) -> str:
    """The evaluation as markdown tables laid out like the paper's (values in %); the per-class
    tables list the classes the report's results name."""
    lines: List[str] = ["# ICD evaluation", ""]
    seeds = report.get("seeds") or {}
    if seeds:
        seg_classes = list(next(iter(seeds.values()))["iou"])
        lines += ["## Seeds (Table 3 layout)", "", "| Seeds | mIoU (%) |", "|---|---|"]
        lines += [f"| {name} | {percent(r['miou'])} |" for name, r in seeds.items()]
        lines += ["", "### Per-class IoU (%)", "",
                  "| Seeds | " + " | ".join(seg_classes) + " |",
                  "|---|" + "---|" * len(seg_classes)]
        lines += [f"| {name} | " + " | ".join(percent(r["iou"][c]) for c in seg_classes) + " |"
                  for name, r in seeds.items()]
        lines += [""] + unknown_lines({
            "ground truth": next(iter(seeds.values()))["unknown_labels"]["ground truth"],
            **{name: r["unknown_labels"]["labels"] for name, r in seeds.items()}})
    ap = report.get("pixel_ap")
    if ap:
        lines += ["## Table 1. Pixel-level mAP", "", "| Method | mAP (%) |", "|---|---|"]
        lines += [f"| {METHOD_NAMES.get(k, k)} | {percent(r['map'])} |" for k, r in ap.items()]
        lines += ["", "## Fig. 5. Per-class pixel-level AP (%)", "",
                  "| Class | " + " | ".join(METHOD_NAMES.get(k, k) for k in ap) + " |",
                  "|---|" + "---|" * len(ap)]
        lines += [f"| {c} | " + " | ".join(percent(ap[k]["ap"][c]) for k in ap) + " |"
                  for c in next(iter(ap.values()))["ap"]]
        lines.append("")
    study = report.get("threshold_study")
    if study:
        lines += ["## Table 2. Seeds by threshold", "",
                  "| Threshold | mIoU CAM (%) | mIoU Ours (%) | recall CAM (%) | recall Ours (%) |",
                  "|---|---|---|---|---|"]
        for t in study["icd"]:
            cam, icd = study["cam"][t], study["icd"][t]
            lines.append(f"| {float(t):.1f} | {percent(cam['miou'])} | {percent(icd['miou'])} | "
                         f"{percent(cam['recall'])} | {percent(icd['recall'])} |")
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class EvalSettings:
    """What `evaluate` evaluates, and how.

    seed_dirs: seed folders, relative to the results folder unless absolute (None: every folder
        under `<results_dir>/seeds`).
    folders: {"cam", "icd"} -> the score folders of the threshold study and the pixel AP.
    thresholds: the T of the threshold study (Table 2).
    infer_size: the side the score maps were made at (None: their provenance record's).
    num_overlays: images in seed_overlays.png.
    ignore_unknown: leave out, and count, the labels outside the class list (`read_labels`).
    """
    seed_dirs: Optional[Tuple[str, ...]] = None
    folders: Mapping[str, str] = field(default_factory=lambda: dict(METHOD_SCORE_FOLDERS))
    thresholds: Tuple[float, ...] = THRESHOLDS
    infer_size: Optional[int] = None
    num_overlays: int = 4
    ignore_unknown: bool = False

    def __post_init__(self):
        if self.seed_dirs is not None:
            object.__setattr__(self, "seed_dirs", tuple(self.seed_dirs))
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        object.__setattr__(self, "folders", dict(self.folders))


def evaluate(results_dir: str, gt_root: str, data: DataPaths,
             settings: EvalSettings = EvalSettings(), out_dir: Optional[str] = None,
             workers: int = 1) -> Dict[str, object]:
    """Run every evaluation whose inputs are given and write the reports, over the dataset's
    class list `data.classes` (label ids: 0 background, class index + 1; other labels are
    refused, or left out and counted with `settings.ignore_unknown`, `read_labels`), on the
    images of `data.data_list` against the ground truth `<gt_root>/<name>.png`.

    - seed mIoU of each folder of `settings.seed_dirs`;
    - with `data.annotation_root`: the threshold study and pixel-level AP of `settings.folders`;
    - with `data.image_root`: seed overlays of the first `settings.num_overlays` images.
    Writes `<out_dir>/eval.json` (fractions), `eval.md` (%), `threshold_study.png`,
    `class_ap.png`, `seed_overlays.png`; out_dir defaults to `<results_dir>/eval`. `workers`:
    processes. Returns the report written to eval.json.

    Inputs are checked first (icd.provenance): seed and score folders must be complete, the score
    folders from one inference run (`check_label_folders`, `score_infer_size`); `infer_size` None
    takes the size the scores were made at. With nothing to evaluate (no seed folder, no
    annotation root) it is an error naming `results_dir`, and nothing is written.
    """
    data = replace(data, classes=classes_of_data(data.classes, gt_root, data.annotation_root))
    names = read_list(data.data_list)
    out_dir = out_dir or os.path.join(results_dir, "eval")
    seed_dirs = settings.seed_dirs
    if seed_dirs is None:
        root = os.path.join(results_dir, "seeds")
        seed_dirs = sorted(os.path.join("seeds", d) for d in os.listdir(root)
                           if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    seed_paths = {d: d if os.path.isabs(d) else os.path.join(results_dir, d) for d in seed_dirs}
    if not seed_paths and data.annotation_root is None:
        _nothing_to_evaluate(results_dir, settings.folders)
    check_label_folders(list(seed_paths.values()), data.classes)
    if data.annotation_root is not None:
        settings = replace(settings, infer_size=score_infer_size(
            results_dir, list(settings.folders.values()), names, settings.infer_size,
            INFER_SIZE, data.classes))
    report: Dict[str, object] = {"data_list": os.path.abspath(data.data_list),
                                 "num_images": len(names), "classes": list(data.classes)}
    report["seeds"] = {d: evaluate_seeds(p, gt_root, names, workers, data.classes,
                                         settings.ignore_unknown)
                       for d, p in seed_paths.items()}
    os.makedirs(out_dir, exist_ok=True)
    if data.annotation_root is not None:
        report.update(_score_reports(results_dir, gt_root, data, names, settings, out_dir,
                                     workers))
    if data.image_root is not None and seed_paths and settings.num_overlays > 0:
        plot_seed_overlays(data.image_root, gt_root, seed_paths, names[:settings.num_overlays],
                           os.path.join(out_dir, "seed_overlays.png"), data.classes)
    write_json(os.path.join(out_dir, "eval.json"), report, indent=2)
    with atomic_path(os.path.join(out_dir, "eval.md")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(markdown_report(report))
    return report


def _score_reports(results_dir: str, gt_root: str, data: DataPaths, names: Sequence[str],
                   settings: EvalSettings, out_dir: str, workers: int) -> Dict[str, object]:
    """The evaluations of the score maps, {"threshold_study", "pixel_ap"}, and their figures
    `<out_dir>/threshold_study.png`, `class_ap.png`."""
    reports = {
        "threshold_study": threshold_study(
            results_dir, gt_root, data.annotation_root, names, settings.thresholds,
            settings.infer_size, settings.folders, workers, data.classes,
            settings.ignore_unknown),
        "pixel_ap": pixel_ap(results_dir, gt_root, data.annotation_root, names,
                             settings.infer_size, settings.folders, data.classes,
                             settings.ignore_unknown)}
    plot_threshold_study(reports["threshold_study"], os.path.join(out_dir, "threshold_study.png"))
    plot_class_ap(reports["pixel_ap"], os.path.join(out_dir, "class_ap.png"))
    return reports


def _nothing_to_evaluate(results_dir: str, folders: Mapping[str, str]) -> None:
    """The error of an evaluation without inputs: the score folders' own when their inference
    run is running or failed (`require_complete`), else one naming `results_dir`."""
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"{results_dir}: no such results folder, nothing to evaluate")
    for folder in dict.fromkeys(folders.values()):
        require_complete(os.path.join(results_dir, folder), "infer_scores.py")
    raise ValueError(f"{results_dir}: nothing to evaluate: no seed folder in "
                     f"{os.path.join(results_dir, 'seeds')} (or given as --seeds), and no "
                     f"annotation root (--annotation-root), which the threshold study and "
                     f"pixel AP of its score maps need")


# ---------------------------------------------------------------------------------------------
# Per-image statistics (for resampling the image set, e.g. a bootstrap)

def _image_statistics(name: str, results_dir: str, gt_root: str, annotation_root: str,
                      seed_dirs: Sequence[str], thresholds: Sequence[float], infer_size: int,
                      folders: Mapping[str, str],
                      classes: Sequence[str]) -> Tuple[str, Dict[str, object]]:
    """Worker: (name, this image's statistics as `image_statistics` lists them)."""
    gt, _ = read_labels(os.path.join(gt_root, name + ".png"), len(classes) + 1)
    study, _ = _threshold_counts(name, results_dir, gt_root, annotation_root, thresholds,
                                 infer_size, folders, classes)
    score_folders = sorted(set(folders.values()))
    labels, scores = load_image_scores(results_dir, annotation_root, name, score_folders,
                                       classes)
    valid = gt != IGNORE_LABEL
    pixels = {}
    for folder, score in zip(score_folders, scores):
        pixels[folder] = {}
        for i, cls in enumerate(labels):   # one channel at a time, as `class_pixel_scores`
            channel = resize_scores(score[i:i + 1], gt.shape, infer_size)[0]
            pixels[folder][cls] = (channel[gt == cls + 1], channel[valid & (gt != cls + 1)])
    return name, {"seeds": [_seed_confusion(name, d, gt_root, len(classes) + 1)[0]
                            for d in seed_dirs],
                  "threshold_study": study, "pixel_scores": pixels}


def image_statistics(results_dir: str, gt_root: str, annotation_root: str, names: Sequence[str],
                     seed_dirs: Sequence[str] = (), thresholds: Sequence[float] = THRESHOLDS,
                     infer_size: int = INFER_SIZE, folders: Mapping[str, str] = METHOD_SCORE_FOLDERS,
                     workers: int = 1, classes: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """The evaluation's statistics per image, in the order of `names` (N images), K = C + 1
    labels of the C `classes`.

    Returns {"seeds": {seed_dir: (N, K, K) int64 confusions},
             "threshold_study": {"cam"|"icd": (N, nT, K, K) int64 confusions},
             "pixel_scores": {score folder: {class index: [(image index, positive scores (P,),
                              negative scores (Q,)) for the images whose labels hold the class]}}}.
    Summed over the images the confusions are `evaluate_seeds`' and `threshold_study`'s; pooled,
    the scores are the pixels `pixel_ap` ranks (same selection: valid gt, positives gt == c + 1).
    """
    classes = classes_of_data(classes, gt_root, annotation_root)
    order = {name: i for i, name in enumerate(names)}
    per_image: List[Optional[Dict[str, object]]] = [None] * len(names)
    job = functools.partial(_image_statistics, results_dir=results_dir, gt_root=gt_root,
                            annotation_root=annotation_root, seed_dirs=tuple(seed_dirs),
                            thresholds=tuple(thresholds), infer_size=infer_size,
                            folders=dict(folders), classes=tuple(classes))
    for name, stats in map_images(job, names, workers, "per-image statistics"):
        per_image[order[name]] = stats
    study = np.stack([s["threshold_study"] for s in per_image])            # (N, 2, nT, K, K)
    pixel_scores: Dict[str, Dict[int, List]] = {}
    for i, stats in enumerate(per_image):
        for folder, classes in stats["pixel_scores"].items():
            for cls, (positive, negative) in classes.items():
                pixel_scores.setdefault(folder, {}).setdefault(cls, []).append(
                    (i, positive, negative))
    return {"seeds": {d: np.stack([s["seeds"][k] for s in per_image])
                      for k, d in enumerate(seed_dirs)},
            "threshold_study": {kind: study[:, k] for k, kind in enumerate(("cam", "icd"))},
            "pixel_scores": pixel_scores}


def label_confusions(label_dir: str, gt_root: str, names: Sequence[str], workers: int = 1,
                     classes: Optional[Sequence[str]] = None, ignore_unknown: bool = False
                     ) -> Tuple[np.ndarray, Dict[str, Dict[str, Dict[str, int]]]]:
    """(N, C+1, C+1) int64 confusion matrices of `<label_dir>/<name>.png` (seeds or predictions)
    against the ground truth, in the order of `names` (summed they are `evaluate_seeds`'), and
    the labels outside `classes` that `ignore_unknown` left out (`unknown_report`)."""
    classes = classes_of_data(classes, gt_root)
    num_labels = len(classes) + 1
    order = {name: i for i, name in enumerate(names)}
    confusions = np.zeros((len(names), num_labels, num_labels), np.int64)
    unknown = np.zeros((len(UNKNOWN_SIDES), 2, 256), np.int64)
    job = functools.partial(_named_confusion, seed_dir=label_dir, gt_root=gt_root,
                            num_labels=num_labels, ignore_unknown=ignore_unknown)
    for name, (confusion, counts) in map_images(job, names, workers, "per-image confusions"):
        confusions[order[name]] = confusion
        unknown += counts
    return confusions, unknown_report(unknown)


def image_confusions(label_dir: str, gt_root: str, names: Sequence[str], workers: int = 1,
                     classes: Optional[Sequence[str]] = None) -> np.ndarray:
    """`label_confusions`' matrices, labels outside `classes` refused."""
    return label_confusions(label_dir, gt_root, names, workers, classes)[0]


def _named_confusion(name: str, seed_dir: str, gt_root: str, num_labels: int,
                     ignore_unknown: bool) -> Tuple[str, Tuple[np.ndarray, np.ndarray]]:
    """Worker of `label_confusions`: (name, `_seed_confusion`), since a pool's results come
    unordered."""
    return name, _seed_confusion(name, seed_dir, gt_root, num_labels, ignore_unknown)
