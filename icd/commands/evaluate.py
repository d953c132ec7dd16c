r"""Evaluate seeds (mIoU, Table 3) and score maps (threshold study, Table 2; pixel AP, Table 1).

Examples:
  icd-eval --results snapshot/icd/results --gt-root data/VOC2012/SegmentationClassAug \
      --data-list data/VOC2012/ImageSets/Segmentation/train_aug.txt \
      --annotation-root data/VOC2012/Annotations --image-root data/VOC2012/JPEGImages
  icd-eval --config voc_vgg16     the same paths from the config (gt_root and the list from its
                                  pipeline: section: evaluate.list, else data_list)
Writes <out>/eval.json, eval.md and figures, and prints eval.md.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..data.classes import dataset_classes
from ..data.dataset import DataPaths
from ..evaluate import THRESHOLDS, EvalSettings, evaluate
from ..io import exclusive_lock
from ..provenance import lock_path
from .options import add_config_file, fill_from_config
from .runner import Parser, add_classes_argument, fraction, non_negative_int, positive_int, run


def add_unknown_labels_argument(parser: argparse.ArgumentParser) -> None:
    """`--ignore-unknown-labels` (icd-eval, icd-compare): leave out, and count, the labels outside
    the class list instead of refusing them (icd.evaluate.read_labels)."""
    parser.add_argument("--ignore-unknown-labels", action="store_true",
                        help="leave out the pixels whose label (ground truth, seed or "
                             "prediction) is in no class of the list and not 255, and count "
                             "them in the report (default: such a label is an error naming the "
                             "image and the value)")


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-eval")
    add_config_file(parser)
    parser.add_argument("--results", default=None,
                        help="results folder (required, or <snapshot>/results of --config)")
    parser.add_argument("--gt-root", default=None,
                        help="SegmentationClass(Aug) folder of <name>.png (required, or "
                             "--config's pipeline: gt_root)")
    parser.add_argument("--data-list", default=None,
                        help="list file, one image name per line (required, or --config's)")
    add_classes_argument(parser)
    add_unknown_labels_argument(parser)
    parser.add_argument("--seeds", nargs="*", default=None, metavar="FOLDER",
                        help="seed folders, relative to --results unless absolute "
                             "(default: every folder under <results>/seeds)")
    parser.add_argument("--annotation-root", default=None,
                        help="folder of <name>.xml: enables the threshold study and pixel AP "
                             "(default: none, both skipped)")
    parser.add_argument("--image-root", default=None,
                        help="folder of <name>.jpg: seed overlays (default: none, skipped)")
    parser.add_argument("--cam-scores", default="scores_cam", help="CAM score folder")
    parser.add_argument("--icd-scores", default="scores_icd", help="ICD score folder")
    parser.add_argument("--thresholds", type=fraction, nargs="+", default=list(THRESHOLDS),
                        metavar="T", help="thresholds of the study, each in [0, 1)")
    parser.add_argument("--infer-size", type=positive_int, default=None,
                        help="input side the score maps were computed at (default: the size "
                             "their provenance record names; the release's 513 without one)")
    parser.add_argument("--overlays", type=non_negative_int, default=4,
                        help="images in seed_overlays.png")
    parser.add_argument("--workers", type=positive_int, default=min(32, os.cpu_count() or 1),
                        help="processes (default: the number of CPUs, at most 32)")
    parser.add_argument("--out", default=None, help="report folder (default: <results>/eval)")
    return parser


CONFIG_PATHS = {"results": lambda cfg, section: os.path.join(cfg.snapshot, "results"),
                "gt_root": lambda cfg, section: section.get("gt_root"),
                "data_list": lambda cfg, section: (section.get("evaluate") or {}).get("list")
                or cfg.data_list,
                "annotation_root": lambda cfg, section: cfg.annotation_root,
                "image_root": lambda cfg, section: cfg.image_root,
                "classes": lambda cfg, section: cfg.classes}


def _evaluate(args: argparse.Namespace) -> int:
    fill_from_config(args, CONFIG_PATHS, required=("results", "gt_root", "data_list"))
    if len(set(args.thresholds)) != len(args.thresholds):
        raise ValueError(f"--thresholds: repeated values in {args.thresholds}")
    data = DataPaths(args.image_root, args.annotation_root, args.data_list,
                     dataset_classes(args.classes, args.gt_root, args.annotation_root,
                                     args.image_root))
    settings = EvalSettings(seed_dirs=args.seeds,
                            folders={"cam": args.cam_scores, "icd": args.icd_scores},
                            thresholds=args.thresholds, infer_size=args.infer_size,
                            num_overlays=args.overlays, ignore_unknown=args.ignore_unknown_labels)
    out = args.out or os.path.join(args.results, "eval")
    with exclusive_lock(lock_path(out), out):   # one evaluation writes a report folder at a time
        evaluate(args.results, args.gt_root, data, settings, out_dir=out, workers=args.workers)
    with open(os.path.join(out, "eval.md"), encoding="utf-8") as f:
        print(f.read())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _evaluate, argv)
