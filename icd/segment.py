"""DeepLab inference on whole images -> index-PNG predictions, and their evaluation (Tables 7-8).

Per image: for every scale s (default 1 only) and, with `flip`, the mirrored image too, the image
is resized by s (bilinear, size int(h s + 0.5)), padded bottom/right with the mean 127 to a square
of side P = max(513, its sides) (with `canvas_step` k: P rounded up to 513 + a multiple of k, see
`canvas_side`), and the network's softmax probabilities are upsampled to P x P so that
score cell i lands on pixel 8i, the centre of its receptive field (`upsample_scores`, as the
training labels are read by `icd.model.losses.nearest_label`), cropped to the scaled image,
resized to the image (bilinear, half-pixel centres as cv2 scaled it) and mirrored back; the
probabilities are averaged over scales and flips. The prediction is their argmax, or, with
`crf`, the argmax of a dense CRF with DeepLab-LargeFOV's parameters (`icd.crf.DEEPLAB_CRF`).

Pipelining (`segment`): the images of batch t+1 are read by a thread pool and their forward is
queued on the devices before the probabilities of batch t are copied back; the PNG/JPEG writes
run in a thread pool and the dense CRF in a process pool while the devices work. The outputs
are those of the serial loop, byte for byte; every file is written atomically and an error
names its file.

Outputs under `out_dir`: `pred/<name>.png`, single-channel 8-bit PNGs of class ids 0..C that
`cv2.imread(p, 0)` reads, and `overlay/<name>.jpg`, the class list's colours over the image for
people.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import (Callable, ContextManager, Deque, Dict, List, Mapping, Optional, Sequence,
                    Tuple)

import cv2
import mxnet as mx
import numpy as np
from tqdm import tqdm

from .config import Config
from .crf import DEEPLAB_CRF, dense_crf
from .data.transforms import INFER_SIZE, PAD_VALUE
from .data.classes import classes_of_data
from .data.dataset import DataPaths
from .data.voc import VOC_CLASSES, read_image, read_list, write_image
from .devices import shard_names
from .evaluate import evaluate_seeds
from .infer import inference_network
from .visualize import overlay
from .io import atomic_path, write_json
from .model import model_options
from .model.losses import OUTPUT_STRIDE
from .provenance import file_identity

# With `canvas_step` 64, canvas sides above the inference size come in steps of 64 (513, 577,
# 641, ...: all 8k + 1 like 513, so the stride-8 output grid keeps its alignment) and multi-scale
# or COCO-sized inputs meet a few input shapes instead of one per image size (each new shape
# re-plans the memory and, on GPUs, re-runs cuDNN autotune for every convolution). Not the
# default: a larger canvas changes the probabilities inside the image (measured: docs/gpus.md),
# through the convolutions' zero padding at the canvas border and the upsampling ratio.
CANVAS_STEP = 64
AUTOTUNE = "MXNET_CUDNN_AUTOTUNE_DEFAULT"
# Paper Tables 7 (VGG16) and 8 (ResNet-101): DeepLab-LargeFOV trained on ICD seeds, VOC 2012
# mIoU (%) (val, test); I. = image-level labels, I.+S. = with saliency seeds.
PAPER_RESULTS = {"VGG16": {"I.": (61.2, 60.9), "I.+S.": (64.0, 63.9)},
                 "ResNet-101": {"I.": (64.1, 64.3), "I.+S.": (67.8, 68.0)}}
PAPER_TABLES = {"VGG16": "Table 7", "ResNet-101": "Table 8"}


def scaled_image(image: np.ndarray, scale: float, flip: bool) -> np.ndarray:
    """(H, W, 3) -> (int(H s + 0.5), int(W s + 0.5), 3), bilinear, mirrored with `flip`."""
    height, width = image.shape[:2]
    size = (int(width * scale + 0.5), int(height * scale + 0.5))  # cv2 takes (width, height)
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image[:, ::-1] if flip else image


def canvas_side(sides: Sequence[int], infer_size: int = INFER_SIZE, step: int = 0) -> int:
    """Side P of the square canvas of a batch whose largest side is max(`sides`):
    max(infer_size, sides) (DeepLab's padding to 513), with `step` > 0 rounded up to
    infer_size + a multiple of `step` (CANVAS_STEP)."""
    side = max([infer_size] + list(sides))
    if step > 0:
        side = infer_size + -(-(side - infer_size) // step) * step
    return side


def padded_batch(images: Sequence[np.ndarray], infer_size: int = INFER_SIZE,
                 canvas_step: int = 0, batch_size: int = 0) -> np.ndarray:
    """(B, 3, P, P) float32 RGB: each image at the top-left, the rest the mean 127 (release
    padding), P = canvas_side(their sides, infer_size, canvas_step); B = max(len(images),
    batch_size), the rows past the images all 127 (a fixed batch shape for the last batch)."""
    side = canvas_side([max(im.shape[:2]) for im in images], infer_size, canvas_step)
    batch = np.full((max(len(images), batch_size), 3, side, side), PAD_VALUE, np.float32)
    for j, image in enumerate(images):
        batch[j, :, :image.shape[0], :image.shape[1]] = image.transpose(2, 0, 1)
    return batch


def _resize(prob: mx.nd.NDArray, height: int, width: int) -> mx.nd.NDArray:
    """(1, K, h, w) -> (1, K, height, width), bilinear with half-pixel centres (as cv2)."""
    if prob.shape[2:] == (height, width):
        return prob
    return mx.nd.contrib.BilinearResize2D(prob, height=height, width=width, align_corners=False)


def upsample_scores(prob: mx.nd.NDArray, side: int, stride: int = OUTPUT_STRIDE
                    ) -> mx.nd.NDArray:
    """(N, K, h, w) score maps of a side x side input -> (N, K, side, side): cell i lands on
    input pixel stride i, the centre of its receptive field (as `nearest_label` reads the
    labels; DeepLab's bilinear upsampling of its stride-8 maps, corner-aligned on
    stride (h - 1) + 1 pixels). The last < stride rows and columns repeat the edge."""
    h, w = prob.shape[2:]
    up = mx.nd.contrib.BilinearResize2D(prob, height=stride * (h - 1) + 1,
                                        width=stride * (w - 1) + 1, align_corners=True)
    extra_h, extra_w = side - up.shape[2], side - up.shape[3]
    if extra_h or extra_w:
        up = mx.nd.pad(up, mode="edge", pad_width=(0, 0, 0, 0, 0, extra_h, 0, extra_w))
    return up


def queue_probabilities(net: mx.gluon.Block, images: Sequence[np.ndarray],
                        contexts: Sequence[mx.Context], infer_size: int = INFER_SIZE,
                        scales: Sequence[float] = (1.0,), flip: bool = False,
                        canvas_step: int = 0, batch_size: int = 0) -> List[mx.nd.NDArray]:
    """Queue on the devices the probabilities averaged over scales and flips (module doc).

    Args:
        net: forward(data (N, 3, P, P) RGB 0..255) -> logits (N, K, h, w).
        images: (H, W, 3) uint8 RGB images of any sizes.
        contexts: devices; the batch is split over them.
        canvas_step: see `canvas_side` (0: P = max(infer_size, sides), DeepLab's).
        batch_size: the batch is filled up to this many canvases with blank ones, so that a
            short last batch has the shape of the others (0: as many as `images`).
    Returns:
        [(K, H, W) float32 NDArray on its device], in the order of `images`; nothing waits
        for the devices (MXNet runs the work asynchronously until a host copy).
    """
    contexts = list(contexts)
    count = max(len(images), batch_size)
    shards = [s for s in np.array_split(np.arange(count), len(contexts)) if s.size]
    total: List[Optional[mx.nd.NDArray]] = [None] * len(images)
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    for scale, flipped in views:
        inputs = [scaled_image(im, scale, flipped) for im in images]
        batch = padded_batch(inputs, infer_size, canvas_step, batch_size)
        side = batch.shape[2]
        for ctx, shard in zip(contexts, shards):
            prob = mx.nd.softmax(net(mx.nd.array(batch[shard], ctx=ctx)), axis=1)
            prob = upsample_scores(prob, side)
            for k, j in enumerate(shard[shard < len(images)]):
                (h, w), (height, width) = inputs[j].shape[:2], images[j].shape[:2]
                view = _resize(prob[k:k + 1, :, :h, :w], height, width)
                view = view.flip(axis=3) if flipped else view
                total[j] = view if total[j] is None else total[j] + view
    return [t[0] / len(views) for t in total]


def predict_probabilities(net: mx.gluon.Block, images: Sequence[np.ndarray],
                          contexts: Sequence[mx.Context], infer_size: int = INFER_SIZE,
                          scales: Sequence[float] = (1.0,), flip: bool = False,
                          canvas_step: int = 0, batch_size: int = 0) -> List[np.ndarray]:
    """[(K, H, W) float32] host copies of `queue_probabilities` (same arguments)."""
    return [p.asnumpy() for p in queue_probabilities(net, images, contexts, infer_size, scales,
                                                     flip, canvas_step, batch_size)]


def predict_labels(image_rgb: np.ndarray, prob: np.ndarray, crf: bool = False) -> np.ndarray:
    """(H, W) uint8 class ids: argmax of (K, H, W) `prob`, after a dense CRF with `crf`."""
    if crf:
        prob = dense_crf(image_rgb, prob, DEEPLAB_CRF)
    return prob.argmax(axis=0).astype(np.uint8)


def write_label_map(path: str, labels: np.ndarray) -> None:
    """Write (H, W) uint8 ids as a single-channel 8-bit PNG (what `cv2.imread(p, 0)` reads)."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(tmp, np.ascontiguousarray(labels, np.uint8)):
            raise ValueError(f"{path}: OpenCV could not write the label map")


def _write_prediction(out_dir: str, name: str, image: np.ndarray, prob: np.ndarray, crf: bool,
                      classes: Sequence[str], crf_pool: Optional[Executor] = None) -> None:
    """Labels of one image (after the CRF with `crf`, in `crf_pool` if given) ->
    pred/<name>.png and overlay/<name>.jpg."""
    labels = crf_pool.submit(predict_labels, image, prob, True).result() \
        if crf and crf_pool is not None else predict_labels(image, prob, crf)
    write_label_map(os.path.join(out_dir, "pred", name + ".png"), labels)
    write_image(os.path.join(out_dir, "overlay", name + ".jpg"),
                overlay(image, labels, classes=classes))


@dataclass(frozen=True)
class SegmentSettings:
    """DeepLab's inference (module doc): the `scales` (positive) and `flip` averaged, the dense
    CRF with `crf` (icd.crf.DEEPLAB_CRF), the inference size, `batch_size` canvases per forward
    and `canvas_step` (`canvas_side`; 0: DeepLab's padding)."""
    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: bool = False
    infer_size: int = INFER_SIZE
    batch_size: int = 4
    canvas_step: int = 0

    def __post_init__(self):
        scales = tuple(float(s) for s in self.scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {scales}")
        object.__setattr__(self, "scales", scales)

    @classmethod
    def of(cls, cfg: Config, canvas_step: int = 0) -> "SegmentSettings":
        """The settings of a Config (its scales, flip, crf, infer_size, infer_batch_size)."""
        return cls(cfg.scales, cfg.flip, cfg.crf, cfg.infer_size, cfg.infer_batch_size,
                   canvas_step)


def segment(net: mx.gluon.Block, data: DataPaths, out_dir: str, contexts: Sequence[mx.Context],
            settings: SegmentSettings = SegmentSettings(), overwrite: bool = False,
            shard: Tuple[int, int] = (0, 1),
            host_workers: int = min(4, os.cpu_count() or 1)) -> List[str]:
    """Predict every image `<image_root>/<name>.jpg` of `data.data_list` with `settings` (the
    module doc; `data.annotation_root` is not read).

    Writes `<out_dir>/pred/<name>.png` (ids) and `<out_dir>/overlay/<name>.jpg` (colours of the
    class list `data.classes`, `icd.data.classes.class_palette`), each atomically. Images whose
    prediction exists are skipped unless `overwrite` (resumable). Every batch is fed as
    `settings.batch_size` canvases of side `canvas_side(..., settings.canvas_step)` (with
    `canvas_step` CANVAS_STEP the network meets a few input shapes; 0: DeepLab's padding).
    While the devices work, two threads read images and `host_workers` threads write the
    outputs, with as many processes for the CRF (0: the CRF and the writes in one thread;
    module doc). Returns the names of the list (of shard (I, N) of it:
    icd.devices.shard_names).
    """
    data = replace(data, classes=classes_of_data(data.classes, data.image_root))
    names = shard_names(read_list(data.data_list), shard)
    todo = [n for n in names
            if overwrite or not os.path.isfile(os.path.join(out_dir, "pred", n + ".png"))]
    size = settings.batch_size
    batches = [todo[start:start + size] for start in range(0, len(todo), size)]
    _predict(net, batches, data, out_dir, contexts, settings, host_workers)
    return names


def _predict(net: mx.gluon.Block, batches: Sequence[Sequence[str]], data: DataPaths,
             out_dir: str, contexts: Sequence[mx.Context], settings: SegmentSettings,
             host_workers: int) -> None:
    """`segment`'s pipelined loop over the `batches` of names (module doc)."""
    workers = max(host_workers, 1)
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(ThreadPoolExecutor(2, thread_name_prefix="segment-read"))
        writer = stack.enter_context(ThreadPoolExecutor(workers,
                                                        thread_name_prefix="segment-write"))
        # pydensecrf holds the GIL: the CRF runs in processes (spawned: MXNet's engine threads
        # do not survive a fork)
        crf_pool = stack.enter_context(ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))) \
            if settings.crf and host_workers > 0 else None

        def read(t: int) -> List[Future]:
            return [reader.submit(read_image, os.path.join(data.image_root, n + ".jpg"))
                    for n in batches[t]] if t < len(batches) else []

        def queue(reads: List[Future]):
            images = [r.result() for r in reads]
            return images, queue_probabilities(net, images, contexts, settings.infer_size,
                                               settings.scales, settings.flip,
                                               settings.canvas_step, settings.batch_size)

        writes: Deque[Future] = collections.deque()
        reads = read(0)
        queued = queue(reads) if batches else None
        for t in tqdm(range(len(batches)), desc=f"segment -> {out_dir}", unit="batch",
                      disable=None):
            images, probs = queued
            reads = read(t + 1)
            queued = queue(reads) if t + 1 < len(batches) else None   # before t's host copy
            for name, image, prob in zip(batches[t], images, probs):
                writes.append(writer.submit(_write_prediction, out_dir, name, image,
                                            prob.asnumpy(), settings.crf, data.classes,
                                            crf_pool))
            while len(writes) > 2 * settings.batch_size:   # bounded host memory; errors here
                writes.popleft().result()
        for write in writes:
            write.result()


def infer_segmentation(cfg: Config, params: str, out_dir: str, contexts: Sequence[mx.Context],
                       workers: int, overwrite: bool = True, shard: Tuple[int, int] = (0, 1),
                       canvas_step: int = 0,
                       record: Optional[Callable[[], ContextManager]] = None) -> List[str]:
    """The DeepLab inference of icd-infer-seg and icd-run: the network of `cfg` from checkpoint
    `params` on `contexts` (icd.infer.inference_network), predicting `cfg.data_list` into
    `out_dir` with `segment` (cfg's scales, flip, CRF, inference size and batch,
    `SegmentSettings.of`; `workers` writer threads and CRF processes). With `canvas_step` 0
    every image size is an input shape of its own: cuDNN autotune is turned off for the process
    (AUTOTUNE=0) unless the user set it. `record`: the context of the writes (icd-infer-seg's
    provenance record, icd.provenance.producing), entered once the checkpoint is loaded.
    Returns the names of the list."""
    if canvas_step == 0:
        os.environ.setdefault(AUTOTUNE, "0")
    net = inference_network(cfg, params, contexts)
    with record() if record else contextlib.nullcontext():
        return segment(net, DataPaths.of(cfg), out_dir, contexts,
                       SegmentSettings.of(cfg, canvas_step), overwrite=overwrite, shard=shard,
                       host_workers=workers)


def backbone_of(model: str) -> str:
    """The paper's table a model belongs to: "VGG16" (Table 7) or "ResNet-101" (Table 8)."""
    return "ResNet-101" if model.startswith("resnet101") else "VGG16"


def markdown_table(result: Mapping[str, object], model: str, supervision: str = "I.",
                   label: str = "this run") -> str:
    """Markdown laid out like the paper's Tables 7-8 (mIoU %, VOC 2012 val/test), the paper's
    rows of the model's backbone first, then this run's val mIoU and its per-class IoU.

    result: `evaluate_seeds`'s {"miou", "iou": {class: IoU}, "num_images"} (fractions); the
    per-class columns are its classes (background and the dataset's list).
    """
    backbone = backbone_of(model)
    lines = [f"# DeepLab on the seeds ({PAPER_TABLES[backbone]} layout, {backbone})", "",
             "| Method | Supervision | val | test |", "|---|---|---|---|"]
    lines += [f"| Ours (paper) | {sup} | {val:.1f} | {test:.1f} |"
              for sup, (val, test) in PAPER_RESULTS[backbone].items()]
    lines += [f"| {label}: {model}, {result['num_images']} images | {supervision} | "
              f"{100 * result['miou']:.1f} | – |", "", "## Per-class IoU (%)", "",
              "| " + " | ".join(result["iou"]) + " |", "|---" * len(result["iou"]) + "|",
              "| " + " | ".join(f"{100 * v:.1f}" for v in result["iou"].values()) + " |", ""]
    return "\n".join(lines)


def evaluate_predictions(out_dir: str, gt_root: str, data_list: str, model: str,
                         supervision: str = "I.", workers: int = 1,
                         classes: Sequence[str] = VOC_CLASSES) -> Dict[str, object]:
    """mIoU of `<out_dir>/pred` against `<gt_root>` over the C + 1 labels of `classes` with the
    release's confusion-matrix rule (`icd.evaluate.evaluate_seeds`); writes `<out_dir>/eval.json`
    (fractions) and `eval.md`."""
    result = evaluate_seeds(os.path.join(out_dir, "pred"), gt_root, read_list(data_list),
                            workers, classes)
    report = {"model": model, "supervision": supervision,
              "data_list": os.path.abspath(data_list), **result}
    write_json(os.path.join(out_dir, "eval.json"), report)
    with atomic_path(os.path.join(out_dir, "eval.md")) as tmp, \
            open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown_table(result, model, supervision))
    return report


def segment_settings(cfg: Config, params: str) -> Dict[str, object]:
    """What the provenance record of icd-infer-seg's `pred/` and `overlay/` names and compares:
    the model, the checkpoint `params` (path, size, mtime), the inference settings (scales,
    flip, CRF, size), the class list and the image root; not the list, so that several lists
    may be predicted into one folder."""
    return {"model": cfg.model, "model_options": model_options(cfg.model, cfg),
            "checkpoint": file_identity(params), "scales": list(cfg.scales), "flip": cfg.flip,
            "crf": cfg.crf, "infer_size": cfg.infer_size, "classes": list(cfg.class_names),
            "image_root": os.path.abspath(cfg.image_root), "amp": cfg.amp}
