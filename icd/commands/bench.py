r"""Benchmark a training step (ICD, CAM-only, the release's graph) and inference; JSON output.

Examples:
  icd-bench --out bench_step.json            (full width, 321 crops, batch 2)
  icd-bench --ctx gpu(0)
  icd-bench --amp bf16                       (adds the ICD step and inference in bfloat16)
  icd-bench --memory-only                    (each shipped config's estimated memory per device)
A benchmark, not a test: quote the ratios, which hold across machines better than the seconds.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..amp import PRECISIONS, supported_precisions
from ..bench import memory_report, run as bench_run
from ..devices import parse_context
from ..io import write_json
from .runner import Parser, non_negative_int, positive_float, positive_int, run

NUM_CLASSES = 20   # the bench's class count (PASCAL VOC's)


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-bench")
    parser.add_argument("--ctx", default="cpu(0)", help="device, e.g. cpu(0) or gpu(1)")
    parser.add_argument("--size", type=positive_int, default=321, help="training crop side")
    parser.add_argument("--infer-size", type=positive_int, default=513,
                        help="inference input side")
    parser.add_argument("--batch", type=positive_int, default=2, help="images per step")
    parser.add_argument("--width", type=positive_float, default=1.0,
                        help="channel multiplier of VGG16")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed steps")
    parser.add_argument("--loader-workers", type=non_negative_int, default=None,
                        help="training-loader processes of the loader throughput (default: one "
                             "per core)")
    parser.add_argument("--loader-size", type=positive_int, default=400,
                        help="side of the synthetic JPEGs the loader decodes (VOC: ~500x375)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-network child processes that measure peak memory")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory per image of each shipped config's model (a "
                             "training step of one and of two images, in child processes) "
                             "and each config's estimate per device")
    parser.add_argument("--amp", choices=PRECISIONS, default="off",
                        help="also time the ICD training step and inference in this precision "
                             "(icd.amp); which ones the device supports is printed first")
    parser.add_argument("--out", default="bench_step.json", help="JSON report")
    return parser


def _bench(args: argparse.Namespace) -> int:
    ctx = parse_context(args.ctx)
    for precision, reason in supported_precisions([ctx]).items():
        print(f"--amp {precision}: " + (f"not supported: {reason}" if reason else
                                        f"supported on {args.ctx}"))
    reason = supported_precisions([ctx])[args.amp]
    if reason:   # before any timing
        raise ValueError(f"--amp {args.amp}: {reason}")
    if args.memory_only:
        report = memory_report(args.ctx, args.size, args.width, NUM_CLASSES)
        _print_memory(report)
        write_json(args.out, report)
        return 0
    report = bench_run(ctx, args.ctx, args.size, args.infer_size, args.batch,
                       args.width, repeats=args.repeats, memory=not args.no_memory,
                       loader_workers=args.loader_workers, loader_size=args.loader_size,
                       precision=args.amp)
    for name, figures in report["networks"].items():
        print(f"{name:>10s}: {figures['step_seconds_median']:.3f} s/step "
              f"{figures['images_per_s']:.2f} img/s {figures['macs_per_image'] / 1e9:.1f} GMAC/img"
              + (f" peak {figures['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in figures else "")
              + (f" device {figures['device_used_mb']:.0f} MiB"
                 if "device_used_mb" in figures else ""))
    print(f"ICD/CAM time {report['icd_over_cam_time']:.3f} vs MACs "
          f"{report['icd_over_cam_macs']:.3f}; ours/reference time "
          f"{report['ours_over_reference_time']:.3f}; custom operators and losses: "
          f"{report['icd_custom_and_loss_share']:.3f} of the ICD step (reference "
          f"{report['reference_custom_and_loss_share']:.3f})")
    print(f"DeepLab-LargeFOV/CAM time {report['deeplab_over_cam_time']:.3f} vs MACs "
          f"{report['deeplab_over_cam_macs']:.3f}")
    for name in ("icd", "infer") if args.amp != "off" else ():
        print(f"{name} float32/{args.amp} time "
              f"{report[f'{name}_float32_over_{args.amp}_time']:.2f}x")
    loader = report["loader"]
    print(f"loader: {loader['images_per_s']:.1f} img/s with {loader['workers']} workers "
          f"({loader['bytes_per_batch'] / 2 ** 20:.2f} MiB per batch), "
          f"{report['loader_over_icd_step']:.1f}x the ICD step's images/s")
    if "memory" in report:
        _print_memory(report["memory"])
    write_json(args.out, report)
    return 0


def _print_memory(report) -> None:
    for name, cfg in report["configs"].items():
        per_device = cfg["per_device_mb"]
        if per_device["1"] is not None:
            print(f"{name}: {cfg['model']} batch {cfg['batch_size']} at {cfg['image_size']} px: "
                  f"about {per_device['1']:.0f} MiB on 1 device, {per_device['2']:.0f} MiB per "
                  f"device on 2")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _bench, argv)
