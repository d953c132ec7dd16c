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
The inputs are checked as icd-eval checks them: the class list against the data's classes.txt,
each folder given once, its provenance record complete and made with that list, no label outside
the list (unless --ignore-unknown-labels). Exit status 0 whatever the verdict; --out FILE writes
every number as JSON (never over one of the inputs).
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.classes import dataset_classes
from ..data.voc import read_list
from ..evaluate import check_label_folders, label_confusions, unknown_lines
from ..io import write_json
from ..pipeline.compare import describe_comparison
from ..pipeline.settings import PaperSettings
from ..stats import BOOTSTRAP_SEED, LEVEL, RESAMPLES, compare_runs
from .evaluate import add_unknown_labels_argument
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
    add_unknown_labels_argument(parser)
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


def _inputs(args: argparse.Namespace) -> Dict[str, Tuple[str, Optional[str]]]:
    """The data of the comparison, {"gt_root" | "data_list" | "classes" | "config": (where it was
    given, path)}: the flags, else --config's."""
    inputs = {"gt_root": ("--gt-root", args.gt_root), "data_list": ("--data-list", args.data_list),
              "classes": ("--classes", args.classes), "config": ("--config", None)}
    if args.config:
        settings = PaperSettings(args.config, out=".")
        config = settings.config
        if args.split not in settings.splits:
            raise ValueError(f"--split: {args.split!r} is not a split of {config} "
                             f"({', '.join(settings.splits)})")
        inputs["config"] = ("--config", config)
        for key, value in (("gt_root", (f"{config}: pipeline: gt_root", settings.data.gt_root)),
                           ("data_list", (f"{config}: the list of split {args.split}",
                                          settings.eval_list(args.split))),
                           ("classes", (f"{config}: classes", settings.icd.classes))):
            if not inputs[key][1] and value[1]:
                inputs[key] = value
    for key, flag in (("gt_root", "--gt-root"), ("data_list", "--data-list")):
        if not inputs[key][1]:
            raise ValueError(f"{flag}: required (or --config)")
    return inputs


def _compare(args: argparse.Namespace) -> int:
    inputs = _inputs(args)
    gt_root, data_list = inputs["gt_root"][1], inputs["data_list"][1]
    classes = dataset_classes(inputs["classes"][1], gt_root, flag=inputs["classes"][0])
    sides = [label_folders(side, args.split, args.seeds) for side in (args.better, args.worse)]
    check_label_folders(sides[0] + sides[1], classes)
    if args.out:
        given = [inputs[key] for key in ("data_list", "classes", "config")]
        given += [(f"folder {name}", f) for name, side in zip("AB", (args.better, args.worse))
                  for f in side.split(",") if f]
        read = [inputs["gt_root"]] + [(f"the label folder of {name}", f)
                                      for name, folders in zip("AB", sides) for f in folders]
        _check_out(args.out, given, read)
    names = read_list(data_list)
    confusions, unknown = [], {}
    for folders in sides:
        confusions.append([])
        for folder in folders:
            matrices, found = label_confusions(folder, gt_root, names, args.workers, classes,
                                               args.ignore_unknown_labels)
            confusions[-1].append(matrices)
            unknown.update({"ground truth": found["ground truth"], folder: found["labels"]})
    result = compare_runs(confusions[0], confusions[1], list(range(len(classes) + 1)),
                          args.resamples, BOOTSTRAP_SEED, LEVEL)
    print(f"A = {args.better}\nB = {args.worse}\n{len(names)} images of {data_list}, mIoU over "
          f"all {len(classes) + 1} labels, {args.resamples} resamples:")
    print("A vs B: " + describe_comparison(result))
    print("\n".join(unknown_lines(unknown)), end="")
    if args.out:
        write_json(args.out, dict(result, better=args.better, worse=args.worse,
                                  data_list=os.path.abspath(data_list), classes=list(classes),
                                  unknown_labels=unknown))
    return 0


def _check_out(out: str, inputs: Sequence[Tuple[str, Optional[str]]],
               read: Sequence[Tuple[str, str]]) -> None:
    """--out must name a file to write that is none of the comparison's `inputs` [(what, path)]
    and lies outside the folders whose files it `read` (ground truth, label maps): the JSON
    would replace it, or one of their files."""
    target = os.path.realpath(out)
    for name, path in list(inputs) + list(read):
        if path and os.path.realpath(path) == target:
            raise ValueError(f"--out {out}: the same path as {name} ({path}); icd-compare never "
                             f"writes over its inputs: choose another file")
    for name, path in read:
        if os.path.commonpath([os.path.realpath(path), target]) == os.path.realpath(path):
            raise ValueError(f"--out {out}: inside {name} ({path}), whose files are compared; "
                             f"icd-compare never writes over its inputs: choose another file")
    if os.path.isdir(out):
        raise ValueError(f"--out {out}: is a folder; give the JSON file to write, e.g. "
                         f"--out {os.path.join(out, 'compare.json')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _compare, argv)
