"""ICDNet: CAM head + bottom-up + sign flip + superpixel refinement + top-down (paper Fig. 2).

Parameter names equal the release's checkpoint keys (docs/release.md section 2), so a
checkpoint moves between the release and this model by name (see icd.checkpoint).
"""
from __future__ import annotations

import functools
import itertools
from typing import Dict

import mxnet as mx
from mxnet import init
from mxnet.gluon import HybridBlock, nn

from ..constants import BOTTOM_UP_VARIANTS, FEATURES, NUM_SUPERPIXEL_IDS, TOP_DOWN
from . import ops  # registers the custom operators; the sign flip's order (issue_in_order)
from .backbone import VGG16DeepLab, pool5, scaled
from .losses import bottom_up_loss, multi_sigmoid_loss, top_down_loss
from .pretrained import VGG16_RELEASE
from .registry import register

LR_MULT_10 = ("fc8_weight", "fc8_bias", "conv_ft_weight")  # release: new classifier layers
_share_keys = itertools.count()


class CAMNet(HybridBlock):
    """VGG16-DeepLab + CAM head (fc6/fc7/fc8, GAP, multi-label sigmoid loss).

    forward(data (N, 3, H, W) RGB 0..255, label (N, C)) -> (x_cam (N, C, h, w), loss (1,)).
    Alone it is the CAM-only baseline; ICDNet extends it. `batch_norm`: the backbone with
    BatchNorm after every convolution (`vgg16_bn_cam`, the demo's stand-in pre-training only).
    """
    input_names = ("data", "label")
    infer_input_names = input_names   # the inputs of an inference forward (icd.infer)
    output_names = ("cam", "loss")
    loss_names = ("cam_loss",)   # the entries of the `loss` output, in order (`named_losses`)

    def __init__(self, num_classes: int = 20, width: float = 1.0, dropout: float = 0.5,
                 batch_norm: bool = False, prefix: str = "", **kwargs):
        super().__init__(prefix=prefix, **kwargs)
        self.num_classes, self.width = num_classes, width
        c5, fc = scaled(512, width), scaled(1024, width)
        with self.name_scope():
            self.backbone = VGG16DeepLab(width, batch_norm, prefix="")
            self.fc6 = nn.Conv2D(fc, 3, padding=1, activation="relu", in_channels=c5,
                                 prefix="fc6_")
            self.drop6 = nn.Dropout(dropout)
            self.fc7 = nn.Conv2D(fc, 1, activation="relu", in_channels=fc, prefix="fc7_")
            self.drop7 = nn.Dropout(dropout)
            self.fc8 = nn.Conv2D(num_classes, 1, in_channels=fc, prefix="fc8_")
        self._set_release_multipliers()

    def _set_release_multipliers(self):
        """Release optimiser semantics (section 4): lr_mult 10 on the new classifiers; weight
        decay only on names ending in _weight or _gamma (MXNet's default, biases/beta free)."""
        for name, param in self.collect_params().items():
            param.lr_mult = 10.0 if name in LR_MULT_10 else 1.0
            param.wd_mult = 1.0 if name.endswith(("_weight", "_gamma")) else 0.0

    def cam(self, F, data):
        """(conv4_3, conv5_3, fc6, x_cam) feature maps, all at the feature resolution (h, w)."""
        conv4, conv5 = self.backbone(data)
        fc6 = self.fc6(pool5(F, conv5))
        x_cam = self.fc8(self.drop7(self.fc7(self.drop6(fc6))))
        return conv4, conv5, fc6, x_cam

    def hybrid_forward(self, F, data, label):
        _, _, _, x_cam = self.cam(F, data)
        return x_cam, multi_sigmoid_loss(F, F.mean(x_cam, axis=(2, 3)), label)


class ICDNet(CAMNet):
    """The ICD framework. forward(data, superpixel (N, H, W) ids, label (N, C), warm (1,)) ->

    (x_cam, S, S_refined, S_adapted, losses): x_cam the CAM logits; S = S_hat * sign (Eqs. 3, 5);
    S_refined = S' (superpixel pooling); S_adapted = S'' (top-down logits), all (N, C, h, w);
    losses (3,) = [L_cam, L_bu surrogate, L_td] whose sum's gradient is the release's.
    `warm`, the top-down warm-up weight of the training step (`top_down_warmup`), enters L_td
    only: inference calls forward(data, superpixel, label) (`infer_input_names`) and gets
    the four score maps, no losses.
    In training (autograd.record) BN uses batch statistics and the sign flip updates its moving
    mean; otherwise moving statistics and the stored mean are used (release inference).
    """
    input_names = ("data", "superpixel", "label", "warm")   # a training step's
    infer_input_names = ("data", "superpixel", "label")
    output_names = ("cam", "icd_bu", "icd_bu_sp", "icd_td", "loss")
    loss_names = ("cam_loss", "bu_loss", "td_loss")   # L_cam, L_bu surrogate, L_td

    def __init__(self, num_classes: int = 20, width: float = 1.0, dropout: float = 0.5,
                 bottom_up_features: str = "conv5", bottom_up_variant: str = "bu",
                 top_down_structure: str = "c", num_superpixel_ids: int = NUM_SUPERPIXEL_IDS,
                 prefix: str = "", **kwargs):
        if bottom_up_features not in FEATURES:
            raise ValueError(f"unknown bottom-up features {bottom_up_features!r}; one of {FEATURES}")
        if bottom_up_variant not in BOTTOM_UP_VARIANTS:
            raise ValueError(f"unknown bottom-up loss {bottom_up_variant!r}; one of "
                             f"{BOTTOM_UP_VARIANTS}")
        if top_down_structure not in TOP_DOWN:
            raise ValueError(f"unknown top-down structure {top_down_structure!r}; "
                             f"one of {TOP_DOWN}")
        if top_down_structure == "d" and bottom_up_features != "conv5":
            raise ValueError("top-down structure 'd' shares fc6/fc7 with the CAM branch, which "
                             "take conv5 features; use bottom_up_features='conv5'")
        self.bottom_up_features, self.bottom_up_variant = bottom_up_features, bottom_up_variant
        self.top_down_structure, self.num_superpixel_ids = top_down_structure, num_superpixel_ids
        super().__init__(num_classes, width, dropout, prefix=prefix, **kwargs)
        c5, fc = scaled(512, width), scaled(1024, width)
        feature_channels = {"conv4": c5, "conv5": c5, "fc6": fc, "concat": 2 * c5 + fc}
        d = feature_channels[bottom_up_features]
        top_down_channels = {"a": d, "b": fc, "c": d + 2 * fc, "d": d + 2 * fc}[top_down_structure]
        self.share_key = f"icd_sign_flip_{next(_share_keys)}"
        with self.name_scope():
            # feat_bn: fix_gamma (gamma read as 1) but gamma still gets weight decay (release)
            self.feat_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, scale=False, in_channels=d,
                                        prefix="feat_bn_")
            self.icd_bu_weight = self.params.get("icd_bu_weight", shape=(num_classes, d))
            self.icd_accum_resign_moving_mean = self.params.get(
                "icd_accum_resign_moving_mean", shape=(num_classes, 2), init=init.Zero(),
                grad_req="null", differentiable=False)
            if top_down_structure in ("b", "c"):
                self.fc6_ft = nn.Conv2D(fc, 3, padding=1, activation="relu", in_channels=d,
                                        prefix="fc6_ft_")
                self.fc7_ft = nn.Conv2D(fc, 1, activation="relu", in_channels=fc,
                                        prefix="fc7_ft_")
            self.conv_ft = nn.Conv2D(num_classes, 1, use_bias=False, in_channels=top_down_channels,
                                     prefix="conv_ft_")
        # release: feat_bn_gamma is an argument (zero gradient under fix_gamma) that weight decay
        # still shrinks; Gluon marks it non-differentiable when scale=False, so undo that.
        self.feat_bn.gamma._differentiable = True
        self.feat_bn.gamma.grad_req = "write"
        self._set_release_multipliers()

    def bottom_up_input(self, F, conv4, conv5, fc6):
        """Features the directional vectors act on (Table 5), before feat_bn."""
        if self.bottom_up_features == "concat":
            return F.concat(conv4, conv5, fc6, dim=1)
        return {"conv4": conv4, "conv5": conv5, "fc6": fc6}[self.bottom_up_features]

    def top_down(self, F, feature):
        """S'' from the BN features (Table 6: a conv5 only, b fc7_ft, c concat, d shared fc6/7)."""
        if self.top_down_structure == "a":
            return self.conv_ft(feature)
        if self.top_down_structure == "d":
            fc6 = self.fc6(feature)
            return self.conv_ft(F.concat(feature, fc6, self.fc7(fc6), dim=1))
        fc6 = self.fc6_ft(feature)   # release: no dropout in the top-down branch
        fc7 = self.fc7_ft(fc6)
        if self.top_down_structure == "b":
            return self.conv_ft(fc7)
        return self.conv_ft(F.concat(feature, fc6, fc7, dim=1))

    def forward(self, data, *args):
        """Several devices: their sign flips update the shared store in the order of these
        calls (ops.issue_in_order); a Symbol (tracing) has no device."""
        if isinstance(data, mx.nd.NDArray):
            ops.issue_in_order(self.share_key, self.icd_accum_resign_moving_mean, data.context)
        return super().forward(data, *args)

    def hybrid_forward(self, F, data, superpixel, label, warm=None, *, icd_bu_weight,
                       icd_accum_resign_moving_mean):
        conv4, conv5, fc6, x_cam = self.cam(F, data)
        feature = self.feat_bn(self.bottom_up_input(F, conv4, conv5, fc6))
        # Eqs. 2-3: S_hat = w_c . f with unit w_c; no gradient flows through this path (release)
        w = F.L2Normalization(icd_bu_weight, mode="instance", eps=1e-10)
        s_hat = F.Convolution(F.BlockGrad(feature), F.BlockGrad(w).expand_dims(2).expand_dims(3),
                              kernel=(1, 1), num_filter=self.num_classes, no_bias=True)
        S = F.Custom(s_hat, F.BlockGrad(x_cam), label, icd_accum_resign_moving_mean,
                     op_type="icd_sign_flip", share_key=self.share_key)
        S_refined = F.Custom(S, superpixel, label, op_type="icd_superpixel_pool",
                             num_ids=str(self.num_superpixel_ids))
        S_adapted = self.top_down(F, feature)
        if warm is None:   # inference: the score maps only
            return x_cam, S, S_refined, S_adapted
        losses = F.concat(
            multi_sigmoid_loss(F, F.mean(x_cam, axis=(2, 3)), label),
            bottom_up_loss(F, icd_bu_weight, F.BlockGrad(feature), s_hat, label,
                           self.bottom_up_variant),
            top_down_loss(F, S_adapted, S_refined, label, warm), dim=0)
        return x_cam, S, S_refined, S_adapted, losses


def named_losses(net: CAMNet, loss: mx.nd.NDArray) -> Dict[str, mx.nd.NDArray]:
    """The `loss` output of `net` by name (`net.loss_names`): name -> (1,) NDArray. A hybridized
    network returns tensors, so the names are attached here, outside the graph."""
    if loss.shape[0] != len(net.loss_names):
        raise ValueError(f"{type(net).__name__}: {loss.shape[0]} loss values for the names "
                         f"{net.loss_names}")
    return {name: loss[i:i + 1] for i, name in enumerate(net.loss_names)}


# the ablations of Tables 4-6 are options of vgg16_icd (constructor keyword -> Config field)
register("vgg16_icd", ICDNet, task="icd", options=dict(
    bottom_up_features="bottom_up_features", bottom_up_variant="bottom_up_loss",
    top_down_structure="top_down"), pretrained=VGG16_RELEASE)
register("vgg16_cam", CAMNet, task="icd", pretrained=VGG16_RELEASE)
register("vgg16_bn_cam", functools.partial(CAMNet, batch_norm=True), task="icd",
         pretrained=VGG16_RELEASE)
