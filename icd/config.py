"""One typed configuration for training and inference; experiments/*.yaml fill it.

Field names are the release's command-line flags with dashes as underscores (`--image-root` ->
`image_root`), so a YAML file, the command line and the release's scripts speak the same words.
Command-line flags override the file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import yaml


@dataclass
class Config:
    # data (release flags)
    image_root: str = "./data/VOC2012/JPEGImages"
    annotation_root: str = "./data/VOC2012/Annotations"
    superpixel_root: str = "./data/superpixels"
    data_list: str = "./data/VOC2012/ImageSets/Segmentation/train_aug.txt"
    # model
    model: str = "vgg16_icd"              # vgg16_icd | vgg16_cam (the CAM-only baseline)
    pretrained: Optional[str] = None      # vgg16_20M.params; None = random init (demo, tests)
    num_cls: int = 20
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
    kvstore: str = "device"               # dist_sync_device: several machines (tools/launch.py)
    num_workers: int = 4
    seed: int = 0
    snapshot: str = "./snapshot/icd"
    num_save: int = 5
    overwrite: bool = False               # a fresh run replaces the model's checkpoints and log;
                                          # inference replaces score folders of other settings
    log_frequency: Optional[int] = None   # None: release's max(num_images // (B * 20), 5)
    # inference (release section 5)
    infer_size: int = 513
    infer_batch_size: int = 4

    @property
    def model_options(self) -> Dict[str, Any]:
        """Keyword arguments of the model constructor."""
        options = dict(num_classes=self.num_cls, width=self.width, dropout=self.dropout)
        if self.model == "vgg16_icd":
            options.update(bottom_up_features=self.bottom_up_features,
                           bottom_up_loss=self.bottom_up_loss, top_down=self.top_down)
        return options


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = {"int": int, "Optional[int]": int, "float": float}


def read_config_file(path: str) -> Dict[str, Any]:
    """Options of a YAML file; a `base: other.yaml` key (relative to the file) is read first."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    base = loaded.pop("base", None)
    values = read_config_file(os.path.join(os.path.dirname(path), base)) if base else {}
    for key, value in loaded.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown option {key!r}")
        values[name] = value
    return values


def load_config(path: Optional[str] = None, **overrides: Any) -> Config:
    """Config from a YAML file (optional) with `overrides` (None values ignored) on top.

    Unknown keys and non-numbers where numbers belong are errors naming the file and the key.
    """
    values = read_config_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        kind = _TYPES.get(FIELDS[name].type)
        if kind is not None and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path or 'config'}: {name} must be a number, got {value!r}")
            values[name] = kind(value)
    return Config(**values)


def add_arguments(parser) -> None:
    """Add every Config field as `--flag-name` (default None, so the file's value stays)."""
    parser.add_argument("--config", help="experiments/<name>.yaml; flags override it")
    for name, spec in FIELDS.items():
        kind = _TYPES.get(spec.type, str)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                            help=f"default {spec.default!r}")
