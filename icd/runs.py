"""What a run is: its records, its checkpoints' names and the rules for resuming it."""
from __future__ import annotations

import dataclasses
import logging

from .checkpoint import checkpoint_path, complete_checkpoints, read_run_record
from .config import Config
from .train import resume_changes

log = logging.getLogger(__name__)


def resume_auto(cfg: Config, workers: int = 1) -> Config:
    """`cfg` to continue from the last complete checkpoint below num_epoch of the same run
    (icd.checkpoint.complete_checkpoints), or to start fresh (begin_epoch 0) when there is none or
    `cfg.overwrite`; begin_epoch == num_epoch means the run is finished. A checkpoint whose run
    had other settings (icd.train.resume_changes: another run) is refused with FileExistsError
    naming its run record and the settings that differ."""
    epochs = [] if cfg.overwrite else [e for e in complete_checkpoints(cfg) if e < cfg.num_epoch]
    if not epochs:
        return dataclasses.replace(cfg, begin_epoch=0)
    epoch = epochs[-1]
    record = read_run_record(cfg, epoch)
    if record is None:   # not written by our loop (the release's): nothing to check it by
        raise FileExistsError(
            f"{checkpoint_path(cfg, epoch)}: a checkpoint without a run record; resume it "
            f"explicitly with --begin-epoch {epoch + 1}, or pass --overwrite to delete it")
    differ = resume_changes(cfg, record, workers)
    if differ:
        raise FileExistsError(
            f"{checkpoint_path(cfg, epoch, 'json')}: checkpoint of another run ("
            + "; ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differ.items())
            + "); choose another --snapshot or pass --overwrite to delete it")
    log.info("%s: resuming run %s after epoch %d", cfg.snapshot, record.get("run"), epoch)
    return dataclasses.replace(cfg, begin_epoch=epoch + 1)
