#!/usr/bin/env python
"""Benchmark training steps (ICD, CAM-only, release graph, DeepLab) and inference; JSON output.

Example: python tools/bench_step.py --out bench_step.json            (full width, 321, batch 2)
         python tools/bench_step.py --ctx gpu(0)
A benchmark, not a test: quote the ratios, which hold across machines better than the seconds.
"""
import argparse
import logging

from icd.bench import run
from icd.cli import parse_context
from icd.io import write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", default="cpu(0)")
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--infer-size", type=int, default=513)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-network children")
    parser.add_argument("--out", default="bench_step.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = run(parse_context(args.ctx), args.ctx, args.size, args.infer_size, args.batch,
                 args.width, repeats=args.repeats, memory=not args.no_memory)
    for name, figures in report["networks"].items():
        print(f"{name:>10s}: {figures['step_seconds_median']:.3f} s/step "
              f"{figures['images_per_s']:.2f} img/s {figures['macs_per_image'] / 1e9:.1f} GMAC/img"
              + (f" peak {figures['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in figures else ""))
    print(f"ICD/CAM time {report['icd_over_cam_time']:.3f} vs MACs "
          f"{report['icd_over_cam_macs']:.3f}; ours/reference time "
          f"{report['ours_over_reference_time']:.3f}; custom operators and losses: "
          f"{report['icd_custom_and_loss_share']:.3f} of the ICD step (reference "
          f"{report['reference_custom_and_loss_share']:.3f})")
    print(f"DeepLab-LargeFOV/CAM time {report['deeplab_over_cam_time']:.3f} vs MACs "
          f"{report['deeplab_over_cam_macs']:.3f}")
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
