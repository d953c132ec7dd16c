#!/usr/bin/env python
"""The end-to-end demo on the built-in synthetic dataset (icd.demo): see --help."""
import sys

from icd.demo import main

if __name__ == "__main__":
    sys.exit(main())
