r"""Check our Gluon ICDNet against a parity bundle recorded from the original release.

Example:
  icd-parity BUNDLE_DIR [--ctx cpu(0)[,cpu(1)]] [--free-running] [--sensitivity]
Teacher-forced: every step starts from the reference's state before it. Prints one line per
tensor, then `parity: <n> tensors, worst <err> at <name>: PASS|FAIL`. --free-running replays all
steps from the start instead and reports, per tensor, how far a 1e-7 perturbation of the start
moves our own run; --sensitivity does the same for each teacher-forced step. Tensors the
perturbation moves beyond their tolerance are not judged.
Exit status: 0 PASS, 1 FAIL or an unreadable bundle (named), 2 bad arguments.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..devices import parse_context
from ..parity import check_bundle, report
from .runner import EXIT_ERROR, Parser, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-parity")
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
    return parser


def _parity(args: argparse.Namespace) -> int:
    contexts = [parse_context(c) for c in args.ctx.split(",")] if args.ctx else None
    errors = check_bundle(args.bundle, contexts, free_running=args.free_running,
                          sensitivity=args.sensitivity or args.free_running)
    lines = report(errors)
    print("\n".join(lines))
    return 0 if lines[-1].endswith("PASS") else EXIT_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _parity, argv)
