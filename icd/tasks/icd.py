"""ICD, the CAM-only baseline and every ablation as a task of the training loop (release
sections 4-5, docs/release.md)."""
from __future__ import annotations

import mxnet as mx
import numpy as np

from ..config import Config
from ..data.dataset import train_loader
from ..model import ICDNet, named_losses, ops
from ..model.losses import top_down_warmup
from ..visualize import score_panel
from .base import Task


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
            # icd.engine.hooks.SignFlipExchangeHook)
            self.store = ops.share_moving_mean(
                net.share_key, net.icd_accum_resign_moving_mean.data(contexts[0]), contexts)
            saved = (record or {}).get("sign_flip_store")
            if saved is not None:   # the checkpoint holds the devices' average, not the store
                self.store.master[:] = mx.nd.array(saved, dtype=np.float32)

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

    @staticmethod
    def forward(net, inputs):
        """The network's outputs by name, and its losses by name (`named_losses`) as "losses";
        a static method: icd.parity replays a bundle's steps with it."""
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
