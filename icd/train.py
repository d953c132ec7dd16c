"""The one training loop: CAM-only baseline, ICD and every ablation, on any number of devices.

Release semantics (ORIGINAL_RELEASE.md section 4): SGD momentum 0.9, wd 5e-4, gradients summed
over devices and rescaled by 1/batch_size, lr_mult/wd_mult set by the model, poly LR per epoch
1e-3 (1 - e / E)^0.9, the top-down warm-up over the first two epochs, a checkpoint pair
`<model>-<epoch:04d>.params/.states` after every epoch with the newest `num_save` kept.
Better than the release: the warm-up counter is derived from the global iteration, so a resumed
run (`begin_epoch`) continues the warm-up where it stopped instead of restarting it.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import time
from typing import Dict, List, Optional

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from .checkpoint import initialize, load_checkpoint, save_checkpoint
from .devices import parse_devices
from .config import Config
from .data.dataset import train_loader
from .io import atomic_path
from .model import build_model, ops
from .model.losses import top_down_warmup
from .data.voc import write_image
from .visualize import score_panel

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def poly_lr(base_lr: float, epoch: int, num_epoch: int, power: float = 0.9) -> float:
    """Learning rate of 0-based `epoch`: base (1 - epoch / num_epoch)^power (set per epoch)."""
    return base_lr * (1.0 - epoch / num_epoch) ** power


def checkpoint_path(cfg: Config, epoch: int, suffix: str = "params") -> str:
    return os.path.join(cfg.snapshot, f"{cfg.model}-{epoch:04d}.{suffix}")


def rotate_checkpoints(cfg: Config) -> None:
    """Keep the newest `num_save` checkpoint pairs (release: 5)."""
    pattern = re.compile(re.escape(cfg.model) + r"-(\d{4})\.params$")
    found = glob.glob(os.path.join(cfg.snapshot, f"{cfg.model}-*.params"))
    epochs = sorted(int(m.group(1)) for m in map(pattern.search, found) if m)
    for epoch in epochs[:-cfg.num_save] if cfg.num_save > 0 else []:
        for suffix in ("params", "states"):
            path = checkpoint_path(cfg, epoch, suffix)
            if os.path.exists(path):
                os.remove(path)


OPTIMIZERS = ("sgd", "adam")


def make_trainer(net: gluon.Block, learning_rate: float, momentum: float, wd: float,
                 optimizer: str = "sgd") -> gluon.Trainer:
    """SGD with the release's semantics (lr_mult / wd_mult are set by the model).

    `optimizer="adam"` (no momentum argument) exists only to produce a stand-in for the ImageNet
    initialisation where none can be had (the synthetic demo's pre-training): a VGG16 without
    BatchNorm trained from a random init by plain SGD sits on the label-prior plateau for tens of
    epochs. Every ICD and CAM training of the paper uses SGD.

    Only parameters with gradients are handed to the Trainer: Gluon initialises its key-value
    store lazily at the first step by copying device 0's value of every parameter it holds to all
    devices, which would overwrite the other devices' BatchNorm statistics of that step (the
    release's Module keeps one set per device and averages them when saving).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {OPTIMIZERS}")
    params = {name: p for name, p in net.collect_params().items() if p.grad_req != "null"}
    settings = {"learning_rate": learning_rate, "wd": wd}
    if optimizer == "sgd":
        settings["momentum"] = momentum
    return gluon.Trainer(params, optimizer, settings, kvstore="device")


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
        figures.update(icd_min=float(icd[0]), icd_max=float(icd[1]),
                       images_per_s=self.images / max(time.time() - self.started, 1e-9))
        return figures


def _write_json(path: str, value) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def _demo_image(cfg: Config, epoch: int, data, label, outputs: Dict[str, mx.nd.NDArray]) -> None:
    """Per-epoch picture: image, +/- bottom-up score, +/- top-down score of its first class."""
    image = data[0].asnumpy().transpose(1, 2, 0)
    c = int(np.argmax(label[0].asnumpy()))
    keys = ("icd_bu", "icd_td") if "icd_bu" in outputs else ("cam",)
    panel = score_panel(image, [outputs[k][0, c].asnumpy() for k in keys])
    write_image(os.path.join(cfg.snapshot, "demo", f"{cfg.model}-{epoch:04d}.jpg"), panel)


def train(cfg: Config) -> Dict[str, object]:
    """Train `cfg.model` from `cfg.begin_epoch` to `cfg.num_epoch`; returns the epoch records.

    Raises TrainingDiverged on a NaN/infinite loss (the last checkpoint stays as it was).
    """
    contexts = parse_devices(cfg.gpus, cfg.cpus)
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    loader = train_loader(cfg.image_root, cfg.superpixel_root, cfg.annotation_root,
                          cfg.data_list, image_size=cfg.image_size, batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, seed=cfg.seed)
    num_images = len(loader._dataset)
    iters_per_epoch = num_images // cfg.batch_size
    warmup_iters = cfg.warmup_epochs * num_images // cfg.batch_size   # release: 2 N // B
    log_every = cfg.log_frequency or max(num_images // (cfg.batch_size * 20), 5)

    net = build_model(cfg.model, **cfg.model_options)
    os.makedirs(cfg.snapshot, exist_ok=True)
    log_path = os.path.join(cfg.snapshot, f"{cfg.model}-log.json")
    records = []
    if cfg.begin_epoch > 0:
        resume = checkpoint_path(cfg, cfg.begin_epoch - 1)
        load_checkpoint(net, resume, contexts)
        if os.path.isfile(log_path):
            with open(log_path, encoding="utf-8") as f:
                records = [r for r in json.load(f) if r["epoch"] < cfg.begin_epoch]
    else:
        initialize(net, contexts, cfg.pretrained)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net, cfg.learning_rate, cfg.momentum, cfg.wd, cfg.optimizer)
    if cfg.begin_epoch > 0:
        states = checkpoint_path(cfg, cfg.begin_epoch - 1, "states")
        if not os.path.isfile(states):
            raise FileNotFoundError(f"{states}: optimizer states of the resumed epoch not found")
        trainer.load_states(states)
    icd = hasattr(net, "share_key")
    if icd and len(contexts) > 1:   # release: one moving mean in a store shared by the devices
        ops.share_moving_mean(net.share_key, net.icd_accum_resign_moving_mean.data(contexts[0]),
                              contexts)
    figures = RunningFigures(contexts[0])
    try:
        for epoch in range(cfg.begin_epoch, cfg.num_epoch):
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
                trainer.step(cfg.batch_size)
                batch_figures = BatchFigures(outputs, inputs["label"], contexts[0])
                figures.add(batch_figures)
                epoch_figures.add(batch_figures)
                if (i + 1) % log_every == 0:
                    now = _checked(figures.read(), epoch, iteration, cfg)
                    log.info("epoch %d batch %d lr %.3g warm %.3g cam_loss %.4f td_loss %.4f "
                             "recall %.3f icd [%.3f, %.3f] %.2f img/s", epoch, i + 1, lr, warm,
                             now["cam_loss"], now["td_loss"], now["recall"], now["icd_min"],
                             now["icd_max"], now["images_per_s"])
                    bar.set_postfix(loss=f"{now['cam_loss']:.3f}", recall=f"{now['recall']:.2f}",
                                    img_s=f"{now['images_per_s']:.1f}")
                    figures.reset()
            bar.close()
            done = _checked(epoch_figures.read(), epoch, iteration, cfg)
            _demo_image(cfg, epoch, batch[0], batch[2], {k: v for k, v in outputs[0].items()})
            save_checkpoint(net, checkpoint_path(cfg, epoch))
            with atomic_path(checkpoint_path(cfg, epoch, "states")) as tmp:
                trainer.save_states(tmp)
            rotate_checkpoints(cfg)
            records.append(dict(epoch=epoch, lr=lr, warm=warm, seconds=time.time() - started,
                                **done))
            _write_json(log_path, records)
            log.info("epoch %d done: %s", epoch, json.dumps(records[-1]))
    finally:
        if icd:
            ops.unshare_moving_mean(net.share_key)
    return {"records": records, "net": net}


def _checked(figures: Dict[str, float], epoch: int, iteration: int, cfg: Config):
    """Stop on a NaN/infinite loss, naming where and which checkpoint is the last good one."""
    if not all(math.isfinite(figures[k]) for k in ("cam_loss", "td_loss")):
        last = checkpoint_path(cfg, epoch - 1) if epoch > 0 else "none (first epoch)"
        raise TrainingDiverged(
            f"loss became NaN or infinite in epoch {epoch} by iteration {iteration} "
            f"(cam_loss {figures['cam_loss']}, td_loss {figures['td_loss']}); training stopped, "
            f"last good checkpoint: {last}. Lower --learning-rate or check the data.")
    return figures
