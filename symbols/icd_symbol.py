"""The release's graph (docs/release.md section 2) with ``mx.sym`` and the ``ref_`` custom ops.

Inputs: ``data`` (N,3,H,W) RGB 0..255, ``superpixel`` (N,H,W) float ids, ``label`` (N,C) multi-hot.
With ``width`` < 1 every convolution's channel count is ``max(1, int(round(base * width)))``
(base 64/128/256/512 for the VGG convs, 1024 for fc6/fc7/fc6_ft/fc7_ft); the class count is num_cls.
"""
import mxnet as mx

from . import ops  # noqa: F401  (registers the ref_ custom operators)

__all__ = ["get_symbol", "channels", "VGG_CONVS", "LR_MULT_10", "DATA_NAMES"]

# section 2: vgg16_deeplab, (name, base channels, dilation)
VGG_CONVS = [
    [("conv1_1", 64, 1), ("conv1_2", 64, 1)],
    [("conv2_1", 128, 1), ("conv2_2", 128, 1)],
    [("conv3_1", 256, 1), ("conv3_2", 256, 1), ("conv3_3", 256, 1)],
    [("conv4_1", 512, 1), ("conv4_2", 512, 1), ("conv4_3", 512, 1)],
    [("conv5_1", 512, 2), ("conv5_2", 512, 2), ("conv5_3", 512, 2)],
]
# section 2 / 4: parameters trained with lr_mult 10
LR_MULT_10 = ("fc8_weight", "fc8_bias", "conv_ft_weight")
DATA_NAMES = ("data", "superpixel", "label")
_LR10 = {"__lr_mult__": "10.0"}   # the attribute that gives LR_MULT_10's parameters lr_mult 10


def channels(base, width):
    """Channel count of a convolution with ``base`` channels at the given width multiplier."""
    return max(1, int(round(base * width)))


def _conv_relu(x, name, num_filter, kernel, pad=0, dilate=1):
    """Convolution + ReLU (section 2: ReLU outputs are named ``<conv>_relu``)."""
    x = mx.sym.Convolution(x, num_filter=num_filter, kernel=(kernel, kernel),
                           pad=(pad, pad), dilate=(dilate, dilate), name=name)
    return mx.sym.Activation(x, act_type="relu", name=name + "_relu")


def _vgg16_deeplab(data, width):
    """Backbone of section 2: returns (conv5_3_relu (N,C5,h,w), pool5a (N,C5,h,w))."""
    x = data
    for stage, convs in enumerate(VGG_CONVS, start=1):
        for name, base, dilate in convs:
            x = _conv_relu(x, name, channels(base, width), 3, pad=dilate, dilate=dilate)
        if stage == 5:
            conv5_3_relu = x
            # section 2: pool5 max 3x3 s1 p1 -> pool5a avg 3x3 s1 p1
            x = mx.sym.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="max",
                               pooling_convention="valid", name="pool5")
            x = mx.sym.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="avg",
                               pooling_convention="valid", name="pool5a")
        else:
            # section 2: max 3x3 pad 1, stride 2 (stride 1 for pool4), 'valid' (floor) convention
            stride = 1 if stage == 4 else 2
            x = mx.sym.Pooling(x, kernel=(3, 3), stride=(stride, stride), pad=(1, 1), pool_type="max",
                               pooling_convention="valid", name="pool%d" % stage)
    return conv5_3_relu, x


def _cam_head(pool5a, fc_ch, num_cls, dropout):
    """Section 2, vgg16_cam: fc6 (3x3) and fc7 (1x1) with dropout, then fc8 -> x_cam (N,C,h,w)."""
    x = _conv_relu(pool5a, "fc6", fc_ch, 3, pad=1)
    x = mx.sym.Dropout(x, p=dropout, name="drop6")
    x = _conv_relu(x, "fc7", fc_ch, 1)
    x = mx.sym.Dropout(x, p=dropout, name="drop7")
    return mx.sym.Convolution(x, weight=mx.sym.var("fc8_weight", attr=_LR10),
                              bias=mx.sym.var("fc8_bias", attr=_LR10),
                              num_filter=num_cls, kernel=(1, 1), name="fc8")


def _bottom_up(feat, label, num_cls, width):
    """Section 2 / 3.1: the bottom-up estimate S^ (N,C,h,w).

    The forward projection uses the L2Normalization (instance, eps 1e-10) of the weight as a 1x1
    conv; BlockGrad on the weight and on the features keeps every autograd gradient off this path,
    so icd_bu_weight receives only ICD_BottomUp's 3.1 gradient (through its raw-weight input) and
    the features receive nothing from L_bu.
    """
    icd_bu_weight = mx.sym.var("icd_bu_weight", shape=(num_cls, channels(512, width)))  # (C, C5)
    feat_fixed = mx.sym.BlockGrad(feat, name="icd_bu_feat")
    w_fixed = mx.sym.BlockGrad(icd_bu_weight, name="icd_bu_weight_fixed")
    w_norm = mx.sym.L2Normalization(w_fixed, mode="instance", eps=1e-10, name="icd_bu_weight_norm")
    s_hat = mx.sym.Convolution(feat_fixed, weight=mx.sym.reshape(w_norm, shape=(0, 0, 1, 1)),
                               num_filter=num_cls, kernel=(1, 1), no_bias=True, name="icd_bu_conv")
    return mx.sym.Custom(s_hat, feat_fixed, label, icd_bu_weight, grad_scale=10.0,
                         op_type="ref_icd_bottom_up", name="icd_bu")


def _top_down_head(feat, fc_ch, num_cls):
    """Section 2: top-down on the BN output, no dropout; concat [BN, fc6_ft, fc7_ft] -> conv_ft."""
    fc6_ft = _conv_relu(feat, "fc6_ft", fc_ch, 3, pad=1)
    fc7_ft = _conv_relu(fc6_ft, "fc7_ft", fc_ch, 1)
    cat = mx.sym.concat(feat, fc6_ft, fc7_ft, dim=1, name="concat_ft")
    return mx.sym.Convolution(cat, weight=mx.sym.var("conv_ft_weight", attr=_LR10),
                              num_filter=num_cls, kernel=(1, 1), no_bias=True, name="conv_ft")


def _train_outputs(x_cam, s, s_refined, s_td, label, warmup_iters):
    """Mode 'train': Group[cam_prob, icd_bu (S), icd_td_prob] with the losses of 3.4 and 3.5."""
    # section 2 / 3.5: classification on the global average of x_cam
    pooled = mx.sym.flatten(mx.sym.Pooling(x_cam, global_pool=True, pool_type="avg", kernel=(1, 1),
                                           name="cam_gap"))
    cam_prob = mx.sym.Custom(pooled, label, op_type="ref_multi_sigmoid_loss", name="cam_loss")
    # section 3.4: top-down loss with the warm-up counter
    td_prob = mx.sym.Custom(s_td, s_refined, label, warmup_iters=int(warmup_iters), grad_scale=1.0,
                            op_type="ref_icd_top_down", name="icd_td")
    return mx.sym.Group([cam_prob, s, td_prob])


def get_symbol(num_cls=20, width=1.0, mode="train", dropout=0.5, warmup_iters=0):
    """The release's ICD graph.

    mode 'train' -> Group[cam_prob (N,C) = sigmoid(GAP(x_cam)), icd_bu (N,C,h,w) = S after the sign
    flip, icd_td_prob (N,C,h,w) = sigmoid(S'')];
    mode 'infer' -> Group[x_cam, S, S', S''] (all (N,C,h,w), raw).
    Both modes hold the same parameters and aux states; run 'infer' with is_train=False so that
    feat_bn uses its moving statistics and icd_accum_resign reads the stored moving mean.
    ``warmup_iters`` is W of section 3.4 (start of the top-down warm-up counter).
    """
    assert mode in ("train", "infer"), mode
    data = mx.sym.var("data")
    superpixel = mx.sym.var("superpixel")
    label = mx.sym.var("label")

    # section 1: subtract a single scalar 127, no std scaling
    conv5_3_relu, pool5a = _vgg16_deeplab(data - 127.0, width)
    fc_ch = channels(1024, width)
    x_cam = _cam_head(pool5a, fc_ch, num_cls, dropout)

    # section 2: feat_bn, fix_gamma (gamma treated as 1), beta learnable, eps 1e-5, momentum 0.9.
    # MXNet 1.9.1 (CPU) writes gamma := 1 into the parameter in the forward (so a step's recorded
    # feat_bn_gamma is 1 minus that step's weight decay) and updates the moving statistics in the
    # backward pass.
    feat = mx.sym.BatchNorm(conv5_3_relu, fix_gamma=True, eps=1e-5, momentum=0.9, name="feat_bn")
    s_hat = _bottom_up(feat, label, num_cls, width)

    # section 3.2: sign flip with the aux moving mean (C,2)
    s = mx.sym.Custom(s_hat, x_cam, label, mx.sym.var("icd_accum_resign_moving_mean"),
                      store_key="icd_accum_resign", momentum=0.9,
                      op_type="ref_icd_accum_resign", name="icd_accum_resign")

    # section 3.3: superpixel refinement S' (target source for top-down)
    s_refined = mx.sym.Custom(s, superpixel, label, op_type="ref_icd_sp_refine", name="icd_sp_refine")
    s_td = _top_down_head(feat, fc_ch, num_cls)

    if mode == "infer":
        return mx.sym.Group([x_cam, s, s_refined, s_td])
    return _train_outputs(x_cam, s, s_refined, s_td, label, warmup_iters)
