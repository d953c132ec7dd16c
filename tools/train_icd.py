#!/usr/bin/env python
"""Train ICD (or the CAM-only baseline / an ablation) with the release's flags.

Example (the paper's setting on two GPUs):
  python tools/train_icd.py --config experiments/voc_vgg16.yaml --gpus 0,1
Example (the synthetic demo on two CPU contexts):
  python tools/train_icd.py --config experiments/synthetic_demo.yaml --cpus 2
Flags override the config file; `--begin-epoch K` resumes from checkpoint K-1.
"""
import argparse
import logging
import sys

from icd.config import add_arguments, load_config
from icd.train import TrainingDiverged, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.pop("config"), **args)
    try:
        train(cfg)
    except TrainingDiverged as e:
        logging.error("%s", e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
