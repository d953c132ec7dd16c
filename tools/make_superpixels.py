#!/usr/bin/env python
"""`icd-superpixels` from a checkout: see icd/commands/superpixels.py or `python tools/make_superpixels.py --help`."""
import sys

from icd.commands.superpixels import main

if __name__ == "__main__":
    sys.exit(main())
