r"""Compare the seeds (or predictions) of two result folders with a 95% bootstrap interval:
"A beats B by X [lo, hi]". Several folders per side (one per training seed, comma-separated or
a repeated icd-run folder) add a level: training seeds are resampled, then images.

Examples:
  icd-compare runs/voc/results_icd runs/voc/results_cam --split train --config voc_vgg16
  icd-compare snapshot/icd/results snapshot/cam/results --seeds crf \
      --gt-root data/VOC2012/SegmentationClassAug \
      --data-list data/VOC2012/ImageSets/Segmentation/train.txt
  icd-compare runs/a/seed0,runs/a/seed1,runs/a/seed2 runs/b --split train --config synthetic_run
A folder is read as: an icd-run folder (results_icd/<split>/seeds/<seeds>; seed<k>/ folders
of a --repeat run are its models), a results folder (<folder>/<split>/seeds/<seeds> or
<folder>/seeds/<seeds>, <seeds>_cam for a CAM baseline's), or a folder of label PNGs itself.
Exit status 0 whatever the verdict; --out FILE writes every number as JSON.
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import List, Optional, Sequence

from ..data.classes import read_classes
from ..data.voc import read_list
from ..evaluate import image_confusions
from ..io import write_json
from ..paper import PaperSettings, describe_comparison
from ..stats import BOOTSTRAP_SEED, LEVEL, RESAMPLES, compare_runs
from .runner import Parser, add_classes_argument, positive_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-compare")
    parser.add_argument("better", metavar="A", help="folder(s) of the side claimed better, "
                                                     "comma-separated (required)")
    parser.add_argument("worse", metavar="B", help="folder(s) of the other side (required)")
    parser.add_argument("--split", default="train",
                        help="the split folder under a results folder; with --config also the "
                             "split whose list and ground truth are used")
    parser.add_argument("--seeds", default="crf",
                        help="seed folder under <results>/seeds (crf, nocrf, nocrf_icd_bu, ...)")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="an icd-run config: its classes, gt_root and the split's "
                             "evaluation list (default: none, give the three flags below)")
    parser.add_argument("--gt-root", default=None,
                        help="folder of ground-truth <name>.png (required, or --config's)")
    parser.add_argument("--data-list", default=None,
                        help="images compared, one name per line (required, or --config's "
                             "list of --split)")
    add_classes_argument(parser)
    parser.add_argument("--resamples", type=positive_int, default=RESAMPLES,
                        help="bootstrap resamples")
    parser.add_argument("--workers", type=positive_int, default=min(32, os.cpu_count() or 1),
                        help="processes (default: the number of CPUs, at most 32)")
    parser.add_argument("--out", default=None, help="JSON file for every number (default: none)")
    return parser


def label_folders(side: str, split: str, seeds: str) -> List[str]:
    """The label-map folders of one side (see the module docstring), one per trained model."""
    found = []
    for folder in (f for f in side.split(",") if f):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such folder")
        repeated = sorted(glob.glob(os.path.join(glob.escape(folder), "seed*", "results_icd")))
        roots = [os.path.dirname(r) for r in repeated] or [folder]
        for root in roots:
            found.append(_labels(root, split, seeds))
    return found


def _labels(folder: str, split: str, seeds: str) -> str:
    for base in (os.path.join(folder, "results_icd", split), os.path.join(folder, split), folder):
        for name in (seeds, seeds + "_cam"):
            path = os.path.join(base, "seeds", name)
            if os.path.isdir(path):
                return path
    if glob.glob(os.path.join(glob.escape(folder), "*.png")):
        return folder
    raise FileNotFoundError(f"{folder}: no seeds/{seeds} folder for split {split!r} and no "
                            f"label PNGs in it")


def _compare(args: argparse.Namespace) -> int:
    gt_root, data_list, classes = args.gt_root, args.data_list, None
    if args.config:
        settings = PaperSettings(args.config, out=".")
        if args.split not in settings.splits:
            raise ValueError(f"--split: {args.split!r} is not a split of {settings.config} "
                             f"({', '.join(settings.splits)})")
        gt_root = gt_root or settings.gt_root
        data_list = data_list or settings.eval_list(args.split)
        classes = settings.icd.class_names if args.classes is None else None
    for flag, value in (("--gt-root", gt_root), ("--data-list", data_list)):
        if not value:
            raise ValueError(f"{flag}: required (or --config)")
    classes = classes or read_classes(args.classes)
    names = read_list(data_list)
    sides = [[image_confusions(folder, gt_root, names, args.workers, classes)
              for folder in label_folders(side, args.split, args.seeds)]
             for side in (args.better, args.worse)]
    result = compare_runs(sides[0], sides[1], list(range(len(classes) + 1)), args.resamples,
                          BOOTSTRAP_SEED, LEVEL)
    print(f"A = {args.better}\nB = {args.worse}\n{len(names)} images of {data_list}, mIoU over "
          f"all {len(classes) + 1} labels, {args.resamples} resamples:")
    print("A vs B: " + describe_comparison(result))
    if args.out:
        write_json(args.out, dict(result, better=args.better, worse=args.worse,
                                  data_list=os.path.abspath(data_list)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _compare, argv)
