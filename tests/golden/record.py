"""Record the golden runs of tests/golden/runs.py.

``python tests/golden/record.py [schedule ...]`` (the venv's ``.venv/bin/python``; all schedules when none is
named) trains each schedule on the CPU, twice, checks that the two runs agree bit for bit, and writes
``tests/golden/<schedule>.pt`` with the per-iteration losses, the final weights of every stage and the torch
version and CPU capability they were recorded with. A commit that changes training results on purpose
re-records the affected schedules in a commit of its own that says why. ``--once`` skips the second run
(and so the determinism check).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for golden.runs
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from golden.runs import SCHEDULES, golden_path, relative_to_repo, run_schedule, save_golden  # noqa: E402


def _first_difference(a: dict, b: dict) -> str | None:
    """Where two results of one schedule differ (None when bit-identical)."""
    if a["stages"].keys() != b["stages"].keys():
        return f"stages {sorted(a['stages'])} vs {sorted(b['stages'])}"
    for stage, ra in a["stages"].items():
        rb = b["stages"][stage]
        if (ra["log"] is None) != (rb["log"] is None):
            return f"{stage}: a log in only one run"
        if ra["log"] is not None:
            for key, va in ra["log"]["values"].items():
                vb = rb["log"]["values"].get(key)
                if vb is None or not torch.equal(va, vb):
                    return f"{stage}: logged {key} {va.tolist()} vs {None if vb is None else vb.tolist()}"
        if ra["state"].keys() != rb["state"].keys():
            return f"{stage}: state dict keys differ"
        for key, va in ra["state"].items():
            if not torch.equal(va, rb["state"][key]):
                return f"{stage}: weight {key} differs"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schedules", nargs="*", metavar="schedule", help=f"some of: {', '.join(SCHEDULES)}")
    parser.add_argument("--once", action="store_true", help="one run per schedule, no determinism check")
    args = parser.parse_args(argv)
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if unknown:
        parser.error(f"unknown schedule {', '.join(unknown)}; the schedules are {', '.join(SCHEDULES)}")
    torch.set_num_threads(1)  # as tests/conftest.py does for the test process; run_schedule sets it too
    for name in args.schedules or list(SCHEDULES):
        start = time.process_time()
        runs = []
        for _ in range(1 if args.once else 2):
            with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as root:
                runs.append(run_schedule(name, root))
        if len(runs) == 2:
            difference = _first_difference(*runs)
            if difference is not None:
                print(f"{name}: two runs differ ({difference}); not recorded", file=sys.stderr)
                return 1
        path = golden_path(name)
        save_golden(runs[0], path)
        env = runs[0]["environment"]
        print(f"{name}: {relative_to_repo(path)} ({os.path.getsize(path) / 1024:.0f} KiB; "
              f"{', '.join(runs[0]['stages'])}; torch {env['torch']}, CPU {env['cpu_capability']}; "
              f"{(time.process_time() - start) / len(runs):.1f} s CPU per run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
