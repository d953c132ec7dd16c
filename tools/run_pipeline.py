#!/usr/bin/env python
"""`icd-run` from a checkout: see icd/commands/run.py or `python tools/run_pipeline.py --help`."""
import sys

from icd.commands.run import main

if __name__ == "__main__":
    sys.exit(main())
