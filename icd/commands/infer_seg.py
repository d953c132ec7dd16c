r"""Predict segmentation masks with a trained DeepLab checkpoint, optionally evaluate them.

Example:
  icd-infer-seg --config deeplab_largefov_vgg16 --gpus 0 \
      --data-list data/VOC2012/ImageSets/Segmentation/val.txt \
      --scales 0.75 1 1.25 --flip --crf --gt-root data/VOC2012/SegmentationClassAug
The checkpoint is --params, else <snapshot>/<model>-<epoch>.params (epoch default num_epoch-1).
Writes <out>/pred/<name>.png (class ids, cv2.imread(p, 0) reads them), <out>/overlay/<name>.jpg
and, with --gt-root, <out>/eval.json and eval.md (mIoU as the paper's Tables 7-8).
pred/ and overlay/ keep a provenance record (<out>/pred.provenance.json: checkpoint path, size
and mtime, scales, flip, crf, inference size, classes): a run with other settings into the same
--out (with or without --skip-existing) is refused unless --overwrite, which clears them first.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional, Sequence

from ..runs import checkpoint_path
from ..data.classes import dataset_classes
from ..data.voc import read_list
from ..devices import shard_names
from ..model import model_spec
from ..provenance import producing, require_checkpoint_classes, require_outputs_apart
from ..segment import CANVAS_STEP, evaluate_predictions, infer_segmentation, segment_settings
from .options import add_config_arguments, add_shard_argument, config_from, devices_for
from .runner import Parser, non_negative_int, positive_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-infer-seg")
    add_config_arguments(parser, "infer_seg")
    parser.add_argument("--epoch", type=non_negative_int, default=None,
                        help="epoch of <snapshot>/<model>-<epoch>.params (default: num_epoch-1)")
    parser.add_argument("--params", default=None, help="checkpoint file (overrides --epoch)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <snapshot>/results/segmentation)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep predictions already in <out>/pred (default: redo them)")
    parser.add_argument("--gt-root", default=None,
                        help="ground-truth masks <name>.png: evaluate (default: no evaluation)")
    parser.add_argument("--supervision", default="I.", choices=("I.", "I.+S."),
                        help="label of this run in the table: I. (CRF seeds) or I.+S. "
                             "(saliency seeds)")
    parser.add_argument("--workers", type=positive_int, default=min(32, os.cpu_count() or 1),
                        help="CRF and evaluation processes, output writer threads (default: "
                             "the number of CPUs, at most 32; as icd-run's --workers)")
    parser.add_argument("--canvas-step", type=non_negative_int, default=0,
                        help=f"canvases larger than --infer-size grow in steps of this many "
                             f"pixels (e.g. {CANVAS_STEP}), so that multi-scale and COCO runs "
                             f"meet a few input shapes on GPUs; changes the probabilities "
                             f"slightly (docs/gpus.md). 0 = DeepLab's max(513, "
                             f"sides), exact; cuDNN autotune is then off unless "
                             f"MXNET_CUDNN_AUTOTUNE_DEFAULT is set (default: 0)")
    add_shard_argument(parser)
    return parser


def _infer_seg(args: argparse.Namespace) -> int:
    if args.gt_root and args.shard[1] > 1:
        raise ValueError(f"--gt-root: shard {args.shard[0]}/{args.shard[1]} holds part of the "
                         f"list and cannot be evaluated alone; once every shard is done, run "
                         f"icd-infer-seg --skip-existing --gt-root ... without --shard")
    cfg = config_from(args, data=("image_root",))
    if args.gt_root:
        dataset_classes(cfg.classes, args.gt_root)
    if model_spec(cfg.model).task != "segmentation":
        raise ValueError(f"--model: {cfg.model} is not a segmentation model; icd-infer writes "
                         f"the ICD models' score maps")
    params = args.params or checkpoint_path(
        cfg, cfg.num_epoch - 1 if args.epoch is None else args.epoch)
    out = args.out or os.path.join(cfg.snapshot, "results", "segmentation")
    require_outputs_apart({"--out": out, "--out/pred": os.path.join(out, "pred"),
                           "--out/overlay": os.path.join(out, "overlay")},
                          {"--image-root": cfg.image_root, "--gt-root": args.gt_root})
    contexts = devices_for(cfg, cfg.infer_batch_size, "--infer-batch-size")
    require_checkpoint_classes(params, cfg.class_names)
    folders = [os.path.join(out, "pred"), os.path.join(out, "overlay")]
    names = infer_segmentation(
        cfg, params, out, contexts, args.workers, overwrite=not args.skip_existing,
        shard=args.shard, canvas_step=args.canvas_step, record=lambda: producing(
            folders, "infer-seg", dict(segment_settings(cfg, params),
                                       canvas_step=args.canvas_step),
            cfg.overwrite, args.shard, shard_names(read_list(cfg.data_list), args.shard)))
    logging.info("wrote predictions of %d images to %s", len(names), out)
    if args.gt_root:
        report = evaluate_predictions(out, args.gt_root, cfg.data_list, cfg.model,
                                      args.supervision, args.workers, cfg.class_names)
        logging.info("mIoU %.1f%% (%s)", 100 * report["miou"], os.path.join(out, "eval.md"))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _infer_seg, argv)
