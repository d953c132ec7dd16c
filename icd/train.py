"""The one training loop and the tasks it runs: ICD, the CAM-only baseline and every ablation
(`ICDTask`), and DeepLab on the seeds or ground-truth masks (`SegmentationTask`), on any number
of devices.

The loop (`train`) is written once: devices, the Trainer with the model's lr_mult / wd_mult, the
poly LR, run records, checkpoints and their rotation, exact resume, the NaN stop, Ctrl-C, the
progress bar, the JSON log and an image per epoch; what it does besides the step is a hook
(`LogHook`, `EpochRecordHook`, `CheckpointHook`: detectron2's HookBase). A task (`Task`)
supplies what differs: its loader, how its model is initialised, one batch's forward and loss,
its running metrics and its epoch image; a model's registration names its task (`TASKS`), and a
model without one is refused. The checkpoint files' names, rotation and run records are
icd.checkpoint's.

Release semantics (docs/release.md section 4): SGD momentum 0.9, wd 5e-4, gradients summed
over devices and rescaled by 1/batch_size, lr_mult/wd_mult set by the model, poly LR per epoch
1e-3 (1 - e / E)^0.9 (per iteration for DeepLab, see `SegmentationTask`), the top-down warm-up
over the first two epochs, a checkpoint pair `<model>-<epoch:04d>.params/.states` after every
epoch with the newest `num_save` kept. Better than the release: the warm-up counter is derived
from the global iteration, so a resumed run (`begin_epoch`) continues the warm-up where it
stopped instead of restarting it.

Runs (ours): every checkpoint pair gets a run record `<model>-<epoch:04d>.json` naming the run
that wrote it, its seed and the task's shared state (ICD with several devices: the sign-flip
store). Every generator (MXNet's, numpy's; the loaders' augmentation is keyed by (seed, epoch,
index)) is reseeded at the start of each epoch from (seed, epoch), so the random state at an
epoch boundary is a function of what the record names and a resumed run is bit-identical to an
uninterrupted one. The record also names the class list and the run's config: a resume with
another list is refused, one with other settings too unless `allow_changes`, which starts a new
run chained to the old one (`start_run`, RESUME_FREE). A fresh run refuses a folder holding the
model's checkpoints unless `overwrite`; rotation removes only the current run's checkpoints; the
log `<model>-log.json` lists only that run's epochs.

Several machines (`kvstore` dist_*, icd.distributed): the loop's hooks serve every task alike.
The batch is per worker and the schedule follows the global batch (batch x workers); worker r
reads block r of every global batch; the Trainer only sums gradients over the job; the figures
are reduced over the workers before they are read; checkpoints average the aux states over every
device of the job and the run record keeps each device's copy; rank 0 alone writes files.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple, Type

import cv2
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from . import amp, distributed as dist, memory
from .checkpoint import (check_checkpoint_files, checkpoint_files, checkpoint_path,
                         complete_checkpoints, file_digest, load_checkpoint,
                         load_states, log_path, read_run_record, rotate_checkpoints, save_states,
                         staged_params)
from .devices import parse_devices, split_batch
from .config import Config
from .constants import OPTIMIZERS
from .data.classes import require_classes
from .data.dataset import TrainLoader, train_loader
from .data.segmentation import segmentation_loader
from .data.voc import IGNORE_LABEL, write_image
from .io import (deferred_interrupt, exclusive_lock, read_json, remove_stale_temporaries,
                 write_json)
from .model import ICDNet, model_from_config, model_spec, models_of, named_losses, ops
from .model.losses import nearest_label, segmentation_loss, top_down_warmup
from .model.pretrained import initialize
from .provenance import given_classes, require_complete, require_folder_classes
from .visualize import overlay, score_panel

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; the message names the last checkpoint and how to resume it."""


# The exit statuses of training (icd.commands.runner's): also those of a worker of several that
# fails (icd.distributed.failures_end_the_process), so the launcher exits with them.
EXIT_STATUSES = {TrainingDiverged: 3, KeyboardInterrupt: 130}


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


def device_states(net: gluon.Block) -> Dict[str, list]:
    """Each device's copy of every non-trained state (BatchNorm statistics, sign-flip means):
    the checkpoint holds their average (release), a resumed run needs each copy back."""
    return {name: [copy.asnumpy().tolist() for copy in p.list_data()]
            for name, p in net.collect_params().items() if p.grad_req == "null"}


def restore_device_states(net: gluon.Block, saved: Optional[Dict[str, list]],
                          contexts: List[mx.Context], source: str) -> None:
    """Put back the per-device states of `device_states` (the checkpoint gave every device the
    average); without them, or for another number of devices, the average stays (a warning)."""
    if not saved or any(len(copies) != len(contexts) for copies in saved.values()):
        log.warning("%s: no per-device states for %d devices; every device resumes from their "
                    "average, so the run is not bit-identical to an uninterrupted one", source,
                    len(contexts))
        return
    params = net.collect_params()
    for name, copies in saved.items():
        for target, value in zip(params[name].list_data(), copies):
            target[:] = mx.nd.array(value, dtype=target.dtype)


def _remove_run_files(cfg: Config, epochs) -> None:
    """Remove the model's checkpoints of `epochs` and their demo pictures."""
    files = checkpoint_files(cfg)
    for epoch in epochs:
        for path in files.get(epoch, []) + [_epoch_image_path(cfg, epoch)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


# Settings a resumed run may change without changing the run (the rest must equal the run
# record's `config`, or `allow_changes` starts a new run chained to the old one):
RESUME_FREE = (
    "begin_epoch",                          # where to resume, by definition
    "num_epoch",                            # where to stop: a finished run may be extended
                                            # (the poly LR of the epochs to come follows it)
    "snapshot",                             # the folder may have moved
    "num_workers",                          # loader processes: augmentation is keyed by
                                            # (seed, epoch, index), not by the process
    "num_save", "log_frequency",            # bookkeeping: rotation, log lines
    "pin_memory",                           # where the host keeps a batch, not what it holds
    "overwrite", "allow_changes",           # how this command treats the folder
    "pretrained",                           # initialises epoch 0 only; a resume loads the
                                            # checkpoint
    "classes",                              # the file's path; its names are compared apart
    "amp",                                  # precision may change between epochs (icd.amp)
    "gpus", "cpus", "batch_size", "kvstore",   # compared for the whole job as `devices`
                                            # (kind and number: the batch split follows it) and
                                            # `batch` (x the workers): one machine with two
                                            # devices continues as two machines with one
    "infer_size", "infer_batch_size", "scales", "flip", "crf",   # inference only
)


JOB_LABELS = {"devices": "devices (--gpus / --cpus, x workers)",
              "batch": "global batch (--batch-size x workers)"}


def _job(config: Dict[str, object], workers: int) -> Dict[str, object]:
    """The job of a config run by `workers` machines: `devices`, their kind and number over the
    job ("2 GPUs", "1 CPU"), and `batch`, the global batch."""
    gpus = [g for g in str(config.get("gpus") or "").split(",") if g.strip()]
    count, kind = (len(gpus), "GPU") if gpus else (max(int(config.get("cpus") or 0), 1), "CPU")
    count *= workers
    return {"devices": f"{count} {kind}{'s' if count > 1 else ''}",
            "batch": int(config.get("batch_size") or 0) * workers}


def resume_changes(cfg: Config, record: dict, workers: int = 1
                   ) -> Dict[str, Tuple[object, object]]:
    """The settings of `cfg` run by `workers` machines that differ from those of the run record
    `record` (its `config` and `workers`): {field: (the run's, cfg's)}, fields of RESUME_FREE
    left out, `devices` and `batch` for the job (`_job`); fields only one of them knows
    (another version) are not compared."""
    old = dict(record.get("config") or {})
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))   # as the record reads it back
    changes = {k: (old[k], new[k]) for k in sorted(set(old) & set(new))
               if k not in RESUME_FREE and old[k] != new[k]}
    before, now = _job(old, int(record.get("workers") or 1)), _job(new, workers)
    changes.update({k: (before[k], now[k]) for k in before if before[k] != now[k]})
    return changes


def _check_resume(cfg: Config, workers: int = 1
                  ) -> Tuple[Optional[dict], Dict[str, Tuple[object, object]]]:
    """The run record of checkpoint begin_epoch - 1 (None without one) and the settings that
    differ from it (`resume_changes`), after the checks of a resume: the .params and .states must
    be the files the record was written with (`check_checkpoint_files`) and the class list the
    run's (names and order, always); other settings need cfg.allow_changes (ValueError naming
    each)."""
    record = read_run_record(cfg, cfg.begin_epoch - 1)
    if record is None:
        return None, {}
    check_checkpoint_files(cfg, cfg.begin_epoch - 1, record)
    source = checkpoint_path(cfg, cfg.begin_epoch - 1, "json")
    if record.get("classes") is not None:
        require_classes(record["classes"], cfg.class_names, source, "the run was trained on",
                        given_classes(cfg.class_names), "resume with the run's --classes")
    changes = resume_changes(cfg, record, workers)
    if changes and not cfg.allow_changes:
        shown = "; ".join(f"{JOB_LABELS.get(k, '--' + k.replace('_', '-'))} {old!r} in the run, "
                          f"{new!r} now" for k, (old, new) in changes.items())
        raise ValueError(
            f"{source}: run {record.get('run')} was trained with other settings ({shown}); "
            f"resume with the run's settings for a continuation bit for bit, or pass "
            f"--allow-changes to start a new run from this checkpoint (its records name this "
            f"one as previous_run)")
    return record, changes


def start_run(cfg: Config, workers: int = 1) -> Dict[str, object]:
    """Check the snapshot folder for `cfg` and decide the run: {"run": id, "records": log so far,
    "record": run record of the resumed checkpoint or None, "previous_run": the run this one
    continues under a new id, or None}.

    A fresh run (begin_epoch 0) into a folder holding checkpoints of the same model raises
    FileExistsError naming them, unless cfg.overwrite, which removes them and the log first.
    A resumed run continues the run of checkpoint begin_epoch - 1; checkpoints of later epochs
    (another continuation) are an error unless cfg.overwrite removes them. Its class list must be
    the run's, and its settings (`workers` machines: `resume_changes`) too unless
    cfg.allow_changes: then a resume with other settings starts a new run id whose records name
    the old one (`previous_run`) and whose log keeps the old run's epochs.
    """
    os.makedirs(cfg.snapshot, exist_ok=True)
    for folder in (cfg.snapshot, os.path.join(cfg.snapshot, "demo")):
        for path in remove_stale_temporaries(folder, prefix=f"{cfg.model}-"):
            log.info("%s: removed the temporary file of an interrupted write", path)
    complete = complete_checkpoints(cfg)
    # the files of a checkpoint a killed run did not finish (no .params: see
    # complete_checkpoints); this run holds the folder's lock, so no other run is writing them
    unfinished = [e for e in checkpoint_files(cfg) if not os.path.isfile(checkpoint_path(cfg, e))]
    for epoch in unfinished:
        log.info("%s: removing the files of a checkpoint whose writing was interrupted",
                 checkpoint_path(cfg, epoch, "states"))
    _remove_run_files(cfg, unfinished)
    files = checkpoint_files(cfg)
    later = sorted(e for e in files if e >= cfg.begin_epoch)
    if later and not cfg.overwrite:
        names = ", ".join(os.path.basename(p) for e in later for p in files[e])
        resume = f"Resume with --begin-epoch {complete[-1] + 1}, " if complete else ""
        if cfg.begin_epoch == 0:
            raise FileExistsError(
                f"{cfg.snapshot}: holds checkpoints of {cfg.model} ({names}); a new run would "
                f"mix with them. {resume}choose another --snapshot, or pass --overwrite to "
                f"delete them")
        raise FileExistsError(
            f"{cfg.snapshot}: holds checkpoints of {cfg.model} after epoch {cfg.begin_epoch - 1} "
            f"({names}); resuming at epoch {cfg.begin_epoch} would overwrite them. {resume}or "
            f"pass --overwrite to delete them")
    record, changes = _check_resume(cfg, workers) if cfg.begin_epoch > 0 else (None, {})
    _remove_run_files(cfg, later)
    if cfg.begin_epoch == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(log_path(cfg))
        return {"run": _new_run_id(), "records": [], "record": None, "previous_run": None}
    if record is None:
        log.warning("%s: no run record; the shared sign-flip store is taken from the checkpoint "
                    "and the run's earlier log is not kept", checkpoint_path(cfg, cfg.begin_epoch - 1))
        return {"run": _new_run_id(), "records": [], "record": None, "previous_run": None}
    logged = read_json(log_path(cfg)) if os.path.isfile(log_path(cfg)) else []
    records = [r for r in logged if r.get("run") == record["run"] and r["epoch"] < cfg.begin_epoch]
    if changes:   # allowed by cfg.allow_changes (_check_resume)
        run = _new_run_id()
        log.warning("%s: resumed with other settings (%s): new run %s, previous run %s",
                    checkpoint_path(cfg, cfg.begin_epoch - 1, "json"),
                    ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()),
                    run, record["run"])
        return {"run": run, "records": records, "record": record, "previous_run": record["run"]}
    return {"run": record["run"], "records": records, "record": record,
            "previous_run": record.get("previous_run")}




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


class RunningMetrics:
    """A task's running log figures on `ctx`: per-image sums (`task.sums`, read as means over
    the images) and ranges (`task.ranges`, read as <name>_min / <name>_max), accumulated on the
    device and read only when logged (one sync). A batch's figures are computed once (the task's
    `measure`) and added to every running window."""

    def __init__(self, task: "Task", ctx: mx.Context):
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
    forward and loss, its log figures and its per-epoch picture. The loop (`train`) owns the
    devices, the Trainer, the LR schedule, checkpoints, run records, resume, the NaN stop,
    Ctrl-C, the progress bar and the JSON log.

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
        by suffix (icd.checkpoint.initialize)."""
        own = getattr(net, "initialize_imagenet", None)
        if own is not None:
            own(contexts, pretrained=self.cfg.pretrained or False)
        else:
            initialize(net, contexts, self.cfg.pretrained)

    def start(self, net: gluon.HybridBlock, contexts: List[mx.Context],
              record: Optional[dict], workers: dist.Workers) -> None:
        """Set up state shared by the devices of the job (after the Trainer; `record`: the
        resumed run's)."""

    def after_step(self) -> None:
        """Called after each optimizer step (collective with several workers)."""

    def stop(self, net: gluon.HybridBlock) -> None:
        """Release what `start` set up (always called)."""

    def run_record(self) -> Dict[str, object]:
        """Fields of the task's shared state for each checkpoint's run record."""
        return {}

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


def label_recall(prob, label):
    """Sum over images of the top-k recall of the labels (k = number of labels); device-side."""
    k = label.sum(axis=1)
    ranked = mx.nd.sort(prob, axis=1, is_ascend=False)
    threshold = mx.nd.pick(ranked, mx.nd.maximum(k - 1, 0), axis=1).expand_dims(1)
    return (mx.nd.broadcast_greater_equal(prob, threshold) * label).sum(axis=1) / \
        mx.nd.maximum(k, 1)


class ICDTask(Task):
    """ICD, the CAM-only baseline and every ablation (release sections 4-5): image-level labels
    and superpixels; the top-down warm-up over the first `warmup_epochs`; with several devices
    one sign-flip moving mean in a store shared by them. RunningMetrics: the release's L_cam, L_td,
    label recall and the range of the bottom-up scores S."""
    input_names = ("data", "superpixel", "label")
    losses = ("cam_loss", "td_loss")   # by the networks' loss names (model.named_losses)
    sums = losses + ("recall",)
    ranges = ("icd",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.store = None
        self.exchange = None
        self.warmup_iters = 0
        self.top_down_weight = 0.0   # L_td's weight this iteration: the exponential warm-up

    def loader(self, shard=(0, 1)):
        cfg = self.cfg
        loader = train_loader(cfg.image_root, cfg.superpixel_root, cfg.annotation_root,
                              cfg.data_list, image_size=cfg.image_size,
                              batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              seed=cfg.seed, shard=shard, classes=cfg.class_names,
                              pin_memory=cfg.pin_memory)
        # release: W = 2 N // B, B the global batch
        self.warmup_iters = cfg.warmup_epochs * len(loader.dataset) // (cfg.batch_size
                                                                         * shard[1])
        return loader

    def start(self, net, contexts, record, workers):
        if isinstance(net, ICDNet) and len(contexts) * workers.num_workers > 1:
            # release: one moving mean in a store shared by the devices (of every worker:
            # icd.distributed.SignFlipExchange)
            self.store = ops.share_moving_mean(
                net.share_key, net.icd_accum_resign_moving_mean.data(contexts[0]), contexts)
            saved = (record or {}).get("sign_flip_store")
            if saved is not None:   # the checkpoint holds the devices' average, not the store
                self.store.master[:] = mx.nd.array(saved, dtype=np.float32)
            self.exchange = dist.SignFlipExchange(workers, self.store,
                                                  net.icd_accum_resign_moving_mean)

    def after_step(self):
        if self.exchange is not None:
            self.exchange.after_step()

    def stop(self, net):
        if isinstance(net, ICDNet):
            ops.unshare_moving_mean(net.share_key)

    def run_record(self):
        return {"sign_flip_store": None if self.store is None else
                self.store.master.asnumpy().tolist()}

    def inputs(self, batch, contexts, iteration):
        self.top_down_weight = top_down_warmup(iteration, self.warmup_iters)
        inputs = super().inputs(batch, contexts, iteration)
        for device, ctx in zip(inputs, contexts):   # the network's input `warm` (the release's)
            device["warm"] = mx.nd.full((1,), self.top_down_weight, ctx=ctx)
        return inputs

    def schedule(self):
        return {"warm": self.top_down_weight}   # the log's `warm`: the top-down warm-up weight

    def forward(self, net, inputs):
        out = dict(zip(net.output_names, net(*[inputs[n] for n in net.input_names])))
        out["losses"] = named_losses(net, out["loss"])
        return out

    def update_metrics(self, metrics, outputs, inputs):
        ctx = metrics.ctx
        for out, device in zip(outputs, inputs):
            label = device["label"]
            prob = mx.nd.sigmoid(out["cam"].mean(axis=(2, 3))).as_in_context(ctx)  # (n, C)
            recall = label_recall(prob, label.as_in_context(ctx)).sum()
            # a loss the network does not have (L_td of the CAM-only baseline) counts as 0
            losses = [out["losses"][name].as_in_context(ctx) if name in out["losses"]
                      else mx.nd.zeros((1,), ctx=ctx) for name in self.losses]
            metrics.sums += mx.nd.concat(*losses, recall, dim=0)
            if "icd_bu" in out:   # reduced on its own device, only two numbers move
                s = out["icd_bu"]
                metrics.low = mx.nd.minimum(metrics.low, s.min().as_in_context(ctx))
                metrics.high = mx.nd.maximum(metrics.high, s.max().as_in_context(ctx))
            metrics.images += label.shape[0]

    def epoch_image(self, inputs, outputs):
        """Image, +/- bottom-up score, +/- top-down score of its first class (release)."""
        image = inputs["data"][0].asnumpy().transpose(1, 2, 0)
        c = int(np.argmax(inputs["label"][0].asnumpy()))
        keys = ("icd_bu", "icd_td") if "icd_bu" in outputs else ("cam",)
        return score_panel(image, [outputs[k][0, c].asnumpy() for k in keys])


class SegmentationTask(Task):
    """DeepLab trained on seeds or ground-truth masks (paper Sec. 5.6, Tables 7-8): the label
    maps of `cfg.label_root`, DeepLab-LargeFOV's augmentation (`icd.data.segmentation`) and
    softmax cross-entropy with 255 ignored (`segmentation_loss`). RunningMetrics: the loss and the pixel
    accuracy on the non-ignored pixels of the labels shrunk to the score map.

    LR: poly (power 0.9) per iteration, base (1 - i / (E * iterations per epoch))^0.9: DeepLab's
    Caffe solvers (lr_policy "poly") update it every iteration; an epoch's record holds the lr of
    its first iteration. lr_mult 10 on fc8 is the model's.
    """
    input_names = ("data", "label")
    sums = ("seg_loss", "pixel_accuracy")
    losses = ("seg_loss",)
    lr_per_iteration = True

    def loader(self, shard=(0, 1)):
        cfg = self.cfg
        # a seeds folder whose make_seeds run is running or failed is refused; ground truth
        # (no record) is read with a warning
        record = require_complete(cfg.label_root, "make_seeds.py")
        require_folder_classes(cfg.label_root, record, cfg.class_names)   # seeds: their list
        return segmentation_loader(cfg.image_root, cfg.label_root, cfg.data_list,
                                   crop_size=cfg.image_size, batch_size=cfg.batch_size,
                                   num_classes=cfg.num_cls, num_workers=cfg.num_workers,
                                   seed=cfg.seed, shard=shard, pin_memory=cfg.pin_memory)

    def forward(self, net, inputs):
        score = net(inputs["data"])
        return {"score": score, "loss": segmentation_loss(mx.nd, score, inputs["label"])}

    def update_metrics(self, metrics, outputs, inputs):
        ctx = metrics.ctx
        for out, device in zip(outputs, inputs):
            score = out["score"]
            target = nearest_label(mx.nd, device["label"], score)
            valid = target != IGNORE_LABEL
            right = (score.argmax(axis=1) == target) * valid
            accuracy = right.sum(axis=(1, 2)) / mx.nd.maximum(valid.sum(axis=(1, 2)), 1)
            metrics.sums += mx.nd.concat(out["loss"], accuracy.sum(), dim=0).as_in_context(ctx)
            metrics.images += score.shape[0]

    def epoch_image(self, inputs, outputs):
        """Image, its training labels and the prediction (argmax, nearest-upsampled), in the
        class list's colours over the image."""
        image = inputs["data"][0].asnumpy().transpose(1, 2, 0).astype(np.uint8)
        label = inputs["label"][0].asnumpy().astype(np.uint8)
        pred = outputs["score"][0].argmax(axis=0).asnumpy().astype(np.uint8)
        pred = cv2.resize(pred, label.shape[::-1], interpolation=cv2.INTER_NEAREST)
        classes = self.cfg.class_names
        return np.concatenate([image, overlay(image, label, classes=classes),
                               overlay(image, pred, classes=classes)], axis=1)


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


def _epoch_image_path(cfg: Config, epoch: int) -> str:
    return os.path.join(cfg.snapshot, "demo", f"{cfg.model}-{epoch:04d}.jpg")


def train(cfg: Config) -> Dict[str, object]:
    """Train `cfg.model` with its task from `cfg.begin_epoch` to `cfg.num_epoch`; returns
    {"records": the epoch records, "net": the network}.

    Raises ValueError for a model without a training task, TrainingDiverged on a NaN/infinite
    loss (the last checkpoint stays as it was), TrainingInterrupted on Ctrl-C (never between the
    files of one checkpoint), FileExistsError when the snapshot folder holds checkpoints this
    run would mix with (see `start_run`).

    With a dist `cfg.kvstore` this process is one worker of a job (icd.distributed): an error
    ends the process at once with its exit status (EXIT_STATUSES), so that the launcher ends the
    job instead of leaving the other workers waiting in the store.
    """
    task = task_for(cfg)
    contexts = parse_devices(cfg.gpus, cfg.cpus)
    workers = dist.Workers(cfg.kvstore)
    with dist.failures_end_the_process(workers, EXIT_STATUSES), \
            snapshot_lock(cfg) if workers.rank == 0 else contextlib.nullcontext():
        return _train(cfg, task, contexts, workers)


def snapshot_lock(cfg: Config):
    """The lock of cfg.model's checkpoints in cfg.snapshot (`<model>.lock` there), held for the
    training run's lifetime (icd.io.exclusive_lock): a second run of the model into the folder
    refuses, naming the running one. Rank 0 alone holds it: it alone writes the folder."""
    return exclusive_lock(os.path.join(cfg.snapshot, f"{cfg.model}.lock"),
                          f"{cfg.snapshot} ({cfg.model})")


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
    run: Dict[str, object]                  # start_run's: run id, records, resumed record
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


class Hook:
    """Something the loop does besides the step (detectron2's HookBase): the loop calls
    `after_step` after every optimizer step with the batch's metrics, `after_epoch` at the end
    of every epoch, in the order of its hooks."""

    def before_epoch(self, loop: Loop) -> None:
        pass

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        pass

    def after_epoch(self, loop: Loop) -> None:
        pass


class LogHook(Hook):
    """Every `log_every` batches: the running window's metrics reduced over the workers, the NaN
    stop, a log line and the progress bar's figures."""

    def before_epoch(self, loop: Loop) -> None:
        self.window = RunningMetrics(loop.task, loop.contexts[0])

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        self.window.add(metrics)
        if (index + 1) % loop.log_every:
            return
        dist.reduce_metrics(loop.workers, self.window)
        now = _stop_if_diverged(loop.task, self.window.read(), loop.epoch, loop.iteration,
                                loop.cfg)
        log.info("epoch %d batch %d lr %.3g %s", loop.epoch, index + 1, loop.lr, " ".join(
            f"{k} {v:.4g}" for k, v in {**loop.task.schedule(), **now,
                                        **amp.trainer_state(loop.trainer)}.items()
            if v is not None))
        loop.bar.set_postfix({k: f"{now[k]:.3g}" for k in loop.task.sums + ("images_per_s",)})
        self.window.reset()


class EpochRecordHook(Hook):
    """At the end of an epoch: its metrics reduced over the workers, the NaN stop, and the
    epoch's record (lr, schedule, seconds, metrics, precision) appended to the run's log."""

    def before_epoch(self, loop: Loop) -> None:
        self.epoch_metrics = RunningMetrics(loop.task, loop.contexts[0])

    def after_step(self, loop: Loop, index: int, metrics: RunningMetrics) -> None:
        self.epoch_metrics.add(metrics)

    def after_epoch(self, loop: Loop) -> None:
        dist.reduce_metrics(loop.workers, self.epoch_metrics)
        done = _stop_if_diverged(loop.task, self.epoch_metrics.read(), loop.epoch,
                                 loop.iteration, loop.cfg)
        loop.records.append(dict(
            epoch=loop.epoch, run=loop.run["run"], lr=loop.epoch_lr, **loop.task.schedule(),
            seconds=time.time() - loop.epoch_started, **done, amp=loop.cfg.amp,
            **amp.trainer_state(loop.trainer)))


class CheckpointHook(Hook):
    """At the end of an epoch, together or not at all under Ctrl-C: the epoch image, the
    checkpoint (.states and run record first, .params last: a checkpoint is complete or not
    resumable, complete_checkpoints; the record holds the digests of the .params and .states,
    which a resume checks), the rotation and the JSON log. Rank 0 writes; the collectives
    (device states, a dist checkpoint's values) run on every worker in the same order."""

    def after_epoch(self, loop: Loop) -> None:
        cfg, workers, epoch = loop.cfg, loop.workers, loop.epoch
        with deferred_interrupt():
            if workers.rank == 0:
                write_image(_epoch_image_path(cfg, epoch),
                            loop.task.epoch_image(loop.inputs[0], loop.outputs[0]))
            states = dist.all_device_states(workers, device_states(loop.net)) \
                if len(loop.contexts) * workers.num_workers > 1 else None
            values = dist.checkpoint_values(workers, loop.net)
            if workers.rank == 0:
                states_file = checkpoint_path(cfg, epoch, "states")
                with staged_params(values, checkpoint_path(cfg, epoch)) as params:
                    save_states(loop.trainer, states_file)
                    digests = {"params": params, "states": file_digest(states_file)}
                    write_json(checkpoint_path(cfg, epoch, "json"),
                               self.run_record(loop, states, digests))
                rotate_checkpoints(cfg, loop.run["run"])
                write_json(log_path(cfg), loop.records)
            loop.saved_epoch = epoch

    @staticmethod
    def run_record(loop: Loop, states: Optional[Dict[str, list]],
                   digests: Dict[str, str]) -> Dict[str, object]:
        """The checkpoint's run record: the run, the seed, the digests of the checkpoint's
        .params and .states, the task's shared state, every device's states, the class list,
        the loss scaler's state (fp16) and the config."""
        cfg = loop.cfg
        return dict(run=loop.run["run"], epoch=loop.epoch, seed=cfg.seed, digests=digests,
                    generators="reseeded at each epoch start from (seed, epoch)",
                    **loop.task.run_record(), device_states=states,
                    amp=amp.trainer_state(loop.trainer) or None,
                    classes=list(cfg.class_names), previous_run=loop.run.get("previous_run"),
                    workers=loop.workers.num_workers, config=dataclasses.asdict(cfg))


def _train(cfg: Config, task: Task, contexts: List[mx.Context],
           workers: dist.Workers) -> Dict[str, object]:
    loop = _start(cfg, task, contexts, workers)
    hooks = (LogHook(), EpochRecordHook(), CheckpointHook())
    try:
        task.start(loop.net, contexts, loop.run["record"], workers)
        if len(contexts) * workers.num_workers > 1 and loop.run["record"]:
            restore_device_states(loop.net, dist.local_device_states(
                workers, loop.run["record"].get("device_states"), len(contexts)), contexts,
                checkpoint_path(cfg, cfg.begin_epoch - 1, "json"))
        for loop.epoch in range(cfg.begin_epoch, cfg.num_epoch):
            _run_epoch(loop, hooks)
            for hook in hooks:
                hook.after_epoch(loop)
            log.info("epoch %d done: %s", loop.epoch, json.dumps(loop.records[-1]))
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
    """One optimizer step over every device; the batch's metrics, on the first device."""
    task = loop.task
    loop.inputs = task.inputs(batch, loop.contexts, loop.iteration)
    with autograd.record():
        loop.outputs = [task.forward(loop.net, device) for device in loop.inputs]
    amp.backward([out["loss"] for out in loop.outputs], loop.trainer)
    loop.trainer.step(loop.batch_size)
    task.after_step()
    metrics = RunningMetrics(task, loop.contexts[0])
    task.update_metrics(metrics, loop.outputs, loop.inputs)
    return metrics


def _interrupted_message(cfg: Config, epoch: int, saved_epoch: int) -> str:
    """One line: where training stopped, the last checkpoint and the flag that resumes it."""
    if saved_epoch < 0:
        return (f"interrupted in epoch {epoch} before the first checkpoint; nothing was saved in "
                f"{cfg.snapshot}")
    return (f"interrupted in epoch {epoch}; last checkpoint {checkpoint_path(cfg, saved_epoch)}; "
            f"resume with --begin-epoch {saved_epoch + 1} and otherwise the same flags")


def _stop_if_diverged(task: Task, figures: Dict[str, Optional[float]], epoch: int,
                      iteration: int, cfg: Config) -> Dict[str, Optional[float]]:
    """Stop on a NaN/infinite loss, naming where and which checkpoint is the last good one."""
    if not all(math.isfinite(figures[k]) for k in task.losses):
        last = checkpoint_path(cfg, epoch - 1) if epoch > 0 else "none (first epoch)"
        losses = ", ".join(f"{k} {figures[k]}" for k in task.losses)
        raise TrainingDiverged(
            f"loss became NaN or infinite in epoch {epoch} by iteration {iteration} "
            f"({losses}); training stopped, last good checkpoint: {last}. Lower "
            f"--learning-rate or check the data.")
    return figures
