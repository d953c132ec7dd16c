"""Per-pixel features for the superpixel merge: conv5 of a checkpoint, or colour/position.

release: region features are the ImageNet VGG16's conv5_3_relu at 513 input (section 8); the
colour/position features are ours, for users without weights. A feature source is built by a
picklable zero-argument factory (`make_feature_factory`), once per worker process.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import mxnet as mx
import numpy as np
from skimage.color import rgb2lab

from ..checkpoint import assign, read_params
from ..model.backbone import MEAN_VALUE, VGG16DeepLab

FeatureFn = Callable[[np.ndarray], np.ndarray]
"""(H, W, 3) uint8 RGB image -> (H, W, D) float32 per-pixel features."""


def load_backbone(path: str, ctx: mx.Context) -> VGG16DeepLab:
    """The VGG16-DeepLab backbone of an ImageNet (or ICD) checkpoint; width read from its shapes."""
    values = read_params(path)
    if "arg:conv1_1_weight" not in values:
        raise ValueError(f"{path}: no arg:conv1_1_weight, not a VGG16 checkpoint")
    net = VGG16DeepLab(width=values["arg:conv1_1_weight"].shape[0] / 64.0, prefix="")
    backbone = {k: v for k, v in values.items()
                if k.startswith("arg:conv") and not k.startswith("arg:conv_ft")}
    assign(net, backbone, path, [ctx])
    return net


def conv5_feature_extractor(params_path: str, ctx: Optional[mx.Context] = None,
                            input_size: int = 513) -> FeatureFn:
    """conv5_3_relu features of a VGG16 checkpoint, for superpixel merging (section 8).

    Returns a function mapping an (H, W, 3) uint8 RGB image to (H, W, C5) float32 features: the
    image is padded bottom/right with 127 to `input_size` (or its own size if larger), conv5_3_relu
    is bilinearly upsampled to the padded size and cropped to the image.
    """
    ctx = ctx or mx.cpu()
    net = load_backbone(params_path, ctx)
    net.hybridize(static_alloc=True)

    def extract(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        size_h, size_w = max(input_size, h), max(input_size, w)
        padded = np.full((size_h, size_w, 3), MEAN_VALUE, np.float32)
        padded[:h, :w] = image
        data = mx.nd.array(padded.transpose(2, 0, 1)[None], ctx=ctx)
        _, conv5 = net(data)
        up = mx.nd.contrib.BilinearResize2D(conv5, height=size_h, width=size_w)
        return up[0, :, :h, :w].asnumpy().transpose(1, 2, 0)

    return extract


def colour_position_features(image: np.ndarray) -> np.ndarray:
    """Network-free per-pixel features: centred Lab colour and centred position.

    image: (H, W, 3) uint8 RGB -> (H, W, 5) float32: L/100, a/128, b/128 minus their image
    means, then x/W - 0.5 and y/H - 0.5. Centring makes the cosine of the merge compare
    directions around the image's average instead of all features pointing the same way.
    """
    h, w = image.shape[:2]
    lab = rgb2lab(image).astype(np.float32) / np.array([100, 128, 128], np.float32)
    lab -= lab.reshape(-1, 3).mean(axis=0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.concatenate([lab, (x / w - 0.5)[..., None], (y / h - 0.5)[..., None]], axis=-1)


def build_feature_fn(pretrained: Optional[str] = None, ctx: Optional[mx.Context] = None
                     ) -> FeatureFn:
    """The feature function: conv5_3 features of checkpoint `pretrained`, else colour/position."""
    if pretrained is None:
        return colour_position_features
    return conv5_feature_extractor(pretrained, ctx=ctx)


def make_feature_factory(pretrained: Optional[str] = None) -> Callable[[], FeatureFn]:
    """A picklable zero-argument factory of build_feature_fn(pretrained), one call per worker."""
    return functools.partial(build_feature_fn, pretrained)
