#!/usr/bin/env python
"""`icd-pretrained` from a checkout: see icd/commands/pretrained.py or `python tools/make_pretrained.py --help`."""
import sys

from icd.commands.pretrained import main

if __name__ == "__main__":
    sys.exit(main())
