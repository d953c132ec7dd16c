"""The one training loop: devices, the Trainer with the model's lr_mult / wd_mult, the poly LR,
the run (icd.runs: records, resume), reseeding, Ctrl-C and the progress bar; the one training
step (`train_step`, also icd-bench's and icd-parity's); what it does besides the step is a hook
(icd.engine.hooks). A task (icd.tasks) supplies what differs: its loader, how its model is
initialised, one batch's inputs, forward and loss, its running metrics and its epoch image.

Release semantics (docs/release.md section 4): SGD momentum 0.9, wd 5e-4, gradients summed
over devices and rescaled by 1/batch_size, lr_mult/wd_mult set by the model, poly LR per epoch
1e-3 (1 - e / E)^0.9 (per iteration for DeepLab: the task's `lr_per_iteration`), a checkpoint
pair after every epoch (icd.engine.hooks.CheckpointHook). Better than the release: the top-down
warm-up counter is derived from the global iteration, so a resumed run (`begin_epoch`) continues
the warm-up where it stopped instead of restarting it.

Every generator (MXNet's, numpy's; the loaders' augmentation is keyed by (seed, epoch, index))
is reseeded at the start of each epoch from (seed, epoch), so the random state at an epoch
boundary is a function of what the run record names and a resumed run is bit-identical to an
uninterrupted one (each device's non-trained states come back from the record).

Several machines (`kvstore` dist_*, icd.distributed): the loop and its hooks serve every task
alike. The batch is per worker and the schedule follows the global batch (batch x workers);
worker r reads block r of every global batch; the Trainer only sums gradients over the job; the
figures are reduced over the workers before they are read; checkpoints average the aux states
over every device of the job and the run record keeps each device's copy; rank 0 alone writes
files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from .. import amp, distributed as dist, memory
from ..checkpoint import load_checkpoint, load_states
from ..config import Config
from ..constants import OPTIMIZERS
from ..data.dataset import TrainLoader
from ..devices import parse_devices
from ..model import model_from_config
from ..runs import checkpoint_path, read_run_record, snapshot_lock, start_run
from .exceptions import EXIT_STATUSES, TrainingInterrupted
from .hooks import Hook, default_hooks, restore_device_states

if TYPE_CHECKING:   # for annotations only: the tasks run the loop
    from ..tasks.base import Outputs, RunningMetrics, Task

log = logging.getLogger(__name__)


def poly_lr(base_lr: float, step: int, num_steps: int, power: float = 0.9) -> float:
    """Poly learning rate of 0-based `step` of `num_steps`: base (1 - step / num_steps)^power
    (steps are epochs for ICD, as the release; iterations for DeepLab)."""
    return base_lr * (1.0 - step / num_steps) ** power


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every generator starts `epoch` from: a function of (seed, epoch) only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def reseed(seed: int, epoch: int) -> None:
    """Reseed MXNet's generators on every device and numpy's global one for `epoch`.

    MXNet's generator state cannot be read back, so it cannot be saved with a checkpoint; a state
    derived from (seed, epoch) at each epoch start makes a resumed run draw what an uninterrupted
    one draws (dropout above all). The loader's augmentation is keyed by (seed, epoch, index).
    """
    value = epoch_seed(seed, epoch)
    mx.random.seed(value, ctx="all")
    np.random.seed(value)


def make_trainer(net: gluon.Block, learning_rate: float, momentum: float, wd: float,
                 optimizer: str = "sgd", kvstore="device", precision: str = "off",
                 amp_state: Optional[dict] = None) -> gluon.Trainer:
    """SGD with the release's semantics (lr_mult / wd_mult are set by the model).

    `optimizer="adam"` (no momentum argument) exists only to produce a stand-in for the ImageNet
    initialisation where none can be had (the synthetic demo's pre-training): a VGG16 without
    BatchNorm trained from a random init by plain SGD sits on the label-prior plateau for tens of
    epochs. Every ICD and CAM training of the paper uses SGD.

    Only parameters with gradients are handed to the Trainer: Gluon initialises its key-value
    store lazily at the first step by copying device 0's value of every parameter it holds to all
    devices, which would overwrite the other devices' BatchNorm statistics of that step (the
    release's Module keeps one set per device and averages them when saving).
    A dist `kvstore` (icd.distributed.Workers) only sums gradients: each worker applies the step
    to its own weights, so its optimizer states go into its .states file as on one machine.
    fp16 (`precision`): icd.amp.LossScaledTrainer continuing a run record's `amp_state`; its
    loss scaler checks the gradients before the step, so the step is never applied in the
    kvstore (update_on_kvstore=False: Gluon would pick True for kvstore=device on several
    devices, MXNet model.py _create_kvstore, and update inside the gradients' pushpull).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {OPTIMIZERS}")
    params = {name: p for name, p in net.collect_params().items() if p.grad_req != "null"}
    settings = {"learning_rate": learning_rate, "wd": wd}
    if optimizer == "sgd":
        settings["momentum"] = momentum
    distributed = not isinstance(kvstore, str)
    if precision == "fp16":
        return amp.LossScaledTrainer(params, optimizer, settings, kvstore=kvstore,
                                     update_on_kvstore=False, amp_state=amp_state)
    return gluon.Trainer(params, optimizer, settings, kvstore=kvstore,
                         update_on_kvstore=False if distributed else None)


def train_step(net: gluon.HybridBlock, trainer: gluon.Trainer,
               forward: Callable[[gluon.HybridBlock, Dict[str, mx.nd.NDArray]], Outputs],
               inputs: List[Dict[str, mx.nd.NDArray]], batch_size: int,
               order: Optional[Sequence[int]] = None) -> List[Outputs]:
    """One optimizer step over the devices: the training loop's, icd-bench's and icd-parity's.

    `inputs[d]`: device d's part of the batch, {input name: array} on it; `forward(net,
    inputs[d])`: its outputs, "loss" among them (a task's `forward`). The devices' forwards
    (recorded by autograd) are issued in `order` (default: context order), and the sign flip's
    store shared by the devices takes their updates in that order (icd.model.ops.
    SharedMovingMean; the release's store takes them in whichever order they arrive, a race:
    icd.parity replays a bundle's order). Then the backward of every device's loss (icd.amp:
    loss-scaled under fp16) and the Trainer's step, gradients summed over the devices and
    rescaled by 1 / `batch_size`. Returns each device's outputs, in context order; nothing is
    synchronised.
    """
    outputs: List = [None] * len(inputs)
    with autograd.record():
        for d in range(len(inputs)) if order is None else order:
            outputs[d] = forward(net, inputs[d])
    amp.backward([out["loss"] for out in outputs], trainer)
    trainer.step(batch_size)
    return outputs


@dataclasses.dataclass
class Loop:
    """The training loop's state, which its hooks read: the run, the network and Trainer, the
    schedule's sizes, and where the loop is (epoch, iteration, the last batch)."""
    cfg: Config
    task: Task
    contexts: List[mx.Context]
    workers: dist.Workers
    net: gluon.HybridBlock
    trainer: gluon.Trainer
    run: Dict[str, object]                  # icd.runs.start_run's: run id, records, record
    batch_size: int                         # the global batch (per worker x workers)
    iters_per_epoch: int
    num_iters: int
    log_every: int
    loader: TrainLoader
    epoch: int = 0
    iteration: int = 0
    lr: float = 0.0
    epoch_lr: float = 0.0
    epoch_started: float = 0.0
    saved_epoch: int = -1
    bar: Optional[tqdm] = None              # the epoch's progress bar
    inputs: List[Dict[str, mx.nd.NDArray]] = dataclasses.field(default_factory=list)
    outputs: List[Outputs] = dataclasses.field(default_factory=list)

    @property
    def records(self) -> List[dict]:
        return self.run["records"]


def train(cfg: Config, task: Task, hooks: Optional[Sequence[Hook]] = None
          ) -> Dict[str, object]:
    """Train `cfg.model` with `task` from `cfg.begin_epoch` to `cfg.num_epoch`, calling `hooks`
    (None: `default_hooks`; a list replaces them, e.g. `default_hooks() + [mine]`); returns
    {"records": the epoch records, "net": the network}.

    Raises TrainingDiverged on a NaN/infinite loss (NanStopHook: the last checkpoint stays as it
    was), TrainingInterrupted on Ctrl-C (never between the files of one checkpoint),
    FileExistsError when the snapshot folder holds checkpoints this run would mix with
    (icd.runs.start_run).

    With a dist `cfg.kvstore` this process is one worker of a job (icd.distributed): an error
    ends the process at once with its exit status (EXIT_STATUSES), so that the launcher ends the
    job instead of leaving the other workers waiting in the store.
    """
    hooks = default_hooks() if hooks is None else list(hooks)
    contexts = parse_devices(cfg.gpus, cfg.cpus)
    workers = dist.Workers(cfg.kvstore)
    with dist.failures_end_the_process(workers, EXIT_STATUSES), \
            snapshot_lock(cfg) if workers.rank == 0 else contextlib.nullcontext():
        return _train(cfg, task, contexts, workers, hooks)


def _train(cfg: Config, task: Task, contexts: List[mx.Context], workers: dist.Workers,
           hooks: List[Hook]) -> Dict[str, object]:
    loop = _start(cfg, task, contexts, workers)
    try:
        task.start(loop.net, contexts, loop.run["record"], workers)
        if len(contexts) * workers.num_workers > 1 and loop.run["record"]:
            restore_device_states(loop.net, dist.local_device_states(
                workers, loop.run["record"].get("device_states"), len(contexts)), contexts,
                checkpoint_path(cfg, cfg.begin_epoch - 1, "json"))
        for hook in hooks:
            hook.before_train(loop)
        for loop.epoch in range(cfg.begin_epoch, cfg.num_epoch):
            _run_epoch(loop, hooks)
            for hook in hooks:
                hook.after_epoch(loop)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted_message(cfg, loop.epoch, loop.saved_epoch)) \
            from None
    finally:
        task.stop(loop.net)
    return {"records": loop.records, "net": loop.net}


def _start(cfg: Config, task: Task, contexts: List[mx.Context],
           workers: dist.Workers) -> Loop:
    """Seed, loader, network (fresh or from the resumed checkpoint), run and Trainer."""
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    loader = task.loader(workers.shard)
    batch_size = cfg.batch_size * workers.num_workers   # the global batch
    iters_per_epoch = len(loader.dataset) // batch_size
    amp.enable(cfg.amp, contexts)   # before the network is built (amp.init)
    memory.warn_if_short(cfg, contexts)
    net = model_from_config(cfg)
    run = start_run(cfg, workers.num_workers) if workers.rank == 0 else None
    workers.barrier()   # the others read the folder once rank 0 has checked and cleaned it
    run = run or {"run": None, "records": [], "record": read_run_record(
        cfg, cfg.begin_epoch - 1) if cfg.begin_epoch > 0 else None}
    if cfg.begin_epoch > 0:
        load_checkpoint(net, checkpoint_path(cfg, cfg.begin_epoch - 1), contexts)
    else:
        task.initialize(net, contexts)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net, cfg.learning_rate, cfg.momentum, cfg.wd, cfg.optimizer,
                           workers.trainer_kvstore, cfg.amp, (run["record"] or {}).get("amp"))
    if cfg.begin_epoch > 0:
        load_states(trainer, checkpoint_path(cfg, cfg.begin_epoch - 1, "states"))
    return Loop(cfg, task, contexts, workers, net, trainer, run, batch_size, iters_per_epoch,
                cfg.num_epoch * iters_per_epoch,
                cfg.log_frequency or max(len(loader.dataset) // (batch_size * 20), 5), loader,
                saved_epoch=cfg.begin_epoch - 1)


def _run_epoch(loop: Loop, hooks: Sequence[Hook]) -> None:
    """One epoch: the generators reseeded from (seed, epoch), the poly LR (per epoch, or per
    iteration for a task that asks), the steps and the hooks after each."""
    cfg, task, trainer = loop.cfg, loop.task, loop.trainer
    reseed(dist.worker_seed(cfg.seed, loop.workers.rank), loop.epoch)
    loop.epoch_lr = loop.lr = poly_lr(cfg.learning_rate, loop.epoch * loop.iters_per_epoch,
                                      loop.num_iters) \
        if task.lr_per_iteration else poly_lr(cfg.learning_rate, loop.epoch, cfg.num_epoch)
    trainer.set_learning_rate(loop.lr)
    loop.loader.set_epoch(loop.epoch)
    loop.epoch_started = time.time()
    for hook in hooks:
        hook.before_epoch(loop)
    loop.bar = tqdm(loop.loader, total=loop.iters_per_epoch, desc=f"epoch {loop.epoch}",
                    leave=False, disable=None)
    for i, batch in enumerate(loop.bar):
        loop.iteration = loop.epoch * loop.iters_per_epoch + i
        if task.lr_per_iteration:
            loop.lr = poly_lr(cfg.learning_rate, loop.iteration, loop.num_iters)
            trainer.set_learning_rate(loop.lr)
        metrics = _step(loop, batch)
        for hook in hooks:
            hook.after_step(loop, i, metrics)
    loop.bar.close()


def _step(loop: Loop, batch: Sequence[mx.nd.NDArray]) -> RunningMetrics:
    """The task's inputs of `batch` on every device, `train_step`, and the batch's metrics (on
    the first device)."""
    task = loop.task
    loop.inputs = task.inputs(batch, loop.contexts, loop.iteration)
    loop.outputs = train_step(loop.net, loop.trainer, task.forward, loop.inputs,
                              loop.batch_size)
    metrics = task.metrics(loop.contexts[0])
    task.update_metrics(metrics, loop.outputs, loop.inputs)
    return metrics


def _interrupted_message(cfg: Config, epoch: int, saved_epoch: int) -> str:
    """One line: where training stopped, the last checkpoint and the flag that resumes it."""
    if saved_epoch < 0:
        return (f"interrupted in epoch {epoch} before the first checkpoint; nothing was saved in "
                f"{cfg.snapshot}")
    return (f"interrupted in epoch {epoch}; last checkpoint {checkpoint_path(cfg, saved_epoch)}; "
            f"resume with --begin-epoch {saved_epoch + 1} and otherwise the same flags")
