#!/usr/bin/env python
"""Same as `detkit eval ...`: see `python tools/eval.py --help`."""
import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
