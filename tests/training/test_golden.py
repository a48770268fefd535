"""Golden runs: every training schedule, trained for a few fixed-seed iterations on the CPU, reproduces the
losses of every iteration and the final weights of every stage (the SVMs and box regressors of the SVM
stage among them) recorded in ``tests/golden/<schedule>.pt`` by ``tests/golden/record.py``.

Bit for bit (``torch.equal``, losses exactly) when torch, the CPU capability and the CPU model are those of
the recording; on another machine within ``RTOL`` relative (weights: of the tensor's largest magnitude;
losses: of the value, at least ``LOSS_FLOOR``), and the failure message says which comparison ran.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from golden.runs import (RECORD_COMMAND, SCHEDULES, environment, golden_path, load_golden, relative_to_repo,
                         run_schedule)

# The golden configs are written in the layout before parts owned their settings (model.roi_head, rpn,
# anchors, selective_search, svm): reproducing the recorded runs bit for bit is also the check that such
# configs load into the same model and training. Their deprecation warnings are expected here.
pytestmark = pytest.mark.filterwarnings("ignore::detkit.config.ConfigDeprecationWarning")

RTOL = 1e-4
EXACT_KEYS = ("torch", "cpu_capability", "cpu")  # what bit-exact agreement needs (golden.runs.environment)
LOSS_FLOOR = 1e-3  # a loss near 0 (no foreground in the batch) is compared to within RTOL * LOSS_FLOOR
MAX_LISTED = 15


def _log_differences(stage: str, want: dict, got: dict, exact: bool) -> list[str]:
    if not torch.equal(want["iters"], got["iters"]):
        return [f"{stage}: logged iterations {got['iters'].tolist()}, recorded {want['iters'].tolist()}"]
    if list(want["values"]) != list(got["values"]):
        return [f"{stage}: logs {list(got['values'])}, recorded {list(want['values'])}"]
    out = []
    for i, it in enumerate(want["iters"].tolist()):
        for key, values in want["values"].items():
            w, g = float(values[i]), float(got["values"][key][i])
            diff = abs(g - w)
            if (g != w) if exact else not diff <= RTOL * max(abs(w), LOSS_FLOOR):
                out.append(f"{stage}, iteration {it}, {key}: {g!r}, recorded {w!r} (differs by {diff:.3g}, "
                           f"{diff / abs(w) if w else math.inf:.3g} relative)")
    return out


def _state_differences(stage: str, want: dict, got: dict, exact: bool) -> list[str]:
    if list(want) != list(got):
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        return [f"{stage}: state dict keys differ (missing {missing[:5]}, new {extra[:5]})"]
    out = []
    for key, w in want.items():
        g = got[key]
        if g.dtype != w.dtype or g.shape != w.shape:
            out.append(f"{stage}, weight {key}: {g.dtype} {tuple(g.shape)}, recorded {w.dtype} {tuple(w.shape)}")
            continue
        if torch.equal(g, w):
            continue
        if not w.is_floating_point():
            out.append(f"{stage}, weight {key}: {g.tolist() if g.numel() < 8 else g}, recorded "
                       f"{w.tolist() if w.numel() < 8 else w}")
            continue
        diff = (g.double() - w.double()).abs()
        largest, where = diff.max(), tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        scale = float(w.double().abs().max())
        if not exact and largest <= RTOL * scale:
            continue
        out.append(f"{stage}, weight {key}: {int((diff > 0).sum())} of {w.numel()} values differ, at most by "
                   f"{float(largest):.3g} at {list(where)} ({float(largest) / scale if scale else math.inf:.3g} "
                   f"of the tensor's largest magnitude {scale:.3g})")
    return out


def compare(golden: dict, result: dict, exact: bool) -> list[str]:
    """Every difference of ``result`` from ``golden``, in training order."""
    if golden["config"] != result["config"]:
        return [f"the schedule's config in tests/golden/runs.py is not the one recorded: {result['config']} vs "
                f"{golden['config']}"]
    want, got = golden["stages"], result["stages"]
    if list(want) != list(got):
        return [f"stages {list(got)}, recorded {list(want)}"]
    out = []
    for stage in want:
        if (want[stage]["log"] is None) != (got[stage]["log"] is None):
            out.append(f"{stage}: {'no log' if got[stage]['log'] is None else 'a log'} now, recorded "
                       f"{'none' if want[stage]['log'] is None else 'one'}")
        elif want[stage]["log"] is not None:
            out += _log_differences(stage, want[stage]["log"], got[stage]["log"], exact)
        out += _state_differences(stage, want[stage]["state"], got[stage]["state"], exact)
    return out


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_golden_run(name, tmp_path):
    path = golden_path(name)
    rerecord = (f"If the change is intended, re-record: `{RECORD_COMMAND} {name}` (all schedules: no name), and "
                f"commit {relative_to_repo(path)} in a commit of its own that says why.")
    if not os.path.isfile(path):
        pytest.fail(f"golden run {name}: nothing recorded at {relative_to_repo(path)}. {rerecord}")
    golden = load_golden(path)
    recorded, here = golden["environment"], environment()
    exact = all(recorded.get(k) == here[k] for k in EXACT_KEYS)
    if exact:
        how = f"bit for bit: torch {here['torch']}, CPU capability {here['cpu_capability']} on {here['cpu']}, as recorded"
    else:
        how = (f"within {RTOL:g} relative, not bit for bit: recorded with torch {recorded['torch']} on CPU "
               f"capability {recorded['cpu_capability']} ({recorded.get('cpu', 'model not recorded')}), this is "
               f"torch {here['torch']} on {here['cpu_capability']} ({here['cpu']})")
        warnings.warn(f"golden run {name} compared {how}")
    others = [f"{k} {here[k]} (recorded {recorded[k]})" for k in recorded
              if k not in EXACT_KEYS and recorded[k] != here.get(k)]

    result = run_schedule(name, str(tmp_path))

    differences = compare(golden, result, exact)
    if differences:
        listed = "\n  ".join(differences[:MAX_LISTED])
        more = f"\n  ... and {len(differences) - MAX_LISTED} more" if len(differences) > MAX_LISTED else ""
        also = f"\nOther versions differ from the recording: {', '.join(others)}." if others else ""
        places = f"{len(differences)} place{'s' if len(differences) > 1 else ''}"
        pytest.fail(f"golden run {name} differs from {relative_to_repo(path)} (compared {how}) in {places}:\n  "
                    f"{listed}{more}{also}\n{rerecord}", pytrace=False)
