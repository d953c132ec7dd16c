#!/usr/bin/env python
"""`icd-eval` from a checkout: see icd/commands/evaluate.py or `python tools/eval_seeds.py --help`."""
import sys

from icd.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
