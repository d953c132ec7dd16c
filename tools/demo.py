#!/usr/bin/env python
"""The end-to-end demo on the built-in synthetic dataset (icd.demo): generate the data, compute
superpixels, pre-train the stand-in initialisation, train the CAM-only baseline and ICD, infer,
make seeds, evaluate, and write <out>/report/report.md (Tables 1-3 for CAM vs ICD, claims,
figures).

    python tools/demo.py                        # everything, about 10 minutes on 2 CPU cores
    python tools/demo.py --quick --out /tmp/q   # the reduced run of the test (numbers meaningless)
    python tools/demo.py --steps seeds evaluate report   # a subset; finished steps are skipped

Steps already done with the same settings are skipped (resumable) unless --overwrite.
"""
import argparse
import logging
import os
import sys

from icd.demo import QUICK, STEPS, DemoSettings, quick_settings, run


def main(argv=None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", default=defaults.out, help="output folder (default %(default)s)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), metavar="STEP",
                        help=f"steps to run, any of: {' '.join(STEPS)} (default: all)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun the selected steps from scratch even if done")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced sizes for a smoke test: {QUICK}")
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument("--cpus", type=int, default=None,
                         help=f"CPU contexts (default {defaults.cpus}: the multi-device path)")
    devices.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes for superpixels, seeds, evaluation "
                             f"(default {defaults.workers})")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="training data-loader processes (default: the YAML's num_workers)")
    sizes = parser.add_argument_group("sizes (override the defaults / --quick)")
    for flag, kind in (("num-train", int), ("num-val", int), ("size", int), ("data-seed", int),
                       ("width", float), ("crop", int), ("batch-size", int),
                       ("learning-rate", float), ("epochs", int), ("pretrain-epochs", int)):
        sizes.add_argument("--" + flag, type=kind, default=None)
    configs = parser.add_argument_group("training configs")
    configs.add_argument("--icd-config", default=None, help=f"default {defaults.icd_config}")
    configs.add_argument("--cam-config", default=None, help=f"default {defaults.cam_config}")
    configs.add_argument("--pretrain-config", default=None,
                         help=f"default {defaults.pretrain_config}; 'none': no pre-training "
                              "(CAM and ICD from a random He init)")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quick = args.pop("quick")
    if args["gpus"]:
        args["cpus"] = 0
    values = {k: v for k, v in args.items() if v is not None}
    settings = quick_settings(**values) if quick else DemoSettings(**values)
    summary = run(settings)
    report = summary.get("report", {}).get("report")
    if report:
        print(f"report: {os.path.abspath(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
