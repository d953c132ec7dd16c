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
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import yaml

from .constants import BOTTOM_UP_VARIANTS, FEATURES, KVSTORES, OPTIMIZERS, PRECISIONS, TOP_DOWN
from .data.classes import read_classes


# The commands that read a field (icd.commands.options: each command's --help lists its fields)
ALL = ("train", "infer", "train_seg", "infer_seg")
TRAINING = ("train", "train_seg")
ICD = ("train", "infer")
INFERENCE = ("infer", "infer_seg")
# A field's range: name -> (test, what the error says a value must be)
RANGES = {"positive": (lambda v: v > 0, "positive"), "non_negative": (lambda v: v >= 0, ">= 0"),
          "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
          "unit": (lambda v: 0 <= v <= 1, "in [0, 1]"),
          "non_empty": (lambda v: v != "", "non-empty")}   # text: a path
REGISTERED_MODELS = "registered models"   # the model registry's names (icd.model: loads MXNet)


def option(default: Any, help: str, used_by: Sequence[str],
           choices: Union[Sequence[str], str, None] = None, range: Optional[str] = None,
           flag_min: Optional[int] = None) -> Any:
    """A Config field defined once: its default, its --help text (the default is appended
    unless the text states it), the commands that read it, its allowed values (`choices`, or
    REGISTERED_MODELS), its range (RANGES; checked for the YAML file and the flags alike;
    floats are always finite) and `flag_min`, a lower bound for the flag alone (cpus: 0 is the
    field's "not set", not a choice)."""
    if range is not None and range not in RANGES:
        raise ValueError(f"range {range!r}: one of {', '.join(RANGES)}")
    return dataclasses.field(default=default, metadata=dict(
        help=help, used_by=tuple(used_by), choices=choices, range=range, flag_min=flag_min))


@dataclass
class Config:
    # data (the release's flags)
    image_root: str = option("./data/VOC2012/JPEGImages",
        "folder of <name>.jpg",
        used_by=ALL)
    annotation_root: str = option("./data/VOC2012/Annotations",
        "folder of <name>.xml (image-level labels)",
        used_by=TRAINING + ("infer",))
    superpixel_root: str = option("./data/superpixels",
        "folder of <name>.png superpixels",
        used_by=ICD)
    data_list: str = option("./data/VOC2012/ImageSets/Segmentation/train_aug.txt",
        "list file, one image name per line",
        used_by=ALL)
    classes: Optional[str] = option(None,
        "class-list file: one foreground class name per line in label order, background implicit "
        "as label 0 (e.g. the classes.txt of icd-coco-to-voc); '' = VOC's 20 (default: PASCAL "
        "VOC's 20 classes)",
        used_by=ALL)

    # model
    model: str = option("vgg16_icd",
        "vgg16_icd, vgg16_cam (the CAM-only baseline), or vgg16_bn_cam (with BatchNorm: the "
        "demo's stand-in pre-training)",
        choices=REGISTERED_MODELS, used_by=ALL)
    pretrained: Optional[str] = option(None,
        "ImageNet initialisation file (the release's VGG16 weights, not shipped); '' = random "
        "init (default: random init)",
        used_by=TRAINING)
    num_cls: int = option(20,
        "number of foreground classes; follows --classes, a different value is an error (default: "
        "the class list's length, 20 for VOC)",
        range="positive", used_by=ALL)
    width: float = option(1.0,
        "channel multiplier of VGG16; 1.0 = the paper's network",
        range="positive", used_by=ALL)
    dropout: float = option(0.5,
        "dropout of fc6/fc7, in [0, 1)",
        range="fraction", used_by=TRAINING)

    # ICD's variants (Tables 4-6) and its top-down warm-up
    bottom_up_features: str = option("conv5",
        "features of the bottom-up estimation (Table 5)",
        choices=FEATURES, used_by=ICD)
    bottom_up_loss: str = option("bu",
        "bottom-up loss: bu = L_bu, abs = L_abs, sig = L_sig (Table 4)",
        choices=BOTTOM_UP_VARIANTS, used_by=ICD)
    top_down: str = option("c",
        "structure of the top-down branch (Table 6)",
        choices=TOP_DOWN, used_by=ICD)
    warmup_epochs: int = option(2,
        "top-down warm-up in epochs",
        range="non_negative", used_by=("train",))

    # optimisation (release section 4)
    optimizer: str = option("sgd",
        "sgd (the release's); adam only to pre-train a stand-in for ImageNet weights",
        choices=OPTIMIZERS, used_by=TRAINING)
    image_size: int = option(321,
        "training crop side in pixels",
        range="positive", used_by=TRAINING)
    batch_size: int = option(32,
        "images per step, split over the devices",
        range="positive", used_by=TRAINING)
    learning_rate: float = option(0.001,
        "base learning rate (poly decay per epoch)",
        range="positive", used_by=TRAINING)
    momentum: float = option(0.9,
        "SGD momentum, in [0, 1)",
        range="fraction", used_by=TRAINING)
    wd: float = option(0.0005,
        "weight decay",
        range="non_negative", used_by=TRAINING)
    num_epoch: int = option(20,
        "epochs to train to; inference: the checkpoint num_epoch-1 is the default --epoch",
        range="positive", used_by=ALL)
    begin_epoch: int = option(0,
        "resume: start at this epoch from checkpoint begin_epoch-1 and its .states",
        range="non_negative", used_by=TRAINING)
    seed: int = option(0,
        "random seed of initialisation, shuffling and augmentation",
        range="non_negative", used_by=TRAINING)

    # devices and precision
    gpus: str = option("",
        "GPU ids, e.g. 0,1",
        used_by=ALL)
    cpus: int = option(0,
        "CPU contexts when --gpus is not given, at least 1 (default: one)",
        range="non_negative", flag_min=1, used_by=ALL)
    amp: str = option("off",
        "mixed precision: off = float32 (the release's; parity), bf16 on CPUs with avx512_bf16 or "
        "AMX, fp16 on GPUs (docs/mixed-precision.md)",
        choices=PRECISIONS, used_by=ALL)
    kvstore: str = option("device",
        "gradient aggregation: device (the release's) or local on one machine; dist_device_sync / "
        "dist_sync_device (the same) or dist_sync on several, started by icd-launch "
        "(docs/machines.md)",
        choices=KVSTORES, used_by=TRAINING)
    num_workers: int = option(os.cpu_count() or 1,
        "data-loader processes, 0 = load in the main process (default: one per core)",
        range="non_negative", used_by=ALL)
    pin_memory: bool = option(False,
        "training batches in page-locked host memory (MXNet 1.9.1 allocates and frees it for "
        "every batch: docs/gpus.md)",
        used_by=TRAINING)

    # checkpoints and runs
    snapshot: str = option("./snapshot/icd",
        "checkpoint folder",
        used_by=ALL)
    num_save: int = option(5,
        "checkpoints kept (0 = all)",
        range="non_negative", used_by=TRAINING)
    overwrite: bool = option(False,
        "training: replace the model's checkpoints and log in --snapshot (a fresh run refuses "
        "them otherwise); inference: clear result folders of other settings",
        used_by=ALL)
    allow_changes: bool = option(False,
        "resume (--begin-epoch) with settings other than the run's: start a new run from the "
        "checkpoint whose records name the old one (previous_run); without it such a resume is "
        "refused",
        used_by=TRAINING)
    log_frequency: Optional[int] = option(None,
        "log every N batches (default: the release's max(images // (20 batch), 5); '' restores "
        "it)",
        range="positive", used_by=TRAINING)

    # inference (release section 5)
    infer_size: int = option(513,
        "inference input side (images are padded to it)",
        range="positive", used_by=INFERENCE)
    infer_batch_size: int = option(4,
        "inference images per step",
        range="positive", used_by=INFERENCE)

    # DeepLab on the seeds (icd.tasks.SegmentationTask, icd.segment)
    label_root: str = option("./snapshot/icd/results/seeds/crf",
        "segmentation training: folder of label maps <name>.png (seeds or ground truth)",
        used_by=("train_seg",))
    scales: tuple[float, ...] = option((1.0,),
        "segmentation inference: scales averaged, e.g. 0.75 1 1.25",
        used_by=("infer_seg",))
    flip: bool = option(False,
        "segmentation inference: also average the mirrored image",
        used_by=("infer_seg",))
    crf: bool = option(False,
        "segmentation inference: dense CRF with DeepLab-LargeFOV's parameters",
        used_by=("infer_seg",))

    @property
    def class_names(self) -> Tuple[str, ...]:
        """The foreground classes in label order: the `classes` file's, else VOC's 20."""
        return read_classes(self.classes)


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


def _fields_where(key: str, value: Any) -> Tuple[str, ...]:
    return tuple(name for name, f in FIELDS.items() if f.metadata[key] == value)


# What each flag means, shown by --help with the field's default unless the text states it
HELP = {name: f.metadata["help"] for name, f in FIELDS.items()}
SEED_LIMIT = 2 ** 32   # seeds must be < 2**32: numpy.random.seed refuses larger ones


def command_fields(command: str) -> Tuple[str, ...]:
    """The fields `command` (one of ALL) reads, in definition order."""
    return tuple(name for name, f in FIELDS.items() if command in f.metadata["used_by"])


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the
    later value without a word), naming the file, the key and both lines."""

    def construct_mapping(self, node, deep=False):
        lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in lines:
                raise ValueError(f"{key_node.start_mark.name}: {key}: given twice, on lines "
                                 f"{lines[key]} and {line}; keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml_chain(path: str, _including: Tuple[str, ...] = ()) -> List[Tuple[str, Dict]]:
    """[(file, its mapping without `base`)] of a YAML file and the files its `base: other.yaml`
    key (relative to the file) leads to, the deepest base first: the one reader of configs and
    their `base:` chains (`read_config_file`: training options and the pipeline: section).

    `_including`: the real paths of the files whose `base:` chain led here; a file that is its
    own base, directly or through others, is an error naming it (not Python's recursion limit).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            loaded = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    base = loaded.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base):
        raise ValueError(f"{path}: base must be the name of another YAML file, got {base!r}")
    including = _including + (os.path.realpath(path),)
    chain: List[Tuple[str, Dict]] = []
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        if os.path.realpath(base_path) in including:
            raise ValueError(f"{path}: base {base!r} includes {os.path.normpath(base_path)} "
                             f"again (a cycle of base: keys); a file cannot be its own base")
        chain = read_yaml_chain(base_path, including)
    return chain + [(path, loaded)]


class ConfigFile(NamedTuple):
    """A YAML config read with its `base:` chain (`read_config_file`): the training options
    and the file that gave each; the `pipeline:` section, each stage's keys over its base's, and
    the file that gave each key ("gt_root", "seeds", "seeds.rows")."""
    values: Dict[str, Any]
    sources: Dict[str, str]
    pipeline: Dict[str, Any]
    pipeline_sources: Dict[str, str]


def read_config_file(path: str) -> ConfigFile:
    """The one reader of a YAML config and its `base:` chain (`read_yaml_chain`): training
    options (an unknown one is an error naming the file) and the `pipeline:` section, whose
    types icd.pipeline.sections checks."""
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    pipeline: Dict[str, Any] = {}
    given: Dict[str, str] = {}
    for file, loaded in read_yaml_chain(path):
        for key, value in loaded.items():
            if key == "pipeline":
                _merge_pipeline(file, value, pipeline, given)
                continue
            name = str(key).replace("-", "_")
            if name not in FIELDS:
                raise ValueError(f"{file}: unknown option {key!r}")
            values[name], sources[name] = value, file
    return ConfigFile(values, sources, pipeline, given)


def _merge_pipeline(file: str, own: Any, section: Dict[str, Any],
                    sources: Dict[str, str]) -> None:
    """`file`'s pipeline: mapping `own` over `section` (a stage's keys over the stage's keys of
    its base), noting in `sources` which file gave each key."""
    own = {} if own is None else own
    if not isinstance(own, dict):
        raise ValueError(f"{file}: pipeline: expected a mapping of stage: settings")
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            section[key] = {**section[key], **value}
        else:
            section[key] = value
        sources[key] = file
        sources.update({f"{key}.{sub}": file for sub in
                        (value if isinstance(value, dict) else ())})


def read_config_sources(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(options, {option: the file that gave it}) of a YAML file and its `base:` chain."""
    config = read_config_file(path)
    return config.values, config.sources


def _float_text(value: Any) -> bool:
    """Whether `value` is text that reads as a number (YAML 1.1 takes `1e-3` for a string)."""
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _scalar(kind: type, value: Any, range: Optional[str] = None) -> Any:
    """`value` as `kind` (bool, str, int or float; a finite number) within `range` (RANGES);
    ValueError("<problem>") if it is not."""
    if kind in (bool, str):
        if not isinstance(value, kind):
            raise ValueError(f"must be {'true or false' if kind is bool else 'a string'}, "
                             f"got {value!r}")
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if _float_text(value) else ""
            raise ValueError(f"must be a number, got {value!r}{hint}")
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        if kind is int and value != int(value):
            raise ValueError(f"must be an integer, got {value!r}")
        value = kind(value)
    if range is not None and not RANGES[range][0](value):
        raise ValueError(f"must be {RANGES[range][1]}, got {value!r}")
    return value


def _as_field_type(name: str, value: Any) -> Any:
    """`value` converted to the Config field's type; ValueError("<problem>") if it cannot be."""
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
    value = _scalar(kind, value, FIELDS[name].metadata["range"])
    if name == "seed" and value >= SEED_LIMIT:
        raise ValueError(f"must be < 2**32 = {SEED_LIMIT} (numpy's and MXNet's seed range), "
                         f"got {value!r}")
    return value


_KINDS = {bool: "true or false", str: "a string", int: "an integer", float: "a number",
          tuple: "a list", dict: "a mapping"}


def typed_value(hint: Any, value: Any, choices: Optional[Sequence[str]] = None,
                range: Optional[str] = None) -> Any:
    """`value` as the annotation `hint` of a section's field: a scalar type, Any, Optional or
    Union of them, Tuple[X, ...] (a non-empty list) or Dict[str, X] (a non-empty mapping), each
    scalar in `choices` and `range` (RANGES); ValueError("<problem>") if it is not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds:
            try:
                return typed_value(kind, value, choices, range)
            except ValueError as e:
                problem = e
        if len(kinds) == 1:
            raise problem
        raise ValueError(f"must be {' or '.join(_KINDS[typing.get_origin(k) or k] for k in kinds)}"
                         f", got {value!r}")
    if value is None:
        raise ValueError("cannot be empty")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"must be a list, got {value!r}")
        return tuple(typed_value(args[0], item, choices, range) for item in value)
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ValueError(f"must be a mapping of key: value, got {value!r}")
        return {str(k): typed_value(args[1], v, choices, range) for k, v in value.items()}
    value = _scalar(hint, value, range)
    if choices is not None and value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def load_config(path: Optional[str] = None, *, labels: Mapping[str, str] = {},
                **overrides: Any) -> Config:
    """Config from a YAML file (optional; see `find_config`) with `overrides` on top.

    An override given is applied, None included where the field allows None (e.g.
    `pretrained=None` clears the file's ImageNet file); None for a field that cannot be None
    means "not given" (callers may pass every keyword). Types, ranges and choices (but the
    model's, which the registry in icd.model knows) are checked; errors name the file and key
    (for its values, the file of its `base:` chain that gave it) or the flag: `labels[name]`
    (e.g. `--set train.width`), else `--name`. The class-list file `classes` is read (its
    errors name it and the line) and `num_cls` set to its length; an explicit num_cls that
    differs is an error.
    """
    path = find_config(path) if path else None
    values, sources = read_config_sources(path) if path else ({}, {})
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    flags = {}
    for name, value in overrides.items():
        if value is not None or _TYPES[name][1]:
            values[name] = value
            flags[name] = labels.get(name) or "--" + name.replace("_", "-")

    def where(name: str) -> str:
        return flags[name] if name in flags else f"{sources[name]}: {name}"

    for name, value in values.items():
        try:
            values[name] = _as_field_type(name, value)
            allowed = FIELDS[name].metadata["choices"]
            if isinstance(allowed, tuple) and values[name] not in allowed:
                raise ValueError(f"must be one of {', '.join(allowed)}, got {values[name]!r}")
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
        minimum = FIELDS[name].metadata["flag_min"]
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
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
