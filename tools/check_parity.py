#!/usr/bin/env python
"""Check our Gluon ICDNet against a parity bundle recorded from the original release.

Usage: python tools/check_parity.py BUNDLE_DIR [--ctx cpu(0)[,cpu(1)]] [--free-running]
                                    [--sensitivity]
Teacher-forced: every step starts from the reference's state before it. Prints one line per
tensor, then `parity: <n> tensors, worst <err> at <name>: PASS|FAIL`; exits 1 on FAIL, 2 on a
broken bundle. --free-running replays all steps from the start instead and reports, per tensor,
how far a 1e-7 perturbation of the start moves our own run; --sensitivity does the same for
each teacher-forced step. Tensors the perturbation moves beyond their tolerance are not judged.
"""
import argparse
import sys

from icd.cli import parse_context
from icd.parity import check_bundle, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("bundle", help="bundle folder (meta.json, params.params, *.npz)")
    parser.add_argument("--ctx", default=None,
                        help="devices, comma-separated, as many as the bundle was recorded on "
                             "(meta num_devices); default cpu(0) .. cpu(n-1)")
    parser.add_argument("--free-running", action="store_true",
                        help="replay all steps from the start and report the bundle's "
                             "sensitivity beside each error")
    parser.add_argument("--sensitivity", action="store_true",
                        help="teacher-forced: also run every step from its starting state "
                             "perturbed by 1e-7 and report how far that moves each tensor")
    args = parser.parse_args(argv)
    contexts = [parse_context(c) for c in args.ctx.split(",")] if args.ctx else None
    try:
        errors = check_bundle(args.bundle, contexts, free_running=args.free_running,
                              sensitivity=args.sensitivity or args.free_running)
    except (OSError, ValueError) as e:
        print(f"check_parity: {e}", file=sys.stderr)
        return 2
    lines = report(errors)
    print("\n".join(lines))
    return 0 if lines[-1].endswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
