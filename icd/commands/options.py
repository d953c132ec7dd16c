"""The configuration flags of icd-train and icd-infer: choices, the Config, devices for a batch."""
from __future__ import annotations

import argparse
from typing import List, Sequence

import mxnet as mx

from ..config import FIELDS, Config, add_arguments, load_config
from ..data.classes import dataset_classes
from ..devices import parse_devices
from ..distributed import KVSTORES
from ..model import MODELS
from ..model.icd_net import FEATURES, TOP_DOWN
from ..model.losses import BOTTOM_UP_VARIANTS
from ..train import OPTIMIZERS

CHOICES = {"model": tuple(MODELS), "bottom_up_features": FEATURES,
           "bottom_up_loss": BOTTOM_UP_VARIANTS, "top_down": TOP_DOWN, "optimizer": OPTIMIZERS,
           "kvstore": KVSTORES}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, CHOICES)


def config_from(args: argparse.Namespace,
                data: Sequence[str] = ("image_root", "annotation_root")) -> Config:
    """The Config of `--config` with the flags given on top; file values outside CHOICES are
    errors naming the file (flags are checked by argparse). The class list is checked against
    the data's own classes.txt beside the folders of the fields `data` (the ones the command
    reads): without --classes, or with another list, such data is an error (`dataset_classes`)."""
    cfg = load_config(args.config, **{k: v for k, v in vars(args).items() if k in FIELDS})
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{args.config}: {name}: must be one of {', '.join(allowed)}, "
                             f"got {getattr(cfg, name)!r}")
    dataset_classes(cfg.classes, *(getattr(cfg, name) for name in data))
    return cfg


def devices_for(cfg: Config, batch_size: int, flag: str) -> List[mx.Context]:
    """The devices of `cfg`, each of which gets at least one image of a `batch_size` batch."""
    contexts = parse_devices(cfg.gpus, cfg.cpus)
    if batch_size < len(contexts):
        raise ValueError(f"{flag}: a batch of {batch_size} cannot be split over "
                         f"{len(contexts)} devices (each needs at least one image)")
    return contexts
