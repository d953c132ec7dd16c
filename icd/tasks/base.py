"""What the training loop (icd.engine) trains: a `Task` says how its batches are read, its
network initialised, one device's forward and loss computed, its running figures
(`RunningMetrics`) and its per-epoch picture made; the loop does the rest."""
from __future__ import annotations

import abc
import time
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import gluon

from .. import distributed as dist
from ..model.pretrained import initialize
from ..config import Config
from ..data.dataset import TrainLoader
from ..devices import split_batch


class RunningMetrics:
    """A task's running log figures on `ctx`: per-image sums (`task.sums`, read as means over
    the images) and ranges (`task.ranges`, read as <name>_min / <name>_max), accumulated on the
    device and read only when logged (one sync). A batch's figures are computed once (the task's
    `update_metrics`) and added to every running window (the hooks')."""

    def __init__(self, task: Task, ctx: mx.Context):
        self.task, self.ctx = task, ctx
        self.reset()

    def reset(self) -> None:
        self.sums = mx.nd.zeros((len(self.task.sums),), ctx=self.ctx)
        self.low = mx.nd.full((len(self.task.ranges),), np.inf, ctx=self.ctx)
        self.high = mx.nd.full((len(self.task.ranges),), -np.inf, ctx=self.ctx)
        self.images = 0
        self.started = time.time()

    def add(self, other: "RunningMetrics") -> None:
        self.sums += other.sums
        if self.task.ranges:
            self.low = mx.nd.minimum(self.low, other.low)
            self.high = mx.nd.maximum(self.high, other.high)
        self.images += other.images

    def read(self) -> Dict[str, Optional[float]]:
        """Host copy of the figures (one sync); per-image means, ranges and images/s."""
        values = mx.nd.concat(self.sums, self.low, self.high, dim=0).asnumpy() \
            if self.task.ranges else self.sums.asnumpy()
        n, k, m = max(self.images, 1), len(self.task.sums), len(self.task.ranges)
        figures: Dict[str, Optional[float]] = {name: float(v) / n
                                               for name, v in zip(self.task.sums, values)}
        for j, name in enumerate(self.task.ranges):
            low, high = values[k + j], values[k + m + j]
            known = bool(low <= high)   # a range nothing was added to (e.g. CAM-only): null
            figures[f"{name}_min"] = float(low) if known else None
            figures[f"{name}_max"] = float(high) if known else None
        figures["images_per_s"] = self.images / max(time.time() - self.started, 1e-9)
        return figures


Outputs = Dict[str, mx.nd.NDArray]


class Task(abc.ABC):
    """What the loop trains: a family of models with its loader, initialisation, one batch's
    forward and loss, its log figures and its per-epoch picture. The loop (icd.engine) owns the
    devices, the Trainer, the LR schedule, run records, resume, Ctrl-C and the progress bar; its
    hooks the checkpoints, the NaN stop, the log and the sign flip's exchange between machines.

    Class attributes: `input_names`, the loader's arrays in order; `sums` and `ranges`, the
    figures (see `RunningMetrics`); `losses`, the sums that must stay finite; `lr_per_iteration`,
    poly LR set per iteration instead of per epoch.
    """
    input_names: Tuple[str, ...] = ()
    sums: Tuple[str, ...] = ()
    ranges: Tuple[str, ...] = ()
    losses: Tuple[str, ...] = ()
    lr_per_iteration = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abc.abstractmethod
    def loader(self, shard: Tuple[int, int] = (0, 1)) -> TrainLoader:
        """The training batches, in `input_names` order; `shard` (I, N): worker I of N reads
        block I of every global batch of N x cfg.batch_size (EpochShuffleSampler)."""

    def initialize(self, net: gluon.HybridBlock, contexts: List[mx.Context]) -> None:
        """Initialise a fresh run's parameters on `contexts`: a network that brings its own
        ImageNet weights says so with an `initialize_imagenet(contexts, pretrained)` method
        (ResNet101LargeFOV: gluoncv's); the others take `vgg16_20M.params` by name and the rest
        by suffix (icd.model.pretrained.initialize)."""
        own = getattr(net, "initialize_imagenet", None)
        if own is not None:
            own(contexts, pretrained=self.cfg.pretrained or False)
        else:
            initialize(net, contexts, self.cfg.pretrained)

    def start(self, net: gluon.HybridBlock, contexts: List[mx.Context],
              record: Optional[dict], workers: dist.Workers) -> None:
        """Set up state shared by the devices of the job (after the Trainer; `record`: the
        resumed run's)."""

    def stop(self, net: gluon.HybridBlock) -> None:
        """Release what `start` set up (always called)."""

    def run_record(self) -> Dict[str, object]:
        """Fields of the task's shared state for each checkpoint's run record."""
        return {}

    def metrics(self, ctx: mx.Context) -> RunningMetrics:
        """Empty running figures of the task on `ctx` (the loop's and its hooks')."""
        return RunningMetrics(self, ctx)

    def inputs(self, batch: Sequence[mx.nd.NDArray], contexts: List[mx.Context],
               iteration: int) -> List[Dict[str, mx.nd.NDArray]]:
        """The batch split over the devices: one {input name: array} per device."""
        return split_batch(dict(zip(self.input_names, batch)), contexts)

    def schedule(self) -> Dict[str, float]:
        """Per-iteration values of the task recorded with each epoch (the last iteration's)."""
        return {}

    @abc.abstractmethod
    def forward(self, net: gluon.HybridBlock, inputs: Dict[str, mx.nd.NDArray]) -> Outputs:
        """One device's outputs, "loss" among them (recorded by autograd; summed over images)."""

    @abc.abstractmethod
    def update_metrics(self, metrics: RunningMetrics, outputs: List[Outputs],
                       inputs: List[Dict[str, mx.nd.NDArray]]) -> None:
        """Add one batch's figures (all devices) to `metrics`, on the device."""

    @abc.abstractmethod
    def epoch_image(self, inputs: Dict[str, mx.nd.NDArray], outputs: Outputs) -> np.ndarray:
        """The per-epoch picture (H, W', 3) uint8 RGB of the first image of device 0."""
