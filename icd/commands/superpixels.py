r"""Superpixels of a list of images: Felzenszwalb + greedy merge to <= 64 regions.

Examples:
  icd-superpixels --image-root data/VOC2012/JPEGImages \
      --data-list data/VOC2012/ImageSets/Segmentation/train_aug.txt \
      --out data/superpixels --pretrained data/vgg16_20M.params --workers 4    (the release's way)
  icd-superpixels ... --pretrained data/vgg16_20M.params --gpus 0,1 --workers 2
                                              (conv5_3 on two GPUs, one worker each)
  icd-superpixels ... --features colour       (without network weights: colour and position)
Resumable: existing PNGs are kept unless --overwrite.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..data.superpixels import make_feature_factory, make_superpixels
from ..devices import parse_devices
from .runner import Parser, non_negative_int, run, shard


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-superpixels")
    parser.add_argument("--image-root", required=True, help="folder of <name>.jpg (required)")
    parser.add_argument("--data-list", required=True,
                        help="list file of image names (required)")
    parser.add_argument("--out", required=True, help="folder for <name>.png (required)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="worker processes (0: this one)")
    features = parser.add_mutually_exclusive_group(required=True)
    features.add_argument("--pretrained", metavar="PARAMS",
                          help="backbone checkpoint: merge on its conv5_3 features (the "
                               "release's way); one of --pretrained, --features is required")
    features.add_argument("--features", choices=["colour"],
                          help="network-free features: centred Lab colour + position (one of "
                               "--pretrained, --features is required)")
    parser.add_argument("--gpus", default="",
                        help="GPUs of the --pretrained network, e.g. 0,1: worker k uses the "
                             "(k mod N)-th (default: the CPU)")
    parser.add_argument("--cpus", type=non_negative_int, default=0,
                        help="CPU contexts instead of --gpus, as the other commands (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing PNGs")
    parser.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N",
                        help="only shard I of N of the list (every N-th name from the I-th); "
                             "N machines running the N shards write what one run writes "
                             "(default: the whole list)")
    return parser


def _superpixels(args: argparse.Namespace) -> int:
    devices = [str(ctx) for ctx in parse_devices(args.gpus, args.cpus)]
    written = make_superpixels(args.image_root, args.data_list, args.out,
                               feature_factory=make_feature_factory(args.pretrained, devices),
                               workers=args.workers, overwrite=args.overwrite, shard=args.shard)
    print(f"wrote {len(written)} superpixel maps to {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _superpixels, argv)
