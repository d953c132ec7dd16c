#!/usr/bin/env python
"""`icd-train-seg` from a checkout: see icd/commands/train_seg.py (or --help)."""
import sys

from icd.commands.train_seg import main

if __name__ == "__main__":
    sys.exit(main())
