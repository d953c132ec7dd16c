"""The configuration flags of the commands: choices, the flags each command uses, --config for
the commands that take paths, the Config, devices for a batch, --shard."""
from __future__ import annotations

import argparse
from typing import Any, Callable, List, Mapping, Optional, Sequence

import mxnet as mx

from ..config import (ALL, FIELDS, REGISTERED_MODELS, Config, add_arguments, command_fields,
                      find_config, load_config, read_config_file)
from ..data.classes import dataset_classes
from ..devices import parse_devices
from ..model import MODELS
from .runner import shard

# Each field's allowed values (icd.config.option), the model registry's names for `model`
CHOICES = {name: tuple(MODELS) if f.metadata["choices"] == REGISTERED_MODELS
           else f.metadata["choices"] for name, f in FIELDS.items() if f.metadata["choices"]}
SHARD_HELP = ("only shard I of N of the list (every N-th name from the I-th); N machines running "
              "the N shards into one folder write what one run writes (default: the whole list)")
# The Config fields each command uses (its --help lists only these; a YAML may hold the rest)
COMMAND_FIELDS = {command: command_fields(command) for command in ALL}


def add_config_arguments(parser: argparse.ArgumentParser,
                         command: Optional[str] = None) -> None:
    """`--config` and the flags of the Config fields `command` uses (COMMAND_FIELDS; all when
    None)."""
    add_arguments(parser, CHOICES, COMMAND_FIELDS.get(command) if command else None)


def add_config_file(parser: argparse.ArgumentParser) -> None:
    """`--config` for the commands that take paths as flags (seeds, eval, superpixels)."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="experiments/<name>.yaml (a bare name finds the shipped config): "
                             "paths and classes not given as flags come from it (default: "
                             "none)")


def fill_from_config(args: argparse.Namespace,
                     defaults: Mapping[str, Callable[[Config, Mapping], Any]],
                     required: Sequence[str] = ()) -> None:
    """Set each `defaults` flag not given (None) to its value from `--config` (the Config and
    the file's pipeline: section); a `required` one still missing is an error naming it."""
    if args.config:
        cfg = load_config(args.config)
        section = read_config_file(find_config(args.config)).pipeline
        for dest, value in defaults.items():
            if getattr(args, dest) is None:
                setattr(args, dest, value(cfg, section))
    for dest in required:
        if getattr(args, dest) is None:
            raise ValueError(f"--{dest.replace('_', '-')}: required (or a --config that "
                             f"gives it)")


def config_from(args: argparse.Namespace,
                data: Sequence[str] = ("image_root", "annotation_root")) -> Config:
    """The Config of `--config` with the flags given on top; file values outside CHOICES are
    errors naming the file (load_config; the model's here, by the registry). The class list is
    checked against the data's own classes.txt beside the folders of the fields `data` (the
    ones the command reads): without --classes, or with another list, such data is an error
    (`dataset_classes`)."""
    cfg = load_config(args.config, **{k: v for k, v in vars(args).items() if k in FIELDS})
    if cfg.model not in CHOICES["model"]:   # load_config checks the other choices
        raise ValueError(f"{args.config}: model: must be one of {', '.join(CHOICES['model'])}, "
                         f"got {cfg.model!r}")
    dataset_classes(cfg.classes, *(getattr(cfg, name) for name in data))
    return cfg


def devices_for(cfg: Config, batch_size: int, flag: str) -> List[mx.Context]:
    """The devices of `cfg`, each of which gets at least one image of a `batch_size` batch."""
    contexts = parse_devices(cfg.gpus, cfg.cpus)
    if batch_size < len(contexts):
        raise ValueError(f"{flag}: a batch of {batch_size} cannot be split over "
                         f"{len(contexts)} devices (each needs at least one image)")
    return contexts


def add_shard_argument(parser: argparse.ArgumentParser, text: str = SHARD_HELP) -> None:
    """`--shard I/N` of the per-image commands, with help `text`: (I, N), default (0, 1), the
    whole list (icd.devices.shard_names)."""
    parser.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N", help=text)
