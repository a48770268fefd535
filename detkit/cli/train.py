"""``detkit train``, ``detkit pretrain`` and ``detkit config show``: the commands that read a config and train
(a detector, or a backbone as a classifier) or print it resolved."""
from __future__ import annotations

import argparse
import os

from detkit.cli.common import _add_set, _registries


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of a training command (train, pretrain)."""
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or from the newest checkpoint in train.work_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="train afresh in a train.work_dir that holds a run: its checkpoints, log and metrics go first")
    p.add_argument("--no-progress", action="store_true")


def cmd_config_show(args) -> int:
    from detkit.api import load_config
    from detkit.config import dump

    print(dump(load_config(args.config, args.overrides, _registries())), end="")
    return 0


def cmd_train(args) -> int:
    from detkit.api import train

    resume = False if args.resume is None else (args.resume or True)  # --resume alone: the newest checkpoint
    result = train(args.config, args.overrides, resume=resume, progress=not args.no_progress,
                   overwrite=args.overwrite, registries=_registries())
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def cmd_pretrain(args) -> int:
    from detkit.classification.trainer import pretrain
    from detkit.config import ClassifierConfig, load_config

    registries = _registries()
    cfg = load_config(args.config, args.overrides, schema=ClassifierConfig)
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
    csub = p.add_subparsers(dest="config_command", required=True)
    ps = csub.add_parser("show", help="print the resolved config (base chain merged, overrides applied)")
    ps.add_argument("config")
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
