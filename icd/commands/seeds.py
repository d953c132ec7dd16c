r"""Seeds from score maps: <results>/seeds/{crf,sal,nocrf}/<name>.png (index PNGs, 255 undefined).

Examples:
  icd-seeds --results snapshot/icd/results --image-root data/VOC2012/JPEGImages \
      --annotation-root data/VOC2012/Annotations \
      --data-list data/VOC2012/ImageSets/Segmentation/train_aug.txt --workers 32
  icd-seeds --config voc_vgg16 --workers 32      the same: paths, classes, <snapshot>/results
Resumable: existing seeds are kept unless --overwrite.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..data.classes import dataset_classes
from ..data.dataset import DataPaths
from ..seeds import SeedSettings, make_seeds
from .options import add_config_file, add_shard_argument, fill_from_config
from .runner import Parser, add_classes_argument, positive_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-seeds")
    add_config_file(parser)
    parser.add_argument("--results", default=None,
                        help="results folder holding scores_cam/ etc. (required, or "
                             "<snapshot>/results of --config)")
    parser.add_argument("--image-root", default=None,
                        help="folder of <name>.jpg (required, or --config's)")
    parser.add_argument("--annotation-root", default=None,
                        help="folder of <name>.xml (required, or --config's)")
    parser.add_argument("--data-list", default=None,
                        help="list file, one image name per line (required, or --config's)")
    add_classes_argument(parser)
    parser.add_argument("--saliency-root", default=None,
                        help="folder of <name>.png saliency maps: writes seeds/sal, no CRF "
                             "(default: none)")
    parser.add_argument("--infer-size", type=positive_int, default=None,
                        help="input side the score maps were computed at (default: the size "
                             "their provenance record names; the release's 513 without one)")
    parser.add_argument("--workers", type=positive_int, default=min(32, os.cpu_count() or 1),
                        help="processes (default: the number of CPUs, at most 32)")
    parser.add_argument("--no-crf", action="store_true", help="pre-CRF seeds (seeds/nocrf)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing seeds")
    parser.add_argument("--icd-scores", default="scores_icd",
                        help="ICD score folder under --results (scores_icd_bu, scores_icd_bu_sp "
                             "for Table 3; their seeds go to seeds/<variant>_icd_bu...)")
    parser.add_argument("--cam-scores", default="scores_cam", help="CAM score folder")
    parser.add_argument("--out", default=None,
                        help="output folder (default: seeds/<variant>, see --icd-scores)")
    add_shard_argument(parser)
    return parser


CONFIG_PATHS = {"results": lambda cfg, section: os.path.join(cfg.snapshot, "results"),
                "image_root": lambda cfg, section: cfg.image_root,
                "annotation_root": lambda cfg, section: cfg.annotation_root,
                "data_list": lambda cfg, section: cfg.data_list,
                "classes": lambda cfg, section: cfg.classes}


def _seeds(args: argparse.Namespace) -> int:
    fill_from_config(args, CONFIG_PATHS, required=tuple(CONFIG_PATHS)[:4])
    data = DataPaths(args.image_root, args.annotation_root, args.data_list,
                     dataset_classes(args.classes, args.image_root, args.annotation_root))
    settings = SeedSettings(crf=not args.no_crf, saliency_root=args.saliency_root,
                            infer_size=args.infer_size, icd_folder=args.icd_scores,
                            cam_folder=args.cam_scores)
    summary = make_seeds(args.results, data, settings, out_dir=args.out, workers=args.workers,
                         overwrite=args.overwrite, shard=args.shard)
    print(f"{summary['written']} written, {summary['skipped']} kept -> {summary['out_dir']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _seeds, argv)
