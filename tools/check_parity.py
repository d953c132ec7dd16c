#!/usr/bin/env python
"""Check our Gluon ICDNet against a parity bundle recorded from the original release.

Usage: python tools/check_parity.py BUNDLE_DIR [--ctx cpu(0)]
Prints one line per tensor, then `parity: <n> tensors, worst <err> at <name>: PASS|FAIL`;
exits 1 on FAIL.
"""
import argparse
import sys

from icd.devices import parse_context
from icd.parity import check_bundle, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle folder (meta.json, params.params, *.npz)")
    parser.add_argument("--ctx", default="cpu(0)", help="device, e.g. cpu(0) or gpu(1)")
    args = parser.parse_args(argv)
    errors = check_bundle(args.bundle, [parse_context(args.ctx)])
    for e in errors:
        print(f"{e.name:<60s} {e.error:.3e} (tol {e.tolerance:.0e}) {'ok' if e.ok else 'FAIL'}")
    line = summary(errors)
    print(line)
    return 0 if line.endswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
