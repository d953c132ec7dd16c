#!/usr/bin/env python
"""`icd-demo` from a checkout, the end-to-end demo on the built-in synthetic dataset: see
icd/commands/demo.py or `python tools/demo.py --help`."""
import sys

from icd.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
