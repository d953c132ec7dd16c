r"""MS COCO instances -> the VOC layout (JPEGImages, Annotations, SegmentationClass, ImageSets,
classes.txt), for training and evaluating on COCO with `--classes <out>/classes.txt`.

Examples:
  icd-coco-to-voc --coco-root data/coco --annotations instances_train2014.json --out data/coco_voc
  icd-coco-to-voc --coco-root data/coco --annotations instances_val2014.json --out data/coco_voc
Label maps: 0 background, class index + 1 in classes.txt order, 255 where instances of different
classes overlap or only a crowd region covers the pixel. Images without instances are left out.
Resumable: an image whose files exist is kept unless --overwrite.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..data.coco import IMAGE_MODES, coco_to_voc
from .runner import Parser, positive_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-coco-to-voc")
    parser.add_argument("--coco-root", required=True,
                        help="COCO folder holding train2014/, val2014/, annotations/ (required)")
    parser.add_argument("--annotations", required=True,
                        help="instances file; a bare name is looked up in <coco-root>/annotations "
                             "(required)")
    parser.add_argument("--out", required=True, help="dataset folder in VOC layout (required)")
    parser.add_argument("--split", default=None,
                        help="list written to ImageSets/Segmentation/<split>.txt (default: from "
                             "the file name, instances_train2014.json -> train, "
                             "instances_val2014.json -> val)")
    parser.add_argument("--image-dir", default=None,
                        help="folder of the split's images (default: <coco-root>/train2014 etc. "
                             "from the file name)")
    parser.add_argument("--images", choices=IMAGE_MODES, default="symlink",
                        help="JPEGImages entries: absolute symbolic links to the COCO images, "
                             "or copies")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes (default: the number of CPUs, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing files")
    return parser


def _convert(args: argparse.Namespace) -> int:
    summary = coco_to_voc(args.coco_root, args.annotations, args.out, split=args.split,
                          image_dir=args.image_dir, images=args.images, workers=args.workers,
                          overwrite=args.overwrite)
    left_out = summary["left_out"]
    print(f"{summary['written']} written, {summary['kept']} kept, "
          f"{summary['without_instances']} without instances left out, "
          f"{sum(left_out.values())} instances left out ({left_out['odd_polygon']} with a "
          f"polygon of an odd number of coordinates, {left_out['outside_image']} wholly outside "
          f"their image) -> {summary['list']} (classes: {summary['classes']})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _convert, argv)
