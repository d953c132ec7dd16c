r"""Write the built-in synthetic dataset in the VOC layout (JPEGImages, Annotations,
SegmentationClass, ImageSets/Segmentation/{train,val}.txt, classes.txt).

Example:
  icd-synthetic --out data/synthetic --num-train 200 --num-val 50
  icd-synthetic --out data/mine --classes my_classes.txt     (any class names, one per line)
Train and evaluate on it with --classes <out>/classes.txt: mask ids follow that list.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..data.classes import read_classes
from ..data.synthetic import DEFAULT_CLASSES, make_synthetic_voc
from .runner import Parser, non_negative_int, positive_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-synthetic")
    parser.add_argument("--out", required=True, help="dataset folder (required)")
    parser.add_argument("--num-train", type=positive_int, default=200, help="training images")
    parser.add_argument("--num-val", type=non_negative_int, default=50, help="validation images")
    parser.add_argument("--size", type=positive_int, default=112,
                        help="image side in pixels (varies by ±15%%)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help=f"class-list file, one name per line (any names; mask id = line "
                             f"number) (default: {len(DEFAULT_CLASSES)} VOC names, "
                             f"{' '.join(DEFAULT_CLASSES)})")
    return parser


def _synthetic(args: argparse.Namespace) -> int:
    names = make_synthetic_voc(args.out, num_train=args.num_train, num_val=args.num_val,
                               size=args.size, seed=args.seed,
                               classes=read_classes(args.classes) if args.classes
                               else DEFAULT_CLASSES)
    print(", ".join(f"{len(v)} {k}" for k, v in names.items()), "images in", args.out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _synthetic, argv)
