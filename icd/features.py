"""Per-pixel features for the superpixel merge: conv5 of a checkpoint (or colour/position).

release: region features are the ImageNet VGG16's conv5_3_relu at 513 input (section 8); the
colour/position features (`icd.data.superpixels.colour_position_features`) are ours, for
users without weights. A feature source is built by a
picklable zero-argument factory (`make_feature_factory`), once per worker process, on the run's
devices (worker k of the pool on device k mod D). `superpixels_on_devices` is the one call of
icd-superpixels and icd-run: it caps the processes (a network copy each) per GPU and the
threads of each process, so that processes x threads <= the machine's cores.

On a device, the merge's region means come from conv5_3 itself (`Conv5Features.region_means`):
upsampling is linear, so the sum of the upsampled map over a region is conv5_3 (D, h5 w5) times
that region's share of each conv5_3 cell (the bilinear weights of its pixels, summed on the host
from the ids: (n, h5 w5)); one product on the device and an (n, D) copy replace the copy of a
D x H x W map to the host. Same means up to float32 rounding, so the same superpixels unless two
merge candidates tie to within it.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
import scipy.sparse

from .checkpoint import assign, read_params
from .constants import MEAN_VALUE
from .data.superpixels import FeatureFn, colour_position_features, make_superpixels
from .devices import parse_context
from .model.backbone import VGG16DeepLab


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


def bilinear_taps(size_in: int, size_out: int, count: int) -> Tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """The first `count` output positions of MXNet's BilinearResize2D (align_corners, float32
    arithmetic as its kernel) from `size_in` to `size_out` samples: (count,) lower input index,
    upper input index and weight of the upper one."""
    ratio = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
    source = ratio * np.arange(count, dtype=np.float32)
    low = source.astype(np.int64)
    high = low + (low < size_in - 1)
    return low, high, (source - low.astype(np.float32)).astype(np.float32)


def cell_shares(labels: np.ndarray, canvas: Tuple[int, int], cells: Tuple[int, int]
                ) -> np.ndarray:
    """(n, h5 * w5) float32: for each region of `labels` ((H, W) ids 0..n-1, the top-left of a
    canvas of (size_h, size_w) upsampled from (h5, w5) cells), the sum over its pixels of the
    bilinear weight of each cell; (shares @ cells) = region sums of the upsampled map."""
    (height, width), n = labels.shape, int(labels.max()) + 1
    y0, y1, wy = bilinear_taps(cells[0], canvas[0], height)
    x0, x1, wx = bilinear_taps(cells[1], canvas[1], width)
    rows = np.repeat(labels.reshape(-1), 4)
    cols, vals = [], []
    for ys, ty in ((y0, 1 - wy), (y1, wy)):
        for xs, tx in ((x0, 1 - wx), (x1, wx)):
            cols.append((ys[:, None] * cells[1] + xs[None, :]).reshape(-1))
            vals.append((ty[:, None] * tx[None, :]).reshape(-1))
    cols, vals = np.stack(cols, 1).reshape(-1), np.stack(vals, 1).reshape(-1)
    shares = scipy.sparse.coo_matrix((vals.astype(np.float64), (rows, cols)),
                                     shape=(n, cells[0] * cells[1]))
    return shares.toarray().astype(np.float32)


class Conv5Features:
    """conv5_3_relu features of a VGG16 checkpoint on a device, for superpixel merging
    (section 8): the image is padded bottom/right with 127 to `input_size` (or its own size if
    larger); conv5_3_relu is bilinearly upsampled to the padded size and cropped to the image.

    Calling it maps an (H, W, 3) uint8 RGB image to those (H, W, C5) float32 features on the
    host; `region_means` gives the merge's region means without them (module doc).
    """

    def __init__(self, params_path: str, ctx: Optional[mx.Context] = None,
                 input_size: int = 513):
        self.ctx = ctx or mx.cpu()
        self.input_size = input_size
        self.net = load_backbone(params_path, self.ctx)
        self.net.hybridize(static_alloc=True)

    def _conv5(self, image: np.ndarray) -> Tuple[mx.nd.NDArray, Tuple[int, int]]:
        """(1, C5, h5, w5) conv5_3_relu on the device, and the padded canvas (size_h, size_w)."""
        h, w = image.shape[:2]
        canvas = (max(self.input_size, h), max(self.input_size, w))
        padded = np.full(canvas + (3,), MEAN_VALUE, np.float32)
        padded[:h, :w] = image
        _, conv5 = self.net(mx.nd.array(padded.transpose(2, 0, 1)[None], ctx=self.ctx))
        return conv5, canvas

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        conv5, (size_h, size_w) = self._conv5(image)
        up = mx.nd.contrib.BilinearResize2D(conv5, height=size_h, width=size_w)
        return up[0, :, :h, :w].asnumpy().transpose(1, 2, 0)

    def region_means(self, image: np.ndarray, labels: np.ndarray
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """(n, C5) float64 mean upsampled feature and (n,) int64 pixel count of each region of
        `labels` ((H, W) ids 0..n-1 of `image`), as `icd.data.superpixels.region_means` of the
        per-pixel features, reduced on the device."""
        if labels.shape != image.shape[:2]:
            raise ValueError(f"regions are {labels.shape} but the image is {image.shape[:2]}")
        conv5, canvas = self._conv5(image)
        shares = cell_shares(labels, canvas, conv5.shape[2:])
        sums = mx.nd.dot(mx.nd.array(shares, ctx=self.ctx),
                         conv5[0].reshape((conv5.shape[1], -1)), transpose_b=True)
        sizes = np.bincount(labels.reshape(-1), minlength=shares.shape[0]).astype(np.int64)
        return sums.asnumpy().astype(np.float64) / np.maximum(sizes, 1)[:, None], sizes


def conv5_feature_extractor(params_path: str, ctx: Optional[mx.Context] = None,
                            input_size: int = 513) -> Conv5Features:
    """conv5_3_relu features of a VGG16 checkpoint, for superpixel merging (section 8): see
    Conv5Features."""
    return Conv5Features(params_path, ctx, input_size)


def build_feature_fn(pretrained: Optional[str] = None, ctx: Optional[mx.Context] = None
                     ) -> FeatureFn:
    """The feature function: conv5_3 features of checkpoint `pretrained` on `ctx`, else
    colour/position."""
    if pretrained is None:
        return colour_position_features
    return conv5_feature_extractor(pretrained, ctx=ctx)


def _build_on_worker_device(pretrained: Optional[str], devices: Tuple[str, ...]) -> FeatureFn:
    """build_feature_fn on device k mod D of `devices` in pool worker k (the first device in a
    process that is no pool worker)."""
    ctx = None
    if devices:
        identity = multiprocessing.current_process()._identity   # (k,) in pool worker k >= 1
        ctx = parse_context(devices[(identity[0] - 1 if identity else 0) % len(devices)])
    return build_feature_fn(pretrained, ctx)


def make_feature_factory(pretrained: Optional[str] = None, devices: Sequence[str] = ()
                         ) -> Callable[[], FeatureFn]:
    """A picklable zero-argument factory of build_feature_fn(pretrained), one call per worker;
    `devices` (e.g. "gpu(0)", "gpu(1)"): worker k builds it on device k mod D."""
    return functools.partial(_build_on_worker_device, pretrained, tuple(devices))


# Processes holding a network on one GPU (each a CUDA context and a copy of VGG16 at 513 px):
# two, so that the host work of one (Felzenszwalb, the merge) overlaps the forward of the other
# (docs/gpus.md; not measured on a GPU).
PROCESSES_PER_GPU = 2


def worker_plan(workers: int, devices: Sequence[str], pretrained: Optional[str],
                cores: Optional[int] = None) -> Tuple[int, int]:
    """(processes, threads of each) for `workers` requested: at most PROCESSES_PER_GPU per GPU
    of `devices` when the network `pretrained` runs on GPUs, and at most `cores` (default: this
    machine's); threads = cores // processes, so processes x threads <= cores."""
    cores = cores or os.cpu_count() or 1
    gpus = sum(str(d).startswith("gpu") for d in devices)
    processes = min(workers, cores, PROCESSES_PER_GPU * gpus if pretrained and gpus else cores)
    return processes, max(1, cores // max(processes, 1))


def thread_env(threads: int) -> Dict[str, str]:
    """The environment that caps a spawned process at `threads` threads: OpenMP's (MXNet's
    operators, OpenBLAS) and one MXNet engine thread per device."""
    return {"OMP_NUM_THREADS": str(threads), "MXNET_CPU_WORKER_NTHREADS": "1"}


def superpixels_on_devices(image_root: str, data_list: str, out: str, pretrained: Optional[str],
                           devices: Sequence[str], workers: int, **options) -> List[str]:
    """icd.data.superpixels.make_superpixels with the conv5_3 features of `pretrained` (None:
    colour/position) on `devices` (e.g. "gpu(0)", "gpu(1)"), in at most `workers` processes as
    `worker_plan` caps them, each capped at its share of the cores (`thread_env`); `options`:
    make_superpixels'. Returns the paths written."""
    processes, threads = worker_plan(workers, devices, pretrained)
    return make_superpixels(image_root, data_list, out,
                            feature_factory=make_feature_factory(pretrained, devices),
                            workers=processes, worker_env=thread_env(threads), **options)
