#!/usr/bin/env python
"""Same as `detkit infer ...`: see `python tools/infer.py --help`."""
import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
