"""One typed configuration for training and inference; experiments/*.yaml fill it.

Field names are the release's command-line flags with dashes as underscores (`--image-root` ->
`image_root`), so a YAML file, the command line and the release's scripts speak the same words.
Command-line flags override the file. Values are checked for their type and range whichever of
the two they come from, and errors name the file or the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import yaml

from .data.classes import read_classes


@dataclass
class Config:
    # data (release flags)
    image_root: str = "./data/VOC2012/JPEGImages"
    annotation_root: str = "./data/VOC2012/Annotations"
    superpixel_root: str = "./data/superpixels"
    data_list: str = "./data/VOC2012/ImageSets/Segmentation/train_aug.txt"
    classes: Optional[str] = None         # class-list file (icd.data.classes); None = VOC's 20
    # model
    model: str = "vgg16_icd"              # vgg16_icd | vgg16_cam (the CAM-only baseline)
    pretrained: Optional[str] = None      # vgg16_20M.params; None = random init (demo, tests)
    num_cls: int = 20                     # follows `classes` (load_config checks it)
    width: float = 1.0                    # channel multiplier; 1.0 = the paper's VGG16
    dropout: float = 0.5
    bottom_up_features: str = "conv5"     # Table 5: conv4 | conv5 | fc6 | concat
    bottom_up_loss: str = "bu"            # Table 4: bu (L_bu) | abs (L_abs) | sig (L_sig)
    top_down: str = "c"                   # Table 6: a | b | c | d
    # optimisation (release section 4)
    optimizer: str = "sgd"                # the release's; "adam" only for stand-in pre-training
    image_size: int = 321
    batch_size: int = 32
    learning_rate: float = 1e-3
    momentum: float = 0.9
    wd: float = 5e-4
    num_epoch: int = 20
    begin_epoch: int = 0
    warmup_epochs: int = 2                # release: W = 2 * num_images // batch_size
    # devices, bookkeeping
    gpus: str = ""
    cpus: int = 0
    kvstore: str = "device"               # dist_device_sync: several machines (icd-launch)
    amp: str = "off"                      # mixed precision (icd.amp): off = float32 (parity)
    num_workers: int = os.cpu_count() or 1   # loader processes: one per core
    seed: int = 0
    snapshot: str = "./snapshot/icd"
    num_save: int = 5
    overwrite: bool = False               # a fresh run replaces the model's checkpoints and log;
                                          # inference replaces score folders of other settings
    allow_changes: bool = False           # a resume with other settings starts a chained run
    log_frequency: Optional[int] = None   # None: release's max(num_images // (B * 20), 5)
    # inference (release section 5)
    infer_size: int = 513
    infer_batch_size: int = 4
    # DeepLab on the seeds (icd.train.SegmentationTask, icd.segment)
    label_root: str = "./snapshot/icd/results/seeds/crf"  # training label maps: seeds or GT
    scales: tuple[float, ...] = (1.0,)    # inference scales; (0.75, 1.0, 1.25) multi-scale
    flip: bool = False                    # inference: also average the mirrored image
    crf: bool = False                     # inference: DeepLab-LargeFOV's dense CRF

    @property
    def class_names(self) -> Tuple[str, ...]:
        """The foreground classes in label order: the `classes` file's, else VOC's 20."""
        return read_classes(self.classes)

    @property
    def model_options(self) -> Dict[str, Any]:
        """Keyword arguments of the model constructor: the fields its registration names
        (icd.model.registry.model_options)."""
        # imported here: the models register themselves when icd.model loads MXNet, which
        # reading a config must not need
        from .model.registry import model_options
        return model_options(self.model, self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _field_type(hint) -> Tuple[type, bool]:
    """(int | float | str | bool | tuple, whether None is allowed) of a resolved annotation;
    a tuple field holds positive floats (`scales`)."""
    if typing.get_origin(hint) is tuple:
        return tuple, False
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return args[0], True
    return hint, False


_TYPES = {name: _field_type(hint) for name, hint in typing.get_type_hints(Config).items()}

# What each flag means, shown by --help with the field's default unless the text states it.
HELP = {
    "image_root": "folder of <name>.jpg",
    "annotation_root": "folder of <name>.xml (image-level labels)",
    "superpixel_root": "folder of <name>.png superpixels",
    "data_list": "list file, one image name per line",
    "classes": "class-list file: one foreground class name per line in label order, background "
               "implicit as label 0 (e.g. the classes.txt of icd-coco-to-voc); '' = VOC's 20 "
               "(default: PASCAL VOC's 20 classes)",
    "model": "vgg16_icd, vgg16_cam (the CAM-only baseline), or vgg16_bn_cam (with BatchNorm: "
             "the demo's stand-in pre-training)",
    "pretrained": "ImageNet initialisation file (the release's VGG16 weights, not shipped); "
                  "'' = random init (default: random init)",
    "num_cls": "number of foreground classes; follows --classes, a different value is an "
               "error (default: the class list's length, 20 for VOC)",
    "width": "channel multiplier of VGG16; 1.0 = the paper's network",
    "dropout": "dropout of fc6/fc7, in [0, 1)",
    "bottom_up_features": "features of the bottom-up estimation (Table 5)",
    "bottom_up_loss": "bottom-up loss: bu = L_bu, abs = L_abs, sig = L_sig (Table 4)",
    "top_down": "structure of the top-down branch (Table 6)",
    "optimizer": "sgd (the release's); adam only to pre-train a stand-in for ImageNet weights",
    "image_size": "training crop side in pixels",
    "batch_size": "images per step, split over the devices",
    "learning_rate": "base learning rate (poly decay per epoch)",
    "momentum": "SGD momentum, in [0, 1)",
    "wd": "weight decay",
    "num_epoch": "epochs to train to",
    "begin_epoch": "resume: start at this epoch from checkpoint begin_epoch-1 and its .states",
    "warmup_epochs": "top-down warm-up in epochs",
    "gpus": "GPU ids, e.g. 0,1",
    "cpus": "CPU contexts when --gpus is not given, at least 1 (default: one)",
    "kvstore": "gradient aggregation: device (the release's) or local on one machine; "
               "dist_device_sync / dist_sync_device (the same) or dist_sync on several, started "
               "by icd-launch (README: Training on several machines)",
    "amp": "mixed precision: off = float32 (the release's; parity), bf16 on CPUs with "
           "avx512_bf16 or AMX, fp16 on GPUs (README: Mixed precision)",
    "num_workers": "data-loader processes, 0 = load in the main process (default: one per "
                   "core)",
    "seed": "random seed of initialisation, shuffling and augmentation",
    "snapshot": "checkpoint folder",
    "num_save": "checkpoints kept (0 = all)",
    "log_frequency": "log every N batches (default: the release's max(images // (20 batch), "
                     "5); '' restores it)",
    "infer_size": "inference input side (images are padded to it)",
    "infer_batch_size": "inference images per step",
    "label_root": "segmentation training: folder of label maps <name>.png (seeds or ground "
                  "truth)",
    "scales": "segmentation inference: scales averaged, e.g. 0.75 1 1.25",
    "flip": "segmentation inference: also average the mirrored image",
    "crf": "segmentation inference: dense CRF with DeepLab-LargeFOV's parameters",
    "overwrite": "training: replace the model's checkpoints and log in --snapshot (a fresh run "
                 "refuses them otherwise); inference: clear result folders of other settings",
    "allow_changes": "resume (--begin-epoch) with settings other than the run's: start a new "
                     "run from the checkpoint whose records name the old one (previous_run); "
                     "without it such a resume is refused",
}

# Ranges, checked for the YAML file and the flags alike; a field not listed takes any value of
# its type (floats must always be finite).
POSITIVE = ("num_cls", "width", "image_size", "batch_size", "learning_rate", "num_epoch",
            "log_frequency", "infer_size", "infer_batch_size")
NON_NEGATIVE = ("wd", "begin_epoch", "warmup_epochs", "cpus", "num_workers", "seed", "num_save")
FRACTIONS = ("dropout", "momentum")   # [0, 1)
SEED_LIMIT = 2 ** 32   # seeds must be < 2**32: numpy.random.seed refuses larger ones
# As flags these must be >= 1: 0 is the field's "not set" (cpus 0 = one CPU), not a choice.
POSITIVE_FLAGS = ("cpus",)


def find_config(path: str) -> str:
    """`path` if it exists, else the shipped config of that name (`voc_vgg16`,
    `voc_vgg16.yaml` or `experiments/voc_vgg16.yaml`): in the checkout's experiments/ or, after
    `pip install`, the package's icd/experiments/."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    package = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(package, "experiments"),
                   os.path.join(os.path.dirname(package), "experiments")):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{path}: config file not found (nor a shipped config {name})")


def read_config_file(path: str, _including: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Options of a YAML file; a `base: other.yaml` key (relative to the file) is read first.

    `_including`: the real paths of the files whose `base:` chain led here; a file that is its
    own base, directly or through others, is an error naming it (not Python's recursion limit).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            loaded = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    base = loaded.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base):
        raise ValueError(f"{path}: base must be the name of another YAML file, got {base!r}")
    including = _including + (os.path.realpath(path),)
    loaded.pop("pipeline", None)   # the other stages' settings: icd.paper reads them
    values = {}
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        if os.path.realpath(base_path) in including:
            raise ValueError(f"{path}: base {base!r} includes {os.path.normpath(base_path)} "
                             f"again (a cycle of base: keys); a file cannot be its own base")
        values = read_config_file(base_path, including)
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown option {key!r}")
        values[name] = value
    return values


def _as_field_type(name: str, value: Any) -> Any:
    """`value` converted to the field's type; ValueError("<problem>") if it cannot be."""
    kind, optional = _TYPES[name]
    if value is None:
        if optional:
            return None
        raise ValueError("cannot be empty")
    if kind is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"must be a list of numbers, got {value!r}")
        items = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, float)) \
                    or not math.isfinite(item) or item <= 0:
                raise ValueError(f"must be positive numbers, got {value!r}")
            items.append(float(item))
        return tuple(items)
    if kind in (bool, str):
        if not isinstance(value, kind):
            raise ValueError(f"must be {'true or false' if kind is bool else 'a string'}, "
                             f"got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"must be a number, got {value!r}{hint}")
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if name in POSITIVE and not value > 0:
        raise ValueError(f"must be positive, got {value!r}")
    if name in NON_NEGATIVE and value < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    if name == "seed" and value >= SEED_LIMIT:
        raise ValueError(f"must be < 2**32 = {SEED_LIMIT} (numpy's and MXNet's seed range), "
                         f"got {value!r}")
    if name in FRACTIONS and not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value!r}")
    return value


def load_config(path: Optional[str] = None, **overrides: Any) -> Config:
    """Config from a YAML file (optional; see `find_config`) with `overrides` on top.

    An override given is applied, None included where the field allows None (e.g.
    `pretrained=None` clears the file's ImageNet file); None for a field that cannot be None
    means "not given" (callers may pass every keyword). Types and ranges are checked; errors
    name the file (for its values) or the flag `--name` (for overrides). The class-list file
    `classes` is read (its errors name it and the line) and `num_cls` set to its length; an
    explicit num_cls that differs is an error.
    """
    path = find_config(path) if path else None
    values = read_config_file(path) if path else {}
    sources = dict.fromkeys(values, path)
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    for name, value in overrides.items():
        if value is not None or _TYPES[name][1]:
            values[name], sources[name] = value, None
    def where(name: str) -> str:
        return f"{sources[name]}: {name}" if sources[name] else "--" + name.replace("_", "-")

    for name, value in values.items():
        try:
            values[name] = _as_field_type(name, value)
        except ValueError as e:
            raise ValueError(f"{where(name)}: {e}") from None
    num_classes = len(read_classes(values.get("classes")))
    if "num_cls" in values and values["num_cls"] != num_classes:
        listed = (f"the {num_classes} classes of {values['classes']}" if values.get("classes")
                  else f"PASCAL VOC's {num_classes} classes (no class-list file given)")
        raise ValueError(f"{where('num_cls')}: {values['num_cls']} contradicts {listed}; leave "
                         f"num_cls out (it follows the class list) or give the dataset's "
                         f"--classes FILE")
    values["num_cls"] = num_classes
    return Config(**values)


def _flag_type(name: str):
    """argparse type of a field's flag: its type and range (`_as_field_type`); '' gives None
    where None is allowed."""
    kind, optional = _TYPES[name]

    def parse(text: str):
        if optional and text == "":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        try:
            value = _as_field_type(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if name in POSITIVE_FLAGS and value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _positive_number(text: str) -> float:
    """argparse type of a tuple field's items: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser,
                  choices: Mapping[str, Sequence[str]] = {},
                  fields: Optional[Sequence[str]] = None) -> None:
    """Add `--config` and every Config field as `--flag-name`; --help shows those of `fields`
    (all when None), the others are accepted (scripts pass one flag set to several commands).

    A flag not given is absent from the parsed namespace (argparse.SUPPRESS), so the file's value
    stays; `choices` restricts fields to named values (shown by --help).
    """
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="experiments/<name>.yaml (a bare name finds the shipped config); "
                             "flags override it (default: none, the defaults below)")
    group = parser.add_argument_group(
        "configuration (a flag overrides the --config file, which overrides the defaults shown)")
    for name, spec in FIELDS.items():
        kind = _TYPES[name][0]
        flag = "--" + name.replace("_", "-")
        text = HELP.get(name, name)
        if "default" not in text:
            text += f" (default: {'none' if spec.default in (None, '') else spec.default})"
        if fields is not None and name not in fields:
            text = argparse.SUPPRESS   # a flag the command does not use: not in its --help
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        elif kind is tuple:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, nargs="+",
                               type=_positive_number, metavar="X", help=text)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS,
                               type=_flag_type(name), choices=choices.get(name), help=text)
