r"""Train ICD (or the CAM-only baseline / an ablation) with the release's flags.

Examples:
  icd-train --config experiments/voc_vgg16.yaml --gpus 0,1      the paper's setting
  icd-train --config synthetic_demo --cpus 2                    a shipped config by name
  icd-train --config experiments/voc_vgg16.yaml --gpus 0,1 --begin-epoch 5    resume
  icd-train --config experiments/voc_vgg16.yaml --gpus 0,1 --resume auto      resume or start
  icd-launch -n 2 -s 2 --launcher ssh -H hosts -- icd-train --config voc_vgg16 --gpus 0 \
      --batch-size 16 --kvstore dist_device_sync                  two machines (icd-launch)
Flags override the config file; `--begin-epoch K` resumes from checkpoint K-1 and its .states;
`--resume auto` from the last complete checkpoint of the same run (its run record names the
same settings), or starts fresh when there is none; another run's checkpoints are refused.
Exit status: 0 trained, 1 error, 2 bad arguments, 3 the loss became NaN or infinite.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..checkpoint import read_states
from ..config import Config
from ..engine import EXIT_STATUSES, TrainingDiverged
from ..runs import checkpoint_path, resume_auto
from ..tasks import train
from .options import add_config_arguments, config_from, devices_for
from .runner import Parser, run

EXIT_DIVERGED = EXIT_STATUSES[TrainingDiverged]


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-train")
    add_config_arguments(parser, "train")
    add_resume_argument(parser)
    return parser


def add_resume_argument(parser: Parser) -> None:
    parser.add_argument("--resume", choices=("auto",), default=None,
                        help="auto: continue from the last complete checkpoint of the same run "
                             "in --snapshot, or start fresh without one (default: start at "
                             "--begin-epoch)")


def check_resume(cfg: Config) -> None:
    """The checkpoint pair a resumed run starts from exists and its .states passes the
    restricted reader (icd.checkpoint.read_states: nothing in it is run), so a bad file is named
    before anything is built."""
    epoch = cfg.begin_epoch - 1
    params, states = checkpoint_path(cfg, epoch), checkpoint_path(cfg, epoch, "states")
    for path in (params, states):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: checkpoint of epoch {epoch} to resume from "
                                    f"(--begin-epoch {cfg.begin_epoch}) not found")
    read_states(states)


def _train(args: argparse.Namespace) -> int:
    return checked_train(config_from(args), args.resume)


def checked_train(cfg: Config, resume: Optional[str] = None) -> int:
    """Train `cfg` after the checks a user's flags can fail: epochs to train, a batch that
    splits over the devices, a resumable checkpoint pair. `resume` "auto": from the last
    complete checkpoint of the same run (icd.runs.resume_auto); nothing when it is the last."""
    if resume == "auto":
        if cfg.begin_epoch > 0:
            raise ValueError("--resume: auto finds the epoch itself; leave out --begin-epoch")
        cfg = resume_auto(cfg)
        if cfg.begin_epoch >= cfg.num_epoch:
            print(f"{checkpoint_path(cfg, cfg.num_epoch - 1)}: the run is finished "
                  f"(epoch {cfg.num_epoch - 1} of {cfg.num_epoch})")
            return 0
    if cfg.begin_epoch >= cfg.num_epoch:
        raise ValueError(f"--begin-epoch: {cfg.begin_epoch} is not below --num-epoch "
                         f"{cfg.num_epoch}: nothing to train")
    devices_for(cfg, cfg.batch_size, "--batch-size")
    if cfg.begin_epoch > 0:
        check_resume(cfg)
    train(cfg)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _train, argv, statuses={TrainingDiverged: EXIT_DIVERGED})
