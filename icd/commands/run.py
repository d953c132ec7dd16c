r"""Run the paper's whole pipeline from one config: superpixels -> ICD and the CAM baseline ->
score maps -> seeds (+ CRF) -> seed mIoU -> DeepLab on the seeds -> the paper's tables.

Examples:
  icd-run --config voc_vgg16 --out runs/voc --gpus 0,1           the paper, every step
  icd-run --config voc_vgg16 --out runs/voc --steps seeds evaluate tables
  icd-run --config voc_vgg16 --out runs/voc --set seeds.rows=[crf] --set train.num_epoch=10
  icd-run --config synthetic_run --out runs/syn --cpus 2 --repeat 3     three training seeds
  icd-launch -n 2 -H hosts -- icd-run --config voc_vgg16 --out /shared/voc --steps train \
      --gpus 0 --kvstore dist_device_sync                            training on two machines
  icd-run ... --steps seeds --shard 0/4          one of 4 machines making seeds (shared --out)
Rerunning the same command continues: finished steps are skipped, an interrupted training
resumes from its last complete checkpoint, a step whose settings or inputs changed reruns with
everything after it; a rerun removes only the files a step wrote (it logs those it kept).
The whole configuration is checked before the first step; one icd-run at a time per --out.
Steps: superpixels train_icd train_cam (both: train) infer seeds evaluate segment tables
compare. The paper's tables go to <out>/tables/ (<out>/seed<k>/tables/ per
seed with --repeat).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..constants import KVSTORES, PRECISIONS
from ..pipeline.paper import run_paper
from ..pipeline.sections import parse_sets
from ..pipeline.settings import PaperSettings
from .options import add_shard_argument
from .runner import Parser, non_negative_int, positive_int, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-run")
    parser.add_argument("--config", required=True, metavar="YAML",
                        help="training YAML with a pipeline: section (a bare name finds the "
                             "shipped config: voc_vgg16, coco_vgg16, synthetic_run) (required)")
    parser.add_argument("--out", required=True, help="run folder (required)")
    parser.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                        help="steps to run in pipeline order (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        metavar="STAGE.KEY=VALUE",
                        help="override a setting: train.<field> (ICD and the baseline), "
                             "icd.<field>, cam.<field>, seeds.rows=[crf], evaluate.list=FILE, "
                             "segment.config=FILE, run.gt_root=DIR ... (repeatable)")
    parser.add_argument("--repeat", type=positive_int, default=None, metavar="N",
                        help="train N training seeds (the config's seed, +1, ...); the steps "
                             "after training run per seed (default: the config's, 1)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1 (default: the config's)")
    devices.add_argument("--cpus", type=positive_int, default=None,
                         help="CPU contexts (default: the config's)")
    parser.add_argument("--kvstore", choices=KVSTORES, default=None,
                        help="training's gradient aggregation; dist_* under icd-launch "
                             "(default: the config's)")
    parser.add_argument("--amp", choices=PRECISIONS, default=None,
                        help="mixed precision of every training and inference step: bf16 on "
                             "CPUs with avx512_bf16 or AMX, fp16 on GPUs (default: the "
                             "config's amp, off)")
    parser.add_argument("--loader-workers", type=non_negative_int, default=None,
                        help="data-loader processes (default: the config's num_workers)")
    parser.add_argument("--workers", type=positive_int, default=min(32, os.cpu_count() or 1),
                        help="processes for superpixels, seeds and evaluation "
                             "(default: the number of CPUs, at most 32)")
    add_shard_argument(parser, "per-image steps only (superpixels, infer, seeds): shard I of N "
                               "of every list, N machines into one shared --out (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun the selected steps from scratch even if done")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                        help="a progress line every SECONDS while a step runs (0: only "
                             "between steps)")
    return parser


def _run(args: argparse.Namespace) -> int:
    devices = dict(gpus=args.gpus, kvstore=args.kvstore, num_workers=args.loader_workers,
                   amp=args.amp)
    if args.gpus:
        devices["cpus"] = 0
    elif args.cpus:
        devices.update(cpus=args.cpus, gpus="")
    settings = PaperSettings(args.config, args.out, sets=parse_sets(args.sets), devices=devices,
                             repeat=args.repeat, workers=args.workers, shard=args.shard)
    summary = run_paper(settings, args.steps, args.overwrite, args.progress_every)
    for name, result in summary.items():
        if "tables" in result or "compare" in result:
            print(f"{name}: {result.get('tables') or result.get('compare')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _run, argv)
