"""The training loop, written once (`train`, `Loop`, the one step `train_step`), and what it does
besides the step: hooks (`Hook` and the default ones), passed in: `train(cfg, task, hooks=...)`.
A task (icd.tasks) says what is trained; icd.tasks.train picks it by the model's registration."""
from .exceptions import EXIT_STATUSES, TrainingDiverged, TrainingInterrupted
from .hooks import (CheckpointHook, EpochRecordHook, Hook, LogHook, NanStopHook,
                    SignFlipExchangeHook, default_hooks)
from .loop import Loop, make_trainer, poly_lr, train, train_step

__all__ = ["EXIT_STATUSES", "TrainingDiverged", "TrainingInterrupted", "CheckpointHook",
           "EpochRecordHook", "Hook", "LogHook", "NanStopHook", "SignFlipExchangeHook",
           "default_hooks", "Loop", "make_trainer", "poly_lr", "train", "train_step"]
