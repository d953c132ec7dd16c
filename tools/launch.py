#!/usr/bin/env python
"""`icd-launch` from a checkout: see icd/commands/launch.py or `python tools/launch.py --help`."""
import sys

from icd.commands.launch import main

if __name__ == "__main__":
    sys.exit(main())
