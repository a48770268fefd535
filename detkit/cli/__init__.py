"""The ``detkit`` command line: list, config, train, eval, infer, export, pretrain, eval-cls, data, summary, proposals.

``tools/train.py``, ``tools/eval.py``, ``tools/infer.py`` and ``tools/pretrain.py`` are the same
commands. User errors (bad config keys, missing files, unreadable inputs, not a
checkpoint) end with a one-line message naming the file, key or index and exit
status 2, never a traceback; ``DETKIT_DEBUG=1`` shows the traceback.

This module assembles the parser and runs a command; each group of commands is a module of its own, with its
parser: ``info`` (list, summary, convert), ``train`` (train, pretrain, config show), ``detect`` (eval, infer,
export, eval-cls), ``proposals``, ``data`` (synth, synth-cls, synth-video, tile, check, convert); ``common``
holds what they share.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not reach the network at import

from detkit.cli import data, detect, info, proposals, train  # noqa: E402  (after the variable above)

log = logging.getLogger("detkit")


def build_parser() -> argparse.ArgumentParser:
    from detkit import __version__

    parser = argparse.ArgumentParser(prog="detkit", description="Two-stage object detection toolkit")
    parser.add_argument("--version", action="version", version=f"detkit {__version__}",
                        help="print detkit's version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (before the command: detkit -v ...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; detkit COMMAND --help for its options")
    info.add_list_parser(sub)
    train.add_config_parser(sub)
    info.add_convert_parser(sub)
    train.add_train_parser(sub)
    train.add_compare_parser(sub)
    info.add_summary_parser(sub)
    detect.add_detector_parsers(sub)
    train.add_pretrain_parser(sub)
    detect.add_eval_cls_parser(sub)
    proposals.add_proposals_parser(sub)
    data.add_data_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from detkit.config import ConfigError
    from detkit.engine.checkpoint import CheckpointError
    from detkit.engine.files import WriteError
    from detkit.plugins import PluginError, UnknownNameError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, PluginError, UnknownNameError, WriteError,
                                         FileNotFoundError, NotADirectoryError, argparse.ArgumentTypeError]
    for module, name in (("detkit.data.images", "ImageReadError"), ("detkit.data.dataset", "DatasetError"),
                         ("detkit.data.media", "MediaError"), ("detkit.proposals.cache", "ProposalCacheError"),
                         ("detkit.models.feature_cache", "FeatureCacheError"),
                         ("detkit.engine.state_dict", "WeightsError"), ("detkit.training.loop", "TrainingDiverged"),
                         ("detkit.export.graph", "ExportError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _without_worker_traceback(message: str) -> str:
    """A user error raised in a DataLoader worker reaches the main process as torch re-raises it: "Caught
    ImageReadError in DataLoader worker process 0." and the worker's traceback, its own message last. That
    message alone."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    name, sep, text = last.partition(": ")
    return text if sep and name.replace(".", "").replace("_", "").isalnum() else last


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from detkit.engine.signals import Stopped, stop_on_signals

    try:
        with stop_on_signals():  # SIGINT and SIGTERM raise Stopped: every temporary is removed on the way out
            return args.func(args)
    except _user_errors() as exc:
        if os.environ.get("DETKIT_DEBUG"):
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"detkit {args.command}: error: {_without_worker_traceback(msg)}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"detkit {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # raised by a handler of a library's own
        print(f"detkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from detkit.training.loop import TrainingInterrupted

        if not isinstance(exc, TrainingInterrupted):
            raise
        print(f"detkit {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
