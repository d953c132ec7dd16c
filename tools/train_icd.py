#!/usr/bin/env python
"""`icd-train` from a checkout: see icd/commands/train.py or `python tools/train_icd.py --help`."""
import sys

from icd.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
