#!/usr/bin/env python
"""Same as `detkit pretrain ...`: see `python tools/pretrain.py --help`."""
import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
