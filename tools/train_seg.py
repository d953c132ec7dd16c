#!/usr/bin/env python
"""Train DeepLab on the seeds (or on ground-truth masks: the fully-supervised upper bound).

    python tools/train_seg.py --config experiments/deeplab_largefov_vgg16.yaml \
        --seeds snapshot/icd/results/seeds/crf --gpus 0,1

--seeds is the folder of label maps <name>.png (ids 0..20, 255 ignored) for every image of
--data-list: the seeds `results/seeds/crf` or `seeds/sal`, or `SegmentationClassAug`. A seeds
folder whose make_seeds run is running or failed is refused. The loop is ICD's (icd/train.py):
checkpoints <snapshot>/<model>-<epoch>.params/.states/.json, <model>-log.json, demo/ pictures
(image | labels | prediction); --begin-epoch K resumes from checkpoint K-1 bit for bit;
--overwrite replaces an earlier run's checkpoints.
"""
import argparse
import logging
import sys

from mxnet.base import MXNetError

from icd.config import add_arguments, load_config
from icd.train import TASKS, SegmentationTask, TrainingDiverged, TrainingInterrupted, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     conflict_handler="resolve")
    add_arguments(parser)
    # Config fields label_root and overwrite under the names of this tool
    parser.add_argument("--seeds", "--label-root", dest="label_root",
                        help="folder of training label maps <name>.png (default: the config's "
                             "label_root)")
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction,
                        help="replace the model's checkpoints and log in --snapshot")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = load_config(args.pop("config"), **args)
        if TASKS.get(cfg.model) is not SegmentationTask:
            raise ValueError(f"{cfg.model} is not a segmentation model (one of "
                             f"{', '.join(m for m, t in TASKS.items() if t is SegmentationTask)})"
                             f"; tools/train_icd.py trains the ICD models")
        train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except (OSError, ValueError, MXNetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
