#!/usr/bin/env python
"""`icd-infer-seg` from a checkout: see icd/commands/infer_seg.py (or --help)."""
import sys

from icd.commands.infer_seg import main

if __name__ == "__main__":
    sys.exit(main())
