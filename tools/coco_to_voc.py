#!/usr/bin/env python
"""`icd-coco-to-voc` from a checkout: see icd/commands/coco_to_voc.py or `python tools/coco_to_voc.py --help`."""
import sys

from icd.commands.coco_to_voc import main

if __name__ == "__main__":
    sys.exit(main())
