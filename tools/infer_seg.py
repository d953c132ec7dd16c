#!/usr/bin/env python
"""Predict segmentation masks with a trained DeepLab checkpoint, optionally evaluate them.

    python tools/infer_seg.py --config experiments/deeplab_largefov_vgg16.yaml --gpus 0 \
        --data-list data/VOC2012/ImageSets/Segmentation/val.txt \
        --scales 0.75 1 1.25 --flip --crf --gt-root data/VOC2012/SegmentationClassAug

The checkpoint is --params, else <snapshot>/<model>-<epoch>.params (epoch default num_epoch-1).
Writes <out>/pred/<name>.png (class ids, cv2.imread(p, 0) reads them), <out>/overlay/<name>.jpg
and, with --gt-root, <out>/eval.json and eval.md (mIoU as the paper's Tables 7-8).
"""
import argparse
import logging
import os
import sys

from mxnet.base import MXNetError

from icd.checkpoint import load_checkpoint
from icd.cli import parse_devices
from icd.config import add_arguments, load_config
from icd.distributed import parse_shard
from icd.model import build_model
from icd.segment import MULTI_SCALES, SegmentOptions, evaluate_predictions, segment
from icd.train import checkpoint_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--epoch", type=int,
                        help="epoch of <snapshot>/<model>-<epoch>.params (default: num_epoch-1)")
    parser.add_argument("--params", help="checkpoint file (overrides --epoch)")
    parser.add_argument("--out", help="output folder (default <snapshot>/results/segmentation)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0],
                        help=f"inference scales (default 1; multi-scale e.g. "
                             f"{' '.join(map(str, MULTI_SCALES))})")
    parser.add_argument("--flip", action="store_true",
                        help="also average the mirrored image (default off)")
    parser.add_argument("--crf", action="store_true",
                        help="dense CRF with DeepLab-LargeFOV's parameters (default off)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep predictions already in <out>/pred (default: redo them)")
    parser.add_argument("--gt-root", help="ground-truth masks <name>.png: evaluate (default: "
                                          "no evaluation)")
    parser.add_argument("--supervision", default="I.", choices=("I.", "I.+S."),
                        help="label of this run in the table: I. (CRF seeds) or I.+S. "
                             "(saliency seeds) (default I.)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: shard I of N of the list (then no evaluation)")
    parser.add_argument("--workers", type=int, default=1,
                        help="evaluation processes (default 1)")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    epoch, params, out = args.pop("epoch"), args.pop("params"), args.pop("out")
    options = SegmentOptions(scales=args.pop("scales"), flip=args.pop("flip"),
                             crf=args.pop("crf"))
    skip, gt_root = args.pop("skip_existing"), args.pop("gt_root")
    supervision, workers, shard = args.pop("supervision"), args.pop("workers"), args.pop("shard")
    try:
        cfg = load_config(args.pop("config"), **args)
        params = params or checkpoint_path(cfg, cfg.num_epoch - 1 if epoch is None else epoch)
        out = out or os.path.join(cfg.snapshot, "results", "segmentation")
        contexts = parse_devices(cfg.gpus, cfg.cpus)
        net = build_model(cfg.model, **cfg.model_options)
        load_checkpoint(net, params, contexts)
        net.hybridize(static_alloc=True)
        names = segment(net, cfg.image_root, cfg.data_list, out, contexts, options,
                        cfg.infer_size, cfg.infer_batch_size, overwrite=not skip, shard=shard)
        logging.info("wrote predictions of %d images to %s", len(names), out)
        if gt_root and shard[1] == 1:   # a shard cannot be evaluated alone
            report = evaluate_predictions(out, gt_root, cfg.data_list, cfg.model, supervision,
                                          workers)
            logging.info("mIoU %.1f%% (%s)", 100 * report["miou"], os.path.join(out, "eval.md"))
    except (OSError, ValueError, MXNetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
