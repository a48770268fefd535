#!/usr/bin/env python
"""Train detectors for the same wall-clock budget on the same data and compare their COCO AP.

    python tools/budget.py --budget 600 --train DIR/annotations.json --test DIR2/annotations.json \\
        detkit=configs/faster_rcnn_tiny_fpn_synth.yaml tv-r18=torchvision:resnet18_fpn [--set KEY=VALUE ...]

Each NAME=SPEC is a detkit config file (trained by its own schedule, ``--set`` applied) or
``torchvision:resnet18_fpn`` / ``torchvision:resnet50_fpn`` (torchvision's FasterRCNN on an untrained ResNet-FPN,
plain SGD on the same batches; defaults batch 2, lr 0.02, momentum 0.9, weight decay 1e-4, 100 warmup
iterations, images at the training set's size; ``--set data.batch_size=...``, ``train.lr=...``,
``model.transform.min_size=...`` apply to it too). Each run calibrates its seconds per iteration, trains
budget / that iterations with one learning-rate step at 80% and is scored on --test (see
detkit/benchmarks/budget.py). Prints a table (name, iterations, s/iter, train time, AP, AP50, APs);
``--markdown`` a docs/benchmarks.md section. Exit status 2: a bad spec, dataset or option, named in the message.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget {text!r}: expected seconds, e.g. 600") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--budget {text!r}: expected a positive number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/budget.py", description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="+", metavar="NAME=SPEC",
                   help="NAME=CONFIG.yaml or NAME=torchvision:resnet18_fpn|resnet50_fpn (order of the table's rows)")
    p.add_argument("--budget", type=_seconds, required=True, help="seconds of training per run")
    p.add_argument("--train", required=True, metavar="DATASET",
                   help="COCO annotation json of the training set, its images in images/ beside it")
    p.add_argument("--test", required=True, metavar="DATASET", help="COCO annotation json of the test set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. train.lr=0.01 (repeatable)")
    p.add_argument("--work-dir", help="keep the runs' work directories here (default: a temporary directory)")
    p.add_argument("--output", help="write the results as JSON to this path")
    p.add_argument("--markdown", action="store_true", help="print a section for docs/benchmarks.md")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)

    from detkit.benchmarks import budget
    from detkit.benchmarks.common import load_average, machine
    from detkit.plugins import get_registries

    registries = get_registries()
    try:
        train_data = budget.coco_dataset(args.train, "--train")
        test_data = budget.coco_dataset(args.test, "--test")
        specs = budget.parse_specs(args.specs, args.set, train_data, test_data, registries)
    except budget.SpecError as exc:
        print(f"tools/budget.py: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="detkit-budget-") as tmp:
        rows = [budget.run_on_budget(spec, args.budget, registries, args.work_dir or tmp) for spec in specs]
    command = "python tools/budget.py " + " ".join(argv)
    report = {"machine": machine(), "load_average": load_average(), "command": command, "budget_s": args.budget,
              "train": args.train, "test": args.test, "overrides": args.set,
              "calibration": {"warmup_iters": budget.CALIBRATION_WARMUP, "timed_iters": budget.CALIBRATION_ITERS},
              "step_at": budget.STEP_AT, "rows": rows}
    print()
    print(budget.table(rows))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    if args.markdown:
        print()
        print(budget.markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
