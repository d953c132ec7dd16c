r"""Write score maps (results/scores_cam, scores_icd, ...) of a trained checkpoint.

Example:
  icd-infer --config experiments/voc_vgg16.yaml --gpus 0,1 --epoch 19
By default the checkpoint is <snapshot>/<model>-<epoch>.params and the results go to
<snapshot>/results (the release's layout).
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from ..infer import infer
from ..runs import checkpoint_path
from ..provenance import require_outputs_apart
from .options import add_config_arguments, add_shard_argument, config_from, devices_for
from .runner import Parser, non_negative_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-infer")
    add_config_arguments(parser, "infer")
    parser.add_argument("--epoch", type=non_negative_int, default=None,
                        help="epoch of the checkpoint (default: num_epoch - 1)")
    parser.add_argument("--params", default=None,
                        help="checkpoint file (default: <snapshot>/<model>-<epoch>.params)")
    parser.add_argument("--out", default=None, help="results folder (default: <snapshot>/results)")
    add_shard_argument(parser)
    return parser


def _infer(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    contexts = devices_for(cfg, cfg.infer_batch_size, "--infer-batch-size")
    params = args.params or checkpoint_path(
        cfg, cfg.num_epoch - 1 if args.epoch is None else args.epoch)
    out = args.out or os.path.join(cfg.snapshot, "results")
    require_outputs_apart({"--out": out}, {"--image-root": cfg.image_root,
                                            "--superpixel-root": cfg.superpixel_root,
                                            "--annotation-root": cfg.annotation_root})
    names = infer(cfg, params, out, contexts, args.shard)
    logging.info("wrote score maps of %d images to %s", len(names), out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _infer, argv)
