"""icd-run's training steps (train_icd, train_cam): each trains to num_epoch, continuing its run
from its last complete checkpoint (icd.runs.resume_auto)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict

import yaml

from ..runs import checkpoint_path
from ..config import Config
from ..runs import resume_auto
from ..tasks import train
from .settings import PaperSettings
from .steps import Run

log = logging.getLogger(__name__)

# Config fields a training step's fingerprint holds: not devices, processes, bookkeeping or
# inference-only ones (whether a checkpoint may be resumed is icd.runs.resume_changes').
RUN_FIELDS = ("image_root", "annotation_root", "superpixel_root", "data_list", "classes", "model",
              "pretrained", "num_cls", "width", "dropout", "bottom_up_features", "bottom_up_loss",
              "top_down", "optimizer", "image_size", "batch_size", "learning_rate", "momentum",
              "wd", "num_epoch", "warmup_epochs", "seed", "label_root", "amp")


def _plain(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(list(value) if isinstance(value, tuple) else value))


def train_to_the_end(cfg: Config) -> str:
    """Train `cfg` to num_epoch, continuing its run (`resume_auto`); the final checkpoint."""
    cfg = resume_auto(cfg)
    if cfg.begin_epoch < cfg.num_epoch:
        train(dataclasses.replace(cfg, overwrite=cfg.overwrite and cfg.begin_epoch == 0))
    else:
        log.info("%s: the final checkpoint exists", cfg.snapshot)
    return checkpoint_path(cfg, cfg.num_epoch - 1)


def training_settings(cfg: Config) -> Dict:
    """What a training's checkpoints depend on (RUN_FIELDS but the superpixel folder)."""
    return {k: _plain(getattr(cfg, k)) for k in RUN_FIELDS if k != "superpixel_root"}


def step_train(which: str, s: PaperSettings, seed: int, run: Run) -> Dict:
    return {"checkpoint": train_to_the_end(s.training(which, seed))}
