"""Comparing training runs (``detkit compare RUN_DIR RUN_DIR ...``): their loss and validation curves overlaid in
one figure, their final metrics in one table, and the config keys in which they differ.

A run directory is what ``detkit train`` (or ``pretrain``) leaves in ``train.work_dir``: ``log.jsonl`` (losses
per log period, ``val/*`` or ``*/val`` records at each validation), ``metrics.json`` (the end-of-run
evaluation) and ``config.yaml`` (the resolved config).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from detkit.config import ConfigError, read_yaml_file
from detkit.evaluation.reports import _plt, save_iteration_plot

#: the final metrics the table shows, in order, where a run has them (detection COCO, VOC, classification)
TABLE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP", "top1", "top5")
#: config keys that differ between any two runs by nature
IGNORED_KEYS = ("train.work_dir",)


@dataclass
class Run:
    """One run directory, read."""

    path: str
    name: str
    records: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def read_run(path: str, name: str | None = None) -> Run:
    """The log, metrics and config of the run in ``path``; ConfigError naming the folder and what it lacks."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a folder (expected a run's train.work_dir with log.jsonl)")
    log_path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(log_path):
        raise ConfigError(f"{path}: no log.jsonl: not a run directory (train.work_dir of detkit train)")
    run = Run(path, name or os.path.basename(os.path.normpath(path)))
    with open(log_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{log_path}: line {number} is not JSON") from None
            if isinstance(record, dict) and isinstance(record.get("iter"), int):
                run.records.append(record)
    metrics_path = os.path.join(path, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            run.metrics = json.load(f)
    config_path = os.path.join(path, "config.yaml")
    if os.path.isfile(config_path):
        run.config = read_yaml_file(config_path, what="a run's config.yaml") or {}
    return run


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def differing_keys(runs: list[Run]) -> dict[str, list]:
    """Config key -> each run's value, for the keys whose values are not all equal (a key a run lacks: None)."""
    flat = [_flat(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - set(IGNORED_KEYS))
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def _value(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return "n/a" if value < 0 else f"{value:.3f}"


def format_comparison(runs: list[Run]) -> str:
    """The final metrics of each run (the columns any run has), its last iteration, then the differing keys."""
    keys = [k for k in TABLE_KEYS if any(k in r.metrics for r in runs)]
    width = max(4, max(len(r.name) for r in runs))
    lines = [f"{'run':<{width}}  {'iters':>6}  " + "  ".join(f"{k:>6}" for k in keys),
             f"{'-' * width}  {'-' * 6}  " + "  ".join("-" * 6 for _ in keys)]
    for r in runs:
        last = max((rec["iter"] for rec in r.records), default=0)
        lines.append(f"{r.name:<{width}}  {last:>6}  " + "  ".join(f"{_value(r.metrics, k):>6}" for k in keys))
    differ = differing_keys(runs)
    if differ:
        lines += ["", "config keys that differ:"]
        for key, values in differ.items():
            lines.append(f"  {key}: " + " | ".join(f"{r.name}={json.dumps(v)}" for r, v in zip(runs, values)))
    elif all(r.config for r in runs):
        lines += ["", "the configs are the same (but train.work_dir)"]
    return "\n".join(lines)


def _validation_key(runs: list[Run]) -> str | None:
    for key in ("val/AP", "val/mAP", "top1/val"):
        if any(key in rec for r in runs for rec in r.records):
            return key
    return None


def plot_comparison(runs: list[Run], path: str) -> None:
    """One figure: the total loss of every run against iteration (log scale) and, where the runs validated while
    training, their validation metric, each run's end-of-run value marked."""
    plt = _plt()
    metric = _validation_key(runs)
    final = metric.split("/")[1] if metric and metric.startswith("val/") else ("top1" if metric else None)
    fig, axes = plt.subplots(2 if metric else 1, 1, figsize=(7.5, 7 if metric else 4), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for r in runs:
        points = [(rec["iter"], rec["total"]) for rec in r.records if isinstance(rec.get("total"), (int, float))]
        if points:
            line, = axes[0].plot(*zip(*points), label=r.name)
        if metric:
            values = [(rec["iter"], rec[metric]) for rec in r.records if metric in rec]
            color = line.get_color() if points else None
            if values:
                axes[1].plot(*zip(*values), marker="o", markersize=3, color=color, label=r.name)
            last = max((rec["iter"] for rec in r.records), default=None)
            if final in r.metrics and last is not None:
                axes[1].plot([last], [r.metrics[final]], marker="*", markersize=10, color=color)
    axes[0].set_ylabel("total loss")
    axes[0].set_yscale("log")
    if metric:
        axes[1].set_ylabel(f"{metric} (star: end of run)")
    save_iteration_plot(fig, axes, path, legend_size=8)


def compare_runs(paths: list[str], output: str) -> str:
    """Read the runs in ``paths``, write the figure to ``output`` and return the table (names: the folders' base
    names, or their paths where two share one)."""
    if len(paths) < 2:
        raise ConfigError(f"compare: give two run directories or more, got {len(paths)}")
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.normpath(p) for p in paths]
    runs = [read_run(p, n) for p, n in zip(paths, names)]
    plot_comparison(runs, output)
    return format_comparison(runs)
