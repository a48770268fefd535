"""``detkit train``, ``detkit pretrain`` and ``detkit config show``: the commands that read a config and train
(a detector, or a backbone as a classifier) or print it resolved."""
from __future__ import annotations

import argparse
import os

from detkit.cli.common import DEVICE_FORMS, _add_device, _add_no_progress, _add_set, _registries

CONFIG_HELP = "the config file (YAML; its base: chain is merged first)"


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of a training command (train, pretrain)."""
    p.add_argument("config", help=CONFIG_HELP)
    _add_device(p, f"sets train.device, as --set train.device=DEVICE does: {DEVICE_FORMS} (default: the config's "
                   f"train.device, auto)")
    _add_set(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or from the newest checkpoint in train.work_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="train afresh in a train.work_dir that holds a run: its checkpoints, log and metrics go first")
    _add_no_progress(p, "no progress bars: training logs one line per train.log_period instead (iteration, losses, "
                        "lr, time per iteration, ETA)")


def _overrides(args) -> list[str]:
    """``--set`` overrides, with ``--device`` last (the option given for it wins over a --set of train.device)."""
    return [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]


def cmd_config_show(args) -> int:
    from detkit.api import load_config
    from detkit.config import dump

    print(dump(load_config(args.config, args.overrides, _registries())), end="")
    return 0


def cmd_train(args) -> int:
    from detkit.api import train

    resume = False if args.resume is None else (args.resume or True)  # --resume alone: the newest checkpoint
    result = train(args.config, _overrides(args), resume=resume, progress=not args.no_progress,
                   overwrite=args.overwrite, registries=_registries())
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def cmd_pretrain(args) -> int:
    from detkit.classification.trainer import pretrain
    from detkit.config import ClassifierConfig, load_config

    registries = _registries()
    cfg = load_config(args.config, _overrides(args), schema=ClassifierConfig)
    result = pretrain(cfg, registries, resume=args.resume if args.resume != "" else True,
                      progress=not args.no_progress, overwrite=args.overwrite)
    metrics = result["metrics"]
    if metrics:
        print(f"validation: top-1 {metrics['top1']:.4f}, top-{metrics['top5_k']} {metrics['top5']:.4f} "
              f"({metrics['count']} images)")
    print(f"checkpoint: {result['checkpoint']}\nbackbone weights: "
          f"{os.path.join(cfg.train.work_dir, 'backbone.pth')}")
    return 0


def add_config_parser(sub) -> None:
    """``detkit config show``."""
    p = sub.add_parser("config", help="config utilities")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND", help="show")
    ps = csub.add_parser("show", help="print the resolved config (base chain merged, overrides applied)")
    ps.add_argument("config", help=CONFIG_HELP)
    _add_set(ps)
    ps.set_defaults(func=cmd_config_show)


def add_train_parser(sub) -> None:
    """``detkit train``."""
    p = sub.add_parser("train", help="train a detector from a config")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_train)


def add_pretrain_parser(sub) -> None:
    """``detkit pretrain``."""
    p = sub.add_parser("pretrain", help="train a backbone as a classifier (backbone.pth for model.backbone.weights)")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_pretrain)


def cmd_compare(args) -> int:
    from detkit.data.media import check_output_dir
    from detkit.evaluation.compare import compare_runs

    check_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
    print(compare_runs(args.runs, args.output))
    print(f"figure: {args.output}")
    return 0


def add_compare_parser(sub) -> None:
    """``detkit compare``."""
    p = sub.add_parser("compare", help="compare training runs: loss and validation curves overlaid in one figure, "
                                       "the final metrics in a table, and the config keys that differ")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="two or more run directories (a run's train.work_dir: log.jsonl, metrics.json, config.yaml)")
    p.add_argument("--output", default="compare.png",
                   help="the figure to write (default compare.png; its format by the extension: .png, .pdf, .svg)")
    p.set_defaults(func=cmd_compare)
