#!/usr/bin/env python
"""`icd-parity` from a checkout: see icd/commands/parity.py or `python tools/check_parity.py --help`."""
import sys

from icd.commands.parity import main

if __name__ == "__main__":
    sys.exit(main())
