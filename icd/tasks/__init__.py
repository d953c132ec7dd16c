"""What the training loop trains, by the name a model's registration gives
(icd.model.register(..., task=...)): "icd" for ICD, the CAM-only baseline and every ablation
(`ICDTask`), "segmentation" for DeepLab on seeds or ground-truth masks (`SegmentationTask`);
`train(cfg)` runs the loop (icd.engine) with the task of cfg.model. A new kind of training is a
Task subclass (icd.tasks.base) named here."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Type

from ..config import Config
from ..engine import Hook, train as train_task
from ..model import model_spec, models_of
from .base import Outputs, RunningMetrics, Task
from .icd import ICDTask, label_recall
from .segmentation import SegmentationTask

__all__ = ["TASKS", "task_for", "train", "Task", "RunningMetrics", "Outputs", "ICDTask",
           "label_recall", "SegmentationTask"]

# The tasks by the name a model's registration gives (icd.model.register(..., task=...)).
TASKS: Dict[str, Type[Task]] = {"icd": ICDTask, "segmentation": SegmentationTask}


def task_for(cfg: Config) -> Task:
    """The task that trains `cfg.model`; ValueError naming the models that can be trained."""
    task = model_spec(cfg.model).task
    if task not in TASKS:
        trainable = sorted(m for t in TASKS for m in models_of(t))
        raise ValueError(f"model {cfg.model!r} cannot be trained: no training task for it "
                         f"(trainable: {', '.join(trainable)})")
    return TASKS[task](cfg)


def train(cfg: Config, hooks: Optional[Sequence[Hook]] = None) -> Dict[str, object]:
    """Train `cfg.model` with its task (`task_for`) from cfg.begin_epoch to cfg.num_epoch in the
    loop of icd.engine, with `hooks` (None: icd.engine.default_hooks); returns {"records": the
    epoch records, "net": the network}. Raises ValueError for a model without a training task,
    and what icd.engine.train raises (TrainingDiverged, TrainingInterrupted, FileExistsError)."""
    return train_task(cfg, task_for(cfg), hooks)
