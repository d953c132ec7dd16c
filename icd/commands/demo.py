"""The end-to-end demo on the built-in synthetic dataset: one small step per stage (IRN-style).

    data -> superpixels -> pretrain -> train_icd, train_cam -> infer -> seeds -> evaluate
         -> segment -> report

    icd-demo                                  # everything, about 11 minutes on 2 CPU cores
    icd-demo --quick --out /tmp/q             # the reduced run of the test (numbers meaningless)
    icd-demo --steps seeds evaluate report    # a subset; finished steps are skipped
(python tools/demo.py from a checkout is the same command.)

Every step writes named folders under the output folder (default ./demo_output) and a marker
`steps/<step>.json` (icd.pipeline.steps): a finished step with the same settings and inputs is
skipped, an interrupted one resumes (superpixels and seeds skip finished files, training
continues from its last checkpoint), a changed one or any with --overwrite clears its folders and
reruns. The console shows each step's and the whole run's elapsed time and time left.

Folders:
  data/                     synthetic VOC (JPEGImages, Annotations, SegmentationClass, ImageSets,
                            classes.txt: training, seeds, evaluation and report follow it)
  superpixels/              id-encoded PNGs (colour features: no pretrained network exists here)
  snapshot_pretrain/        classification (CAM-only) pre-training: the ImageNet stand-in
  snapshot_cam/             the CAM-only baseline, initialised from snapshot_pretrain
  snapshot_icd/             ICD, initialised from snapshot_pretrain
  results_cam/{train,val}/  scores_cam, seeds/{crf,nocrf}_cam, eval/   (release layout)
  results_icd/{train,val}/  scores_{cam,icd,icd_bu,icd_bu_sp}, seeds/..., eval/
  snapshot_segment_{icd,cam,gt}/  DeepLab-LargeFOV trained on the ICD seeds, the CAM-baseline
                            seeds and the ground truth of the train split (from the stand-in)
  segmentation/{icd,cam,gt}/ its val-split predictions pred/ (index PNGs), overlay/, eval.json
  report/                   report.md, report.json, figures/   (icd.pipeline.report)
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..constants import PRECISIONS
from ..pipeline.demo import QUICK, STEPS, DemoSettings, quick_settings, run as run_demo
from .runner import Parser, non_negative_int, positive_float, positive_int, run

# The size flags (they override the defaults and --quick's): flag -> argparse type
SIZES = {"num-train": positive_int, "num-val": positive_int, "size": positive_int,
         "data-seed": non_negative_int, "width": positive_float, "crop": positive_int,
         "batch-size": positive_int, "learning-rate": positive_float, "epochs": positive_int,
         "pretrain-epochs": positive_int, "segment-epochs": positive_int}


def build_parser() -> Parser:
    defaults = DemoSettings()
    parser = Parser(__doc__, prog="icd-demo")
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                        help=f"steps to run, any of: {' '.join(STEPS)} (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun the selected steps from scratch even if done")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced sizes for a smoke test: {QUICK}")
    parser.add_argument("--repeat", type=positive_int, default=None, metavar="N",
                        help="train CAM, ICD and DeepLab with N training seeds (icd-run's "
                             "--repeat): the Tables 7-8 ranking then resamples the seeds too "
                             f"(default {defaults.repeat})")
    parser.add_argument("--progress-every", type=float, default=None, metavar="SECONDS",
                        help=f"a progress line every SECONDS while a step runs "
                             f"(default {defaults.progress_every:g}; 0: only between steps)")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--cpus", type=positive_int, default=None,
                         help=f"CPU contexts (default {defaults.cpus}: the multi-device path)")
    devices.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help=f"processes for superpixels, seeds, evaluation "
                             f"(default {defaults.workers})")
    parser.add_argument("--amp", choices=PRECISIONS, default=None,
                        help="mixed precision of every training and inference: bf16 on CPUs "
                             "with avx512_bf16 or AMX, fp16 on GPUs (default: off, float32)")
    parser.add_argument("--loader-workers", type=non_negative_int, default=None,
                        help="training data-loader processes (default: the YAML's num_workers)")
    sizes = parser.add_argument_group("sizes (override the defaults / --quick)")
    for flag, kind in SIZES.items():
        sizes.add_argument("--" + flag, type=kind, default=None)
    configs = parser.add_argument_group("training configs")
    configs.add_argument("--icd-config", default=None,
                         help=f"icd-run's config (training YAML with a pipeline: section; "
                              f"default {defaults.icd_config})")
    configs.add_argument("--cam-config", default=None,
                         help="the baseline's YAML (default: the run config's pipeline: cam)")
    configs.add_argument("--segment-config", default=None,
                         help="DeepLab's YAML (default: the run config's segment.config)")
    configs.add_argument("--pretrain-config", default=None,
                         help=f"default {defaults.pretrain_config}; 'none': no pre-training "
                              "(CAM and ICD from a random He init)")
    return parser


def _run(args: argparse.Namespace) -> int:
    """Run the demo with the flags given (the others: DemoSettings' or --quick's), print the
    report's path."""
    values = {k: v for k, v in vars(args).items() if k not in ("quick", "debug")}
    if values["gpus"]:
        values["cpus"] = 0
    values = {k: v for k, v in values.items() if v is not None}
    settings = quick_settings(**values) if args.quick else DemoSettings(**values)
    summary = run_demo(settings)
    report = summary.get("report", {}).get("report")
    if report:
        print(f"report: {os.path.abspath(report)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _run, argv)
