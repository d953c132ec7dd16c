r"""Train DeepLab on the seeds (or on ground-truth masks: the fully-supervised upper bound).

Example:
  icd-train-seg --config deeplab_largefov_vgg16 --seeds snapshot/icd/results/seeds/crf --gpus 0,1
--seeds is the folder of label maps <name>.png (ids 0..C, 255 ignored) for every image of
--data-list: the seeds `results/seeds/crf` or `seeds/sal`, or `SegmentationClassAug`. A seeds
folder whose make_seeds run is running or failed is refused. The loop is ICD's (icd/engine):
checkpoints <snapshot>/<model>-<epoch>.params/.states/.json, <model>-log.json, demo/ pictures
(image | labels | prediction); --begin-epoch K resumes from checkpoint K-1 bit for bit;
--overwrite replaces an earlier run's checkpoints.
Exit status: 0 trained, 1 error, 2 bad arguments, 3 the loss became NaN or infinite, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..engine import TrainingDiverged
from ..model import model_spec, models_of
from .options import add_config_arguments, config_from
from .runner import Parser, run
from .train import EXIT_DIVERGED, add_resume_argument, checked_train


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-train-seg", conflict_handler="resolve")
    add_config_arguments(parser, "train_seg")
    parser.add_argument("--seeds", "--label-root", dest="label_root", default=argparse.SUPPRESS,
                        help="folder of training label maps <name>.png (default: the config's "
                             "label_root)")
    add_resume_argument(parser)
    return parser


def _train_seg(args: argparse.Namespace) -> int:
    cfg = config_from(args, data=("image_root", "label_root"))
    if model_spec(cfg.model).task != "segmentation":
        raise ValueError(f"--model: {cfg.model} is not a segmentation model (one of "
                         f"{', '.join(models_of('segmentation'))}); "
                         f"icd-train trains the ICD models")
    return checked_train(cfg, args.resume)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _train_seg, argv, statuses={TrainingDiverged: EXIT_DIVERGED})
