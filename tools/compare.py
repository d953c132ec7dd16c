#!/usr/bin/env python
"""`icd-compare` from a checkout: see icd/commands/compare.py or `python tools/compare.py --help`."""
import sys

from icd.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
