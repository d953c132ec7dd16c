"""VGG16-DeepLab backbone (docs/release.md section 2) as a HybridBlock.

conv1..conv4 blocks of 3x3 convolutions + ReLU with 3x3/2 max pooling (pad 1, 'valid' convention),
pool4 with stride 1, conv5 with dilation 2, so a 321x321 input gives 41x41 feature maps (513 -> 65).
Parameter names equal the release's checkpoint keys (`conv1_1_weight`, ...).

`batch_norm=True` puts a BatchNorm (`conv1_1_bn_*`, ...) between every convolution and its ReLU:
not the release's network, but a way to train the demo's ImageNet stand-in from a random init in
minutes; `icd.pipeline.demo.fold_batch_norm` turns it into the plain VGG16 the release loads.
"""
from __future__ import annotations

import re

import mxnet as mx
from mxnet.gluon import HybridBlock, nn

from ..constants import MEAN_VALUE

NEW_LAYER_STD = 0.01   # release: parameters missing from the ImageNet file, mx.init.Normal(0.01)
BACKBONE_BN = re.compile(r"conv\d+_\d+_bn_")   # vgg16_bn_cam's backbone BatchNorms

# (block, number of convs, base channels, dilation) of vgg16_deeplab
VGG16_BLOCKS = ((1, 2, 64, 1), (2, 2, 128, 1), (3, 3, 256, 1), (4, 3, 512, 1), (5, 3, 512, 2))


def is_imagenet_key(key: str) -> bool:
    """Whether a checkpoint key belongs to what the VGG16 ImageNet file `vgg16_20M.params`
    provides (icd.model.pretrained.initialize reads it for every VGG16-based model): the backbone
    convs, fc6 and fc7 (not the classifier fc8, the ICD layers, nor the ASPP branches
    `fc6_aspp*`, `fc7_aspp*` of `vgg16_aspp`, which the file does not name)."""
    name = key[4:]
    return key.startswith("arg:") and name.startswith(("conv", "fc6_", "fc7_")) and \
        not name.startswith(("conv_ft", "fc6_ft", "fc7_ft", "fc6_aspp", "fc7_aspp")) and \
        not BACKBONE_BN.match(name)


def new_parameter(name: str, shape: tuple) -> mx.nd.NDArray:
    """The release's value of a parameter missing from `vgg16_20M.params` (section 2), on the CPU:
    `mx.init.Normal(0.01)` called with an `InitDesc` of its name, which MXNet's `Initializer`
    dispatches by suffix: `*_weight` ~ N(0, 0.01), `*_bias` = 0, `*_gamma` = 1, `*_beta` = 0."""
    value = mx.nd.zeros(shape)
    mx.init.Normal(NEW_LAYER_STD)(mx.init.InitDesc(name), value)
    return value


def scaled(channels: int, width: float) -> int:
    """Channel count of a width-reduced network: max(1, round(channels * width)); 1.0 = the paper."""
    return max(1, int(round(channels * width)))


def pool5(F, conv5):
    """The release's pool5 (max) then pool5a (avg), both 3x3 stride 1 pad 1, on conv5_3_relu:
    the end of vgg16_deeplab (section 2) that the CAM head and the DeepLab heads read.
    (N, C, h, w) -> (N, C, h, w)."""
    x = F.Pooling(conv5, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="max")  # pool5
    return F.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type="avg")   # pool5a


class VGG16DeepLab(HybridBlock):
    """Input (N, 3, H, W) float32 RGB 0..255; outputs (conv4_3_relu, conv5_3_relu), each (N, C, h, w).

    conv4_3 is returned for the bottom-up feature ablation (Table 5); both share the resolution h, w
    because pool4 has stride 1.
    """

    def __init__(self, width: float = 1.0, batch_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.width, self.batch_norm = width, batch_norm
        with self.name_scope():
            self.stages = []
            in_channels = 3
            for block, num_convs, channels, dilation in VGG16_BLOCKS:
                stage = nn.HybridSequential(prefix="")
                with stage.name_scope():
                    for i in range(1, num_convs + 1):
                        out_channels = scaled(channels, width)
                        stage.add(nn.Conv2D(out_channels, 3, padding=dilation, dilation=dilation,
                                            activation=None if batch_norm else "relu",
                                            in_channels=in_channels, prefix=f"conv{block}_{i}_"))
                        if batch_norm:
                            stage.add(nn.BatchNorm(in_channels=out_channels,
                                                   prefix=f"conv{block}_{i}_bn_"),
                                      nn.Activation("relu"))
                        in_channels = out_channels
                self.register_child(stage, f"conv{block}")
                self.stages.append(stage)

    def hybrid_forward(self, F, x):
        x = x - MEAN_VALUE
        conv4 = None
        for block, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if block == 4:
                conv4 = x
            if block < 5:
                # pool1-3: 3x3 stride 2 pad 1; pool4: stride 1 (DeepLab), 'valid' (floor) convention
                stride = 2 if block < 4 else 1
                x = F.Pooling(x, kernel=(3, 3), stride=(stride, stride), pad=(1, 1),
                              pool_type="max", pooling_convention="valid")
        return conv4, x
