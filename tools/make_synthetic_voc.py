#!/usr/bin/env python
"""`icd-synthetic` from a checkout: see icd/commands/synthetic.py or `python tools/make_synthetic_voc.py --help`."""
import sys

from icd.commands.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
