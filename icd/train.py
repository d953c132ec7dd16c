"""The one training loop: CAM-only baseline, ICD and every ablation, on any number of devices.

Release semantics (ORIGINAL_RELEASE.md section 4): SGD momentum 0.9, wd 5e-4, gradients summed
over devices and rescaled by 1/batch_size, lr_mult/wd_mult set by the model, poly LR per epoch
1e-3 (1 - e / E)^0.9, the top-down warm-up over the first two epochs, a checkpoint pair
`<model>-<epoch:04d>.params/.states` after every epoch with the newest `num_save` kept.
Better than the release: the warm-up counter is derived from the global iteration, so a resumed
run (`begin_epoch`) continues the warm-up where it stopped instead of restarting it.

Runs (ours): every checkpoint pair gets a run record `<model>-<epoch:04d>.json` naming the run
that wrote it, its seed and, with several devices, the shared sign-flip store. Every generator
(MXNet's, numpy's; the loader's augmentation is keyed by (seed, epoch, index)) is reseeded at the
start of each epoch from (seed, epoch), so the random state at an epoch boundary is a function of
what the record names and a resumed run is bit-identical to an uninterrupted one. A fresh run
refuses a folder holding the model's checkpoints unless `overwrite`; rotation removes only the
current run's checkpoints; the log `<model>-log.json` lists only that run's epochs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import re
import time
import uuid
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from .checkpoint import initialize, load_checkpoint, save_checkpoint
from .cli import parse_devices
from .config import Config
from .data.dataset import train_loader
from . import distributed as dist
from .io import atomic_path, deferred_interrupt, read_json, remove_stale_temporaries, write_json
from .model import build_model, ops
from .model.losses import top_down_warmup
from .data.voc import write_image
from .visualize import score_panel

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing after the last good checkpoint was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; the message names the last checkpoint and how to resume it."""


def poly_lr(base_lr: float, epoch: int, num_epoch: int, power: float = 0.9) -> float:
    """Learning rate of 0-based `epoch`: base (1 - epoch / num_epoch)^power (set per epoch)."""
    return base_lr * (1.0 - epoch / num_epoch) ** power


CHECKPOINT_SUFFIXES = ("params", "states", "json")   # weights, optimizer, run record


def checkpoint_path(cfg: Config, epoch: int, suffix: str = "params") -> str:
    return os.path.join(cfg.snapshot, f"{cfg.model}-{epoch:04d}.{suffix}")


def checkpoint_files(cfg: Config) -> Dict[int, List[str]]:
    """Epoch -> the model's checkpoint files (.params, .states, run record) in cfg.snapshot."""
    pattern = re.compile(re.escape(cfg.model) + r"-(\d{4})\.(" + "|".join(CHECKPOINT_SUFFIXES)
                         + r")$")
    found: Dict[int, List[str]] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(cfg.snapshot), f"{cfg.model}-*"))):
        match = pattern.search(os.path.basename(path))
        if match:
            found.setdefault(int(match.group(1)), []).append(path)
    return found


def read_run_record(cfg: Config, epoch: int) -> Optional[dict]:
    """The run record of checkpoint `epoch`, or None for a checkpoint without one (the release's)."""
    path = checkpoint_path(cfg, epoch, "json")
    return read_json(path) if os.path.isfile(path) else None


def rotate_checkpoints(cfg: Config, run: str) -> None:
    """Keep the newest `num_save` checkpoints of run `run` (release: 5); other runs' checkpoints
    and checkpoints without a run record are never removed."""
    ours = sorted(epoch for epoch in checkpoint_files(cfg)
                  if (read_run_record(cfg, epoch) or {}).get("run") == run)
    for epoch in ours[:-cfg.num_save] if cfg.num_save > 0 else []:
        for suffix in CHECKPOINT_SUFFIXES[::-1]:   # the run record last: it names the owner
            with contextlib.suppress(FileNotFoundError):
                os.remove(checkpoint_path(cfg, epoch, suffix))


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


def _log_path(cfg: Config) -> str:
    return os.path.join(cfg.snapshot, f"{cfg.model}-log.json")


def _remove_run_files(cfg: Config, epochs) -> None:
    """Remove the model's checkpoints of `epochs` and their demo pictures."""
    files = checkpoint_files(cfg)
    for epoch in epochs:
        for path in files.get(epoch, []) + [_demo_path(cfg, epoch)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]


def start_run(cfg: Config) -> Dict[str, object]:
    """Check the snapshot folder for `cfg` and decide the run: {"run": id, "records": log so far,
    "record": run record of the resumed checkpoint or None}.

    A fresh run (begin_epoch 0) into a folder holding checkpoints of the same model raises
    FileExistsError naming them, unless cfg.overwrite, which removes them and the log first.
    A resumed run continues the run of checkpoint begin_epoch - 1; checkpoints of later epochs
    (another continuation) are an error unless cfg.overwrite removes them.
    """
    os.makedirs(cfg.snapshot, exist_ok=True)
    for folder in (cfg.snapshot, os.path.join(cfg.snapshot, "demo")):
        for path in remove_stale_temporaries(folder, prefix=f"{cfg.model}-"):
            log.info("%s: removed the temporary file of an interrupted write", path)
    files = checkpoint_files(cfg)
    later = sorted(e for e in files if e >= cfg.begin_epoch)
    if later and not cfg.overwrite:
        names = ", ".join(os.path.basename(p) for e in later for p in files[e])
        if cfg.begin_epoch == 0:
            raise FileExistsError(
                f"{cfg.snapshot}: holds checkpoints of {cfg.model} ({names}); a new run would "
                f"mix with them. Resume with --begin-epoch {later[-1] + 1}, choose another "
                f"--snapshot, or pass --overwrite to delete them")
        raise FileExistsError(
            f"{cfg.snapshot}: holds checkpoints of {cfg.model} after epoch {cfg.begin_epoch - 1} "
            f"({names}); resuming at epoch {cfg.begin_epoch} would overwrite them. Resume with "
            f"--begin-epoch {later[-1] + 1}, or pass --overwrite to delete them")
    _remove_run_files(cfg, later)
    if cfg.begin_epoch == 0:
        with contextlib.suppress(FileNotFoundError):
            os.remove(_log_path(cfg))
        return {"run": _new_run_id(), "records": [], "record": None}
    record = read_run_record(cfg, cfg.begin_epoch - 1)
    if record is None:
        log.warning("%s: no run record; the shared sign-flip store is taken from the checkpoint "
                    "and the run's earlier log is not kept", checkpoint_path(cfg, cfg.begin_epoch - 1))
        return {"run": _new_run_id(), "records": [], "record": None}
    if record.get("seed") != cfg.seed:
        log.warning("%s: written with seed %s, resumed with seed %s",
                    checkpoint_path(cfg, cfg.begin_epoch - 1, "json"), record.get("seed"), cfg.seed)
    logged = read_json(_log_path(cfg)) if os.path.isfile(_log_path(cfg)) else []
    records = [r for r in logged if r.get("run") == record["run"] and r["epoch"] < cfg.begin_epoch]
    return {"run": record["run"], "records": records, "record": record}


OPTIMIZERS = ("sgd", "adam")


def make_trainer(net: gluon.Block, learning_rate: float, momentum: float, wd: float,
                 optimizer: str = "sgd", kvstore="device") -> gluon.Trainer:
    """SGD with the release's semantics (lr_mult / wd_mult are set by the model).

    `optimizer="adam"` (no momentum argument) exists only to produce a stand-in for the ImageNet
    initialisation where none can be had (the synthetic demo's pre-training): a VGG16 without
    BatchNorm trained from a random init by plain SGD sits on the label-prior plateau for tens of
    epochs. Every ICD and CAM training of the paper uses SGD.

    Only parameters with gradients are handed to the Trainer: Gluon initialises its key-value
    store lazily at the first step by copying device 0's value of every parameter it holds to all
    devices, which would overwrite the other devices' BatchNorm statistics of that step (the
    release's Module keeps one set per device and averages them when saving).
    A dist `kvstore` (icd.distributed) only sums gradients: each worker updates its own weights.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {OPTIMIZERS}")
    params = {name: p for name, p in net.collect_params().items() if p.grad_req != "null"}
    settings = {"learning_rate": learning_rate, "wd": wd}
    if optimizer == "sgd":
        settings["momentum"] = momentum
    return gluon.Trainer(params, optimizer, settings, kvstore=kvstore,
                         update_on_kvstore=False if kvstore != "device" else None)


def label_recall(prob, label):
    """Sum over images of the top-k recall of the labels (k = number of labels); device-side."""
    k = label.sum(axis=1)
    ranked = mx.nd.sort(prob, axis=1, is_ascend=False)
    threshold = mx.nd.pick(ranked, mx.nd.maximum(k - 1, 0), axis=1).expand_dims(1)
    return (mx.nd.broadcast_greater_equal(prob, threshold) * label).sum(axis=1) / \
        mx.nd.maximum(k, 1)


class BatchFigures:
    """One batch's figures on `ctx`: sums of L_cam, L_td and label recall over its images, and
    the range of the bottom-up scores S (computed once, added to every running window)."""

    def __init__(self, outputs: List[Dict[str, mx.nd.NDArray]], labels: List[mx.nd.NDArray],
                 ctx: mx.Context):
        self.sums = mx.nd.zeros((len(RunningFigures.NAMES),), ctx=ctx)
        self.icd_range = mx.nd.array([np.inf, -np.inf], ctx=ctx)
        self.images = 0
        for out, label in zip(outputs, labels):
            loss = out["loss"].as_in_context(ctx)
            prob = mx.nd.sigmoid(out["cam"].mean(axis=(2, 3))).as_in_context(ctx)  # (n, C)
            td = loss[2:3] if loss.shape[0] == 3 else mx.nd.zeros((1,), ctx=ctx)
            recall = label_recall(prob, label.as_in_context(ctx)).sum()
            self.sums += mx.nd.concat(loss[0:1], td, recall, dim=0)
            if "icd_bu" in out:   # reduced on its own device, only two numbers move
                s = out["icd_bu"]
                low, high = s.min().as_in_context(ctx), s.max().as_in_context(ctx)
                self.icd_range = mx.nd.concat(mx.nd.minimum(self.icd_range[:1], low),
                                              mx.nd.maximum(self.icd_range[1:], high), dim=0)
            self.images += label.shape[0]


class RunningFigures:
    """The release's running log figures, accumulated on the device and read only when logged."""
    NAMES = ("cam_loss", "td_loss", "recall")

    def __init__(self, ctx: mx.Context):
        self.ctx = ctx
        self.reset()

    def reset(self):
        self.sums = mx.nd.zeros((len(self.NAMES),), ctx=self.ctx)
        self.icd_range = mx.nd.array([np.inf, -np.inf], ctx=self.ctx)
        self.images = 0
        self.started = time.time()

    def add(self, figures: "BatchFigures"):
        self.sums += figures.sums
        self.icd_range = mx.nd.concat(mx.nd.minimum(self.icd_range[:1], figures.icd_range[:1]),
                                      mx.nd.maximum(self.icd_range[1:], figures.icd_range[1:]),
                                      dim=0)
        self.images += figures.images

    def read(self) -> Dict[str, float]:
        """Host copy of the figures (one sync); per-image means and images/s."""
        sums, icd = self.sums.asnumpy(), self.icd_range.asnumpy()
        n = max(self.images, 1)
        figures = {name: float(v) / n for name, v in zip(self.NAMES, sums)}
        has_icd = bool(icd[0] <= icd[1])   # a CAM-only model leaves the range empty: null
        figures.update(icd_min=float(icd[0]) if has_icd else None,
                       icd_max=float(icd[1]) if has_icd else None,
                       images_per_s=self.images / max(time.time() - self.started, 1e-9))
        return figures


def _demo_path(cfg: Config, epoch: int) -> str:
    return os.path.join(cfg.snapshot, "demo", f"{cfg.model}-{epoch:04d}.jpg")


def _demo_image(cfg: Config, epoch: int, data, label, outputs: Dict[str, mx.nd.NDArray]) -> None:
    """Per-epoch picture: image, +/- bottom-up score, +/- top-down score of its first class."""
    image = data[0].asnumpy().transpose(1, 2, 0)
    c = int(np.argmax(label[0].asnumpy()))
    keys = ("icd_bu", "icd_td") if "icd_bu" in outputs else ("cam",)
    panel = score_panel(image, [outputs[k][0, c].asnumpy() for k in keys])
    write_image(_demo_path(cfg, epoch), panel)


def train(cfg: Config) -> Dict[str, object]:
    """Train `cfg.model` from `cfg.begin_epoch` to `cfg.num_epoch`; returns the epoch records.

    Raises TrainingDiverged on a NaN/infinite loss (the last checkpoint stays as it was),
    TrainingInterrupted on Ctrl-C (never between the files of one checkpoint), FileExistsError
    when the snapshot folder holds checkpoints this run would mix with (see `start_run`).
    """
    contexts = parse_devices(cfg.gpus, cfg.cpus)
    workers = dist.Workers(cfg.kvstore)
    with dist.failures_end_the_process(workers, {TrainingDiverged: 3, KeyboardInterrupt: 130}):
        return _train(cfg, contexts, workers)


def _train(cfg: Config, contexts: List[mx.Context], workers: dist.Workers) -> Dict[str, object]:
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    loader = train_loader(cfg.image_root, cfg.superpixel_root, cfg.annotation_root,
                          cfg.data_list, image_size=cfg.image_size, batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, seed=cfg.seed, shard=workers.shard)
    num_images = len(loader._dataset)
    batch_size = cfg.batch_size * workers.num_workers   # the global batch
    iters_per_epoch = num_images // batch_size
    warmup_iters = cfg.warmup_epochs * num_images // batch_size   # release: 2 N // B
    log_every = cfg.log_frequency or max(num_images // (batch_size * 20), 5)
    num_devices = len(contexts) * workers.num_workers

    net = build_model(cfg.model, **cfg.model_options)
    run = start_run(cfg) if workers.rank == 0 else None
    workers.barrier()   # the others read the folder once rank 0 has checked and cleaned it
    run = run or {"run": None, "records": [], "record": read_run_record(
        cfg, cfg.begin_epoch - 1) if cfg.begin_epoch > 0 else None}
    records = run["records"]
    if cfg.begin_epoch > 0:
        load_checkpoint(net, checkpoint_path(cfg, cfg.begin_epoch - 1), contexts)
    else:
        initialize(net, contexts, cfg.pretrained)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net, cfg.learning_rate, cfg.momentum, cfg.wd, cfg.optimizer,
                           workers.trainer_kvstore)
    if cfg.begin_epoch > 0:
        states = checkpoint_path(cfg, cfg.begin_epoch - 1, "states")
        if not os.path.isfile(states):
            raise FileNotFoundError(f"{states}: optimizer states of the resumed epoch not found")
        trainer.load_states(states)
    icd = hasattr(net, "share_key")
    store = exchange = None
    if icd and num_devices > 1:   # release: one moving mean in a store shared by the devices
        store = ops.share_moving_mean(net.share_key,
                                      net.icd_accum_resign_moving_mean.data(contexts[0]), contexts)
        saved = (run["record"] or {}).get("sign_flip_store")
        if saved is not None:   # the checkpoint holds the devices' average, not the store
            store.master[:] = mx.nd.array(saved, dtype=np.float32)
        exchange = dist.SignFlipExchange(workers, store, net.icd_accum_resign_moving_mean)
    if num_devices > 1 and run["record"]:
        restore_device_states(net, dist.local_device_states(
            workers, run["record"].get("device_states"), len(contexts)), contexts,
            checkpoint_path(cfg, cfg.begin_epoch - 1, "json"))
    figures = RunningFigures(contexts[0])
    saved_epoch = cfg.begin_epoch - 1
    epoch = cfg.begin_epoch
    try:
        for epoch in range(cfg.begin_epoch, cfg.num_epoch):
            reseed(dist.worker_seed(cfg.seed, workers.rank), epoch)
            lr = poly_lr(cfg.learning_rate, epoch, cfg.num_epoch)
            trainer.set_learning_rate(lr)
            loader.set_epoch(epoch)
            epoch_figures = RunningFigures(contexts[0])
            started = time.time()
            bar = tqdm(loader, total=iters_per_epoch, desc=f"epoch {epoch}", leave=False,
                       disable=None)
            for i, batch in enumerate(bar):
                iteration = epoch * iters_per_epoch + i
                warm = top_down_warmup(iteration, warmup_iters)
                inputs = {name: gluon.utils.split_and_load(array, contexts, even_split=False)
                          for name, array in zip(("data", "superpixel", "label"), batch)}
                inputs["warm"] = [mx.nd.full((1,), warm, ctx=c) for c in contexts]
                with autograd.record():
                    outputs = [dict(zip(net.output_names,
                                        net(*[inputs[n][d] for n in net.input_names])))
                               for d in range(len(contexts))]
                autograd.backward([out["loss"] for out in outputs])
                trainer.step(batch_size)
                if exchange is not None:
                    exchange.after_step()
                batch_figures = BatchFigures(outputs, inputs["label"], contexts[0])
                figures.add(batch_figures)
                epoch_figures.add(batch_figures)
                if (i + 1) % log_every == 0:
                    dist.reduce_figures(workers, figures)
                    now = _checked(figures.read(), epoch, iteration, cfg)
                    log.info("epoch %d batch %d lr %.3g warm %.3g cam_loss %.4f td_loss %.4f "
                             "recall %.3f icd [%s, %s] %.2f img/s", epoch, i + 1, lr, warm,
                             now["cam_loss"], now["td_loss"], now["recall"], now["icd_min"],
                             now["icd_max"], now["images_per_s"])
                    bar.set_postfix(loss=f"{now['cam_loss']:.3f}", recall=f"{now['recall']:.2f}",
                                    img_s=f"{now['images_per_s']:.1f}")
                    figures.reset()
            bar.close()
            dist.reduce_figures(workers, epoch_figures)
            done = _checked(epoch_figures.read(), epoch, iteration, cfg)
            records.append(dict(epoch=epoch, run=run["run"], lr=lr, warm=warm,
                                seconds=time.time() - started, **done))
            with deferred_interrupt():   # the checkpoint's files, rotation and log go together
                states = dist.all_device_states(workers, device_states(net)) \
                    if num_devices > 1 else None   # collective, like the checkpoint's average
                if workers.num_workers == 1:
                    save_checkpoint(net, checkpoint_path(cfg, epoch))
                else:   # collective: BatchNorm statistics averaged over all workers' devices
                    dist.save_checkpoint(workers, net, checkpoint_path(cfg, epoch))
                if workers.rank == 0:
                    _demo_image(cfg, epoch, batch[0], batch[2],
                                {k: v for k, v in outputs[0].items()})
                    with atomic_path(checkpoint_path(cfg, epoch, "states")) as tmp:
                        trainer.save_states(tmp)
                    write_json(checkpoint_path(cfg, epoch, "json"), dict(
                        run=run["run"], epoch=epoch, seed=cfg.seed,
                        generators="reseeded at each epoch start from (seed, epoch)",
                        sign_flip_store=None if store is None else store.master.asnumpy().tolist(),
                        device_states=states, config=dataclasses.asdict(cfg)))
                    rotate_checkpoints(cfg, run["run"])
                    write_json(_log_path(cfg), records)
                saved_epoch = epoch
            log.info("epoch %d done: %s", epoch, json.dumps(records[-1]))
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted_message(cfg, epoch, saved_epoch)) from None
    finally:
        if icd:
            ops.unshare_moving_mean(net.share_key)
    return {"records": records, "net": net}


def _interrupted_message(cfg: Config, epoch: int, saved_epoch: int) -> str:
    """One line: where training stopped, the last checkpoint and the flag that resumes it."""
    if saved_epoch < 0:
        return (f"interrupted in epoch {epoch} before the first checkpoint; nothing was saved in "
                f"{cfg.snapshot}")
    return (f"interrupted in epoch {epoch}; last checkpoint {checkpoint_path(cfg, saved_epoch)}; "
            f"resume with --begin-epoch {saved_epoch + 1} and otherwise the same flags")


def _checked(figures: Dict[str, float], epoch: int, iteration: int, cfg: Config):
    """Stop on a NaN/infinite loss, naming where and which checkpoint is the last good one."""
    if not all(math.isfinite(figures[k]) for k in ("cam_loss", "td_loss")):
        last = checkpoint_path(cfg, epoch - 1) if epoch > 0 else "none (first epoch)"
        raise TrainingDiverged(
            f"loss became NaN or infinite in epoch {epoch} by iteration {iteration} "
            f"(cam_loss {figures['cam_loss']}, td_loss {figures['td_loss']}); training stopped, "
            f"last good checkpoint: {last}. Lower --learning-rate or check the data.")
    return figures
