"""DeepLab trained on seeds or ground-truth masks as a task of the training loop (paper Sec. 5.6,
Tables 7-8)."""
from __future__ import annotations

import cv2
import mxnet as mx
import numpy as np

from ..data.segmentation import segmentation_loader
from ..data.voc import IGNORE_LABEL
from ..model.losses import nearest_label, segmentation_loss
from ..provenance import require_complete, require_folder_classes
from ..visualize import overlay
from .base import Task


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
