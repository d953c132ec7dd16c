#!/usr/bin/env python
"""`icd-seeds` from a checkout: see icd/commands/seeds.py or `python tools/make_seeds.py --help`."""
import sys

from icd.commands.seeds import main

if __name__ == "__main__":
    sys.exit(main())
