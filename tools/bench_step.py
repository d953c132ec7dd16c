#!/usr/bin/env python
"""`icd-bench` from a checkout: see icd/commands/bench.py or `python tools/bench_step.py --help`."""
import sys

from icd.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
