r"""Superpixels of a list of images: Felzenszwalb + greedy merge to <= 64 regions.

Examples:
  icd-superpixels --image-root data/VOC2012/JPEGImages \
      --data-list data/VOC2012/ImageSets/Segmentation/train_aug.txt \
      --out data/superpixels --pretrained data/vgg16_20M.params --workers 4    (the release's way)
  icd-superpixels ... --pretrained data/vgg16_20M.params --gpus 0,1 --workers 2
                                              (conv5_3 on two GPUs, one worker each)
  icd-superpixels ... --features colour       (without network weights: colour and position)
  icd-superpixels --config voc_vgg16 --workers 4     paths and the weights from the config
Resumable: existing PNGs are kept unless --overwrite.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..data.superpixels import MAX_PIXELS
from ..features import superpixels_on_devices
from ..config import load_config
from .options import add_config_file, add_shard_argument, fill_from_config
from ..devices import parse_devices
from ..provenance import require_outputs_apart
from .runner import Parser, non_negative_int, run


class _Parser(Parser):
    """Without --config one of --pretrained, --features is a usage error (as a required group)."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.config is None and parsed.pretrained is None and parsed.features is None:
            self.error("one of the arguments --pretrained --features is required (or a "
                       "--config naming a pretrained file)")
        return parsed


def build_parser() -> Parser:
    parser = _Parser(__doc__, prog="icd-superpixels")
    add_config_file(parser)
    parser.add_argument("--image-root", default=None,
                        help="folder of <name>.jpg (required, or --config's)")
    parser.add_argument("--data-list", default=None,
                        help="list file of image names (required, or --config's)")
    parser.add_argument("--out", default=None,
                        help="folder for <name>.png (required, or --config's superpixel_root)")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="worker processes (0: this one); at most 2 per GPU with "
                             "--pretrained on --gpus, at most the number of CPUs otherwise, "
                             "each with its share of the CPUs' threads")
    features = parser.add_mutually_exclusive_group()
    features.add_argument("--pretrained", metavar="PARAMS",
                          help="backbone checkpoint: merge on its conv5_3 features (the "
                               "release's way); one of --pretrained, --features is required "
                               "(or --config's pretrained file)")
    features.add_argument("--features", choices=["colour"],
                          help="network-free features: centred Lab colour + position (one of "
                               "--pretrained, --features is required)")
    parser.add_argument("--gpus", default="",
                        help="GPUs of the --pretrained network, e.g. 0,1: worker k uses the "
                             "(k mod N)-th (default: the CPU)")
    parser.add_argument("--cpus", type=non_negative_int, default=0,
                        help="CPU contexts instead of --gpus, as the other commands (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing PNGs")
    parser.add_argument("--max-pixels", type=non_negative_int, default=MAX_PIXELS,
                        help=f"refuse images of more pixels, naming them (default {MAX_PIXELS}: "
                             f"2048x2048; 0: no limit; time and memory grow ~ pixels^2 above)")
    parser.add_argument("--downscale", action="store_true",
                        help="instead of refusing an image above --max-pixels, compute its "
                             "superpixels on a copy scaled down to --max-pixels pixels and map "
                             "them back to its size (not the release)")
    add_shard_argument(parser)
    return parser


CONFIG_PATHS = {"image_root": lambda cfg, section: cfg.image_root,
                "data_list": lambda cfg, section: cfg.data_list,
                "out": lambda cfg, section: cfg.superpixel_root}


def _superpixels(args: argparse.Namespace) -> int:
    if args.config and args.features is None and args.pretrained is None:
        args.pretrained = load_config(args.config).pretrained
    fill_from_config(args, CONFIG_PATHS, required=tuple(CONFIG_PATHS))
    if args.features is None and args.pretrained is None:
        raise ValueError("--pretrained: one of --pretrained, --features is required (the "
                         "config names no pretrained file)")
    require_outputs_apart({"--out": args.out}, {"--image-root": args.image_root})
    devices = [str(ctx) for ctx in parse_devices(args.gpus, args.cpus)]
    written = superpixels_on_devices(args.image_root, args.data_list, args.out, args.pretrained,
                                     devices, args.workers, overwrite=args.overwrite,
                                     shard=args.shard, max_pixels=args.max_pixels,
                                     downscale=args.downscale)
    print(f"wrote {len(written)} superpixel maps to {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _superpixels, argv)
