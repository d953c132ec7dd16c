r"""Check our Gluon ICDNet against a parity bundle recorded from the original release.

Example:
  icd-parity BUNDLE_DIR --ctx cpu(0)
Prints one line per tensor, then `parity: <n> tensors, worst <err> at <name>: PASS|FAIL`.
Exit status: 0 PASS, 1 FAIL or an unreadable bundle, 2 bad arguments.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..devices import parse_context
from ..parity import check_bundle, summary
from .runner import EXIT_ERROR, Parser, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-parity")
    parser.add_argument("bundle", help="bundle folder (meta.json, params.params, *.npz)")
    parser.add_argument("--ctx", default="cpu(0)", help="device, e.g. cpu(0) or gpu(1)")
    return parser


def _parity(args: argparse.Namespace) -> int:
    errors = check_bundle(args.bundle, [parse_context(args.ctx)])
    for e in errors:
        print(f"{e.name:<60s} {e.error:.3e} (tol {e.tolerance:.0e}) {'ok' if e.ok else 'FAIL'}")
    line = summary(errors)
    print(line)
    return 0 if line.endswith("PASS") else EXIT_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _parity, argv)
