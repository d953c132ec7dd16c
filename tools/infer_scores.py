#!/usr/bin/env python
"""`icd-infer` from a checkout: see icd/commands/infer.py or `python tools/infer_scores.py --help`."""
import sys

from icd.commands.infer import main

if __name__ == "__main__":
    sys.exit(main())
