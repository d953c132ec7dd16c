"""DeepLab segmentation networks trained on the seeds (paper Tables 7-8).

- `vgg16_largefov`, `vgg16_aspp`: the release's graphs (docs/release.md section 12; the release
  never shipped their training code) on the VGG16-DeepLab backbone of section 2, parameter names
  equal to the release's symbol names, so `icd.checkpoint` moves them by name.
- `resnet101_largefov`: DeepLab-LargeFOV on gluoncv's dilated ResNetV1b-101 (output stride 8), so
  that gluoncv's ImageNet weights load.

All share the contract forward(data (N, 3, H, W) float32 RGB 0..255) -> logits (N, C + 1, h, w)
at the feature resolution (h = floor((H - 1) / 8) + 1: 321 -> 41, 513 -> 65), channel 0 the
background and `num_classes` = C foreground classes (VOC: 20, so 21 channels). The softmax loss
is `icd.model.losses.segmentation_loss`; inference is `icd.segment`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import mxnet as mx
from gluoncv.model_zoo import resnetv1b
from mxnet import init
from mxnet.gluon import HybridBlock, nn

from .backbone import VGG16DeepLab, new_parameter, pool5, scaled
from .pretrained import IMAGENET_MEAN, IMAGENET_STD, RESNET101_V1B, VGG16_RELEASE, imagenet_file
from .registry import register

LARGEFOV_DILATION = 12                 # release: fc6 3x3 dilation 12, pad 12
ASPP_DILATIONS = (6, 12, 18, 24)       # release: vgg16_aspp branches fc6_aspp{d}


def set_release_multipliers(net: HybridBlock) -> None:
    """Release optimiser semantics (section 4) for the DeepLab graphs: lr_mult 10 on the
    classifiers fc8* (section 12); weight decay only on names ending in _weight or _gamma."""
    for name, param in net.collect_params().items():
        param.lr_mult = 10.0 if name.startswith("fc8") else 1.0
        param.wd_mult = 1.0 if name.endswith(("_weight", "_gamma")) else 0.0


class LargeFOVBranch(HybridBlock):
    """fc6 (3x3, dilation d) + ReLU -> drop6 -> fc7 (1x1) + ReLU -> drop7 -> fc8 (1x1) logits.

    Parameters are named `fc6{suffix}_weight`, ... : suffix "" for LargeFOV (release names
    fc6/fc7/fc8), "_aspp{d}" for an ASPP branch. (N, in_channels, h, w) -> (N, outputs, h, w).
    """

    def __init__(self, outputs: int, in_channels: int, dilation: int, width: float = 1.0,
                 dropout: float = 0.5, suffix: str = "", **kwargs):
        super().__init__(**kwargs)
        fc = scaled(1024, width)
        with self.name_scope():
            self.fc6 = nn.Conv2D(fc, 3, padding=dilation, dilation=dilation, activation="relu",
                                 in_channels=in_channels, prefix=f"fc6{suffix}_")
            self.drop6 = nn.Dropout(dropout)
            self.fc7 = nn.Conv2D(fc, 1, activation="relu", in_channels=fc, prefix=f"fc7{suffix}_")
            self.drop7 = nn.Dropout(dropout)
            self.fc8 = nn.Conv2D(outputs, 1, in_channels=fc, prefix=f"fc8{suffix}_")

    def hybrid_forward(self, F, x):
        return self.fc8(self.drop7(self.fc7(self.drop6(self.fc6(x)))))


class DeepLabVGG16(HybridBlock):
    """VGG16-DeepLab backbone -> pool5 -> pool5a -> LargeFOV branch (fc6 dilation 12) or the sum
    of the four ASPP branches (dilations 6, 12, 18, 24). Use `vgg16_largefov` / `vgg16_aspp`.

    forward(data (N, 3, H, W) RGB 0..255) -> logits (N, num_classes + 1, h, w); the backbone
    subtracts the release's mean 127.
    """
    input_names = ("data",)
    output_names = ("score",)

    def __init__(self, num_classes: int = 20, width: float = 1.0, dropout: float = 0.5,
                 dilations: Sequence[int] = (LARGEFOV_DILATION,), prefix: str = "", **kwargs):
        super().__init__(prefix=prefix, **kwargs)
        self.num_classes, self.width = num_classes, width
        self.aspp = len(dilations) > 1
        with self.name_scope():
            self.backbone = VGG16DeepLab(width, prefix="")
            self.branches: List[LargeFOVBranch] = []
            for d in dilations:
                branch = LargeFOVBranch(num_classes + 1, scaled(512, width), d, width, dropout,
                                        suffix=f"_aspp{d}" if self.aspp else "", prefix="")
                self.register_child(branch, f"aspp{d}" if self.aspp else "largefov")
                self.branches.append(branch)
        set_release_multipliers(self)

    def hybrid_forward(self, F, data):
        _, conv5 = self.backbone(data)
        x = pool5(F, conv5)
        if not self.aspp:
            return self.branches[0](x)
        return F.add_n(*[branch(x) for branch in self.branches])   # release: fc8 outputs summed


def vgg16_largefov(num_classes: int = 20, width: float = 1.0,
                   dropout: float = 0.5) -> DeepLabVGG16:
    """DeepLab-LargeFOV on VGG16 (release `vgg16_largefov`): fc6 3x3 dilation 12 (1024),
    fc7 1x1 (1024), fc8 1x1 (num_classes + 1, lr_mult 10), Dropout 0.5 after fc6 and fc7.

    `vgg16_20M.params` provides every key but fc8 (`icd.model.pretrained.initialize`: fc8_weight
    ~ N(0, 0.01), fc8_bias 0, by name as the release). `width` scales every channel count
    (1.0 = the paper; tests use 1/8-1/16).
    """
    return DeepLabVGG16(num_classes, width, dropout, dilations=(LARGEFOV_DILATION,))


def vgg16_aspp(num_classes: int = 20, width: float = 1.0, dropout: float = 0.5) -> DeepLabVGG16:
    """DeepLab-ASPP on VGG16 (release `vgg16_aspp`): for d in (6, 12, 18, 24) a branch
    fc6_aspp{d} (3x3, dilation d, 1024) -> fc7_aspp{d} (1x1, 1024) -> fc8_aspp{d} (1x1,
    num_classes + 1, lr_mult 10), Dropout 0.5 after fc6/fc7; the four fc8 outputs summed.

    `vgg16_20M.params` provides only the backbone conv1_1..conv5_3: none of the branch layers
    carries its names, so `icd.model.pretrained.initialize` initialises all twelve branch layers by
    name (weights ~ N(0, 0.01), biases 0) and leaves the file's fc6/fc7 unused.
    """
    return DeepLabVGG16(num_classes, width, dropout, dilations=ASPP_DILATIONS)


class DilatedResNet101(HybridBlock):
    """gluoncv's ResNetV1b-101 without its classifier, `dilated=True`: res4 (`layer3`) dilation 2
    and res5 (`layer4`) dilation 4 with stride 1, so the output stride is 8.

    forward(x (N, 3, H, W) ImageNet-normalised RGB) -> (N, 2048, h, w). The children keep
    ResNetV1b's names (conv1, bn1, layer1..layer4), so a gluoncv `resnet101_v1b` `.params` file
    loads with `load_parameters(path, ignore_extra=True)` (only its classifier `fc` is extra).
    `frozen_bn`: BatchNorm uses the stored statistics in training too (gluoncv's
    `use_global_stats`), as DeepLab's ResNet-101 fine-tunes with frozen BN statistics.
    """

    def __init__(self, frozen_bn: bool = True, **kwargs):
        super().__init__(**kwargs)
        resnet = resnetv1b.resnet101_v1b(pretrained=False, dilated=True,
                                         use_global_stats=frozen_bn)
        with self.name_scope():
            self.conv1, self.bn1, self.relu = resnet.conv1, resnet.bn1, resnet.relu
            self.maxpool = resnet.maxpool
            self.layer1, self.layer2 = resnet.layer1, resnet.layer2
            self.layer3, self.layer4 = resnet.layer3, resnet.layer4

    def zero_residual_branches(self) -> None:
        """Set the last BatchNorm gamma of every bottleneck to 0 (gluoncv's `last_gamma`), so
        each block starts as its shortcut: with frozen statistics BN does not normalise, and a
        He-initialised 101-layer trunk otherwise multiplies its input by ~1e6."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                block.bn3.gamma.set_data(mx.nd.zeros(block.bn3.gamma.shape))

    def hybrid_forward(self, F, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNet101LargeFOV(HybridBlock):
    """DeepLab-LargeFOV on ResNet-101 (paper Table 8): the dilated trunk (output stride 8) and
    the LargeFOV head fc6 3x3 dilation 12 (1024) -> fc7 (1024) -> fc8 (num_classes + 1,
    lr_mult 10), Dropout 0.5 after fc6 and fc7. No pool5/pool5a: those belong to VGG16.

    forward(data (N, 3, H, W) RGB 0..255) -> logits (N, num_classes + 1, h, w). The input is
    normalised as gluoncv's ImageNet weights expect: (data / 255 - mean) / std per RGB channel,
    mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). Initialise with `initialize_imagenet`.
    """
    input_names = ("data",)
    output_names = ("score",)

    def __init__(self, num_classes: int = 20, dropout: float = 0.5, frozen_bn: bool = True,
                 prefix: str = "", **kwargs):
        super().__init__(prefix=prefix, **kwargs)
        self.num_classes = num_classes
        with self.name_scope():
            self.trunk = DilatedResNet101(frozen_bn, prefix="")
            self.largefov = LargeFOVBranch(num_classes + 1, 2048, LARGEFOV_DILATION,
                                           dropout=dropout, prefix="")
        set_release_multipliers(self)
        # gluoncv leaves the convolutions' input channels to the first forward: infer every
        # shape now, so that a checkpoint loads (by name and shape) into a fresh model
        self.infer_shape(mx.nd.zeros((1, 3, 32, 32)))

    def hybrid_forward(self, F, data):
        channels = F.split(data / 255.0, num_outputs=3, axis=1)
        x = F.concat(*[(c - m) / s for c, m, s in zip(channels, IMAGENET_MEAN, IMAGENET_STD)],
                     dim=1)
        return self.largefov(self.trunk(x))

    def initialize_imagenet(self, contexts: Sequence[mx.Context],
                            pretrained: Union[bool, str, None] = False,
                            root: Optional[str] = None) -> None:
        """Initialise for training: the head by name as the release's new layers
        (`icd.model.backbone.new_parameter`: weights ~ N(0, 0.01), biases 0); the trunk from
        gluoncv's ImageNet `resnet101_v1b` weights, the file `icd.model.pretrained.imagenet_file`
        resolves for `pretrained`.

        pretrained: True or "modelzoo" takes them from gluoncv's model store (its cache folder
        `root`, default ~/.mxnet/models, or downloaded there); a path loads a local gluoncv
        `.params` file (e.g. saved with `resnet101_v1b(pretrained=True).save_parameters(path)`);
        False, None or '' leaves the trunk He-initialised with its residual branches at zero
        (tests, no weights; see `DilatedResNet101.zero_residual_branches`).
        """
        contexts = list(contexts)
        self.trunk.initialize(init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2),
                              ctx=contexts, force_reinit=True)
        for param in self.largefov.collect_params().values():
            param.initialize(ctx=contexts, force_reinit=True)
            param.set_data(new_parameter(param.name, param.shape))
        path = imagenet_file("resnet101_largefov", pretrained, root)
        if path:
            self.trunk.load_parameters(path, ctx=contexts, ignore_extra=True)
        else:
            self.trunk.zero_residual_branches()


def resnet101_largefov(num_classes: int = 20, width: float = 1.0, dropout: float = 0.5,
                       frozen_bn: bool = True) -> ResNet101LargeFOV:
    """DeepLab-LargeFOV on gluoncv's dilated ResNetV1b-101 (see `ResNet101LargeFOV`).

    `width` exists for the common model options and must be 1.0 (ResNet-101 has no width
    multiplier; small tests use a small input instead).
    """
    if width != 1.0:
        raise ValueError(f"resnet101_largefov has no width multiplier (width {width}); use 1.0")
    return ResNet101LargeFOV(num_classes, dropout, frozen_bn)


register("vgg16_largefov", vgg16_largefov, task="segmentation", pretrained=VGG16_RELEASE)
register("vgg16_aspp", vgg16_aspp, task="segmentation", pretrained=VGG16_RELEASE)
register("resnet101_largefov", resnet101_largefov, task="segmentation", pretrained=RESNET101_V1B)
