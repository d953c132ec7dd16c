#!/usr/bin/env python
"""Write score maps (results/scores_cam, scores_icd, ...) of a trained checkpoint.

Example: python tools/infer_scores.py --config experiments/voc_vgg16.yaml --gpus 0,1 --epoch 19
By default the checkpoint is <snapshot>/<model>-<epoch>.params and the results go to
<snapshot>/results (the release's layout).
"""
import argparse
import logging
import os
import sys

from icd.cli import parse_devices
from icd.config import add_arguments, load_config
from icd.distributed import parse_shard
from icd.infer import infer
from icd.train import checkpoint_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--epoch", type=int, help="epoch of the checkpoint (default: num_epoch-1)")
    parser.add_argument("--params", help="checkpoint file (overrides --epoch)")
    parser.add_argument("--out", help="results folder (default <snapshot>/results)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: shard I of N of the list")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    epoch, params, out, shard = (args.pop(k) for k in ("epoch", "params", "out", "shard"))
    cfg = load_config(args.pop("config"), **args)
    params = params or checkpoint_path(cfg, cfg.num_epoch - 1 if epoch is None else epoch)
    out = out or os.path.join(cfg.snapshot, "results")
    names = infer(cfg, params, out, parse_devices(cfg.gpus, cfg.cpus), shard)
    logging.info("wrote score maps of %d images to %s", len(names), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
