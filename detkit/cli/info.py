"""``detkit list``, ``summary`` and ``convert``: what is registered (and which plugin brought it), a backbone's
per-layer table, and another toolkit's weights as a detkit checkpoint."""
from __future__ import annotations

import os
import sys
import warnings

from detkit.cli.common import _registries, dims, number
from detkit.config import ConfigError


def cmd_list(args) -> int:
    if args.kind == "plugins":  # every plugin: what it registered, or why it was skipped
        from detkit.plugins import format_plugins

        print(format_plugins(_registries(report=False)), end="")
        return 0
    registries = _registries()
    if args.kind:  # a kind of the table, one a plugin declared, or an earlier name (with its warning)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DeprecationWarning)
            try:
                kind = registries.part_kind(args.kind).plural
            except KeyError as exc:  # UnknownNameError: names the kinds there are
                raise ConfigError(str(exc)) from None
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    from detkit.api import list_parts

    kinds = [kind] if args.kind else registries.kinds
    for kind in kinds:
        parts = list_parts(kind, registries)
        print(f"{kind} ({len(parts)}):")
        for part in parts:
            extra = ""
            if kind == "backbones":
                extra = _backbone_facts(registries.kind(kind).get(part.name))
            if registries.kind(kind).get(part.name).settings is not None:  # its config keys (config show: values)
                extra = f"keys=[{', '.join(part.settings)}] "
            info = ", ".join(f"{k}={v}" for k, v in part.info.items() if k != "slots")
            print(f"  {part.name:<28} plugin={part.plugin:<12} {extra}{info}")
            if "slots" in part.info:  # a detector's shape: the sections model.<key> it takes
                print(f"  {'':<28} slots: {'; '.join(_describe_slot(s) for s in part.info['slots'])}")
    return 0


def _describe_slot(slot) -> str:
    """``key=default (kind, takes a | b)`` for one slot of a detector."""
    if slot.kind is None:
        return f"{slot.key} (settings {slot.settings.__name__})"
    default = slot.default if slot.default is not None else "none"
    facts = ([slot.kind] if slot.kind != slot.key else []) + ([f"takes {' | '.join(slot.choices)}"] if slot.choices else [])
    return f"{slot.key}={default}" + (f" ({', '.join(facts)})" if facts else "")


def _backbone_facts(entry) -> str:
    import torch

    try:
        # Built on the meta device: parameter counts and shapes without allocating or initialising weights.
        with torch.device("meta"):
            model = entry.builder()  # the variant's own number of classes (1000 for ImageNet, 10 for CIFAR forms)
        parts = model.detection_parts()
        params = sum(p.numel() for p in model.parameters())
        return f"params={params:>12,}  stride={parts.stride:<3} channels={parts.out_channels:<5} "
    except Exception as exc:  # a broken third-party backbone must not break the listing
        return f"(cannot build: {type(exc).__name__}: {exc}) "


def cmd_summary(args) -> int:
    from detkit.models.summary import summary_command

    print(summary_command(_registries(), args.name, args.input_size))
    return 0


def cmd_convert(args) -> int:
    from detkit.config import ConfigError, to_dict
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.models.convert import from_torchvision, torchvision_config

    if os.path.exists(args.output) and not args.overwrite:
        raise ConfigError(f"--output {args.output} exists; give another path or --overwrite")
    model, cfg, names, cat_ids = from_torchvision(args.weights, _registries(),
                                                  torchvision_config(args.min_size, args.max_size))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_checkpoint(args.output, model_state=model.state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=names, cat_ids=cat_ids)
    print(f"{args.weights}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(names)} classes "
          f"-> {args.output}")
    return 0


def add_list_parser(sub) -> None:
    """``detkit list [KIND]``."""
    from detkit.registry.kinds import KINDS

    p = sub.add_parser("list", help="registered parts and the plugin each came from; 'list plugins': every "
                                    "plugin, its distribution, what it registered or why it failed")
    p.add_argument("kind", nargs="?", help=f"one of {', '.join(k.plural for k in KINDS)}, a kind a plugin declares, "
                                          f"or plugins (default: every kind)")
    p.set_defaults(func=cmd_list)


def add_convert_parser(sub) -> None:
    """``detkit convert torchvision``."""
    p = sub.add_parser("convert", help="import another toolkit's detection weights as a detkit checkpoint")
    p.add_argument("source", choices=["torchvision"], help="torchvision: a fasterrcnn_resnet50_fpn state dict")
    p.add_argument("weights", help="the state dict file (nothing is downloaded)")
    p.add_argument("--output", required=True, help="the detkit checkpoint to write")
    p.add_argument("--min-size", type=number(int, ge=1), default=800, help="shorter image side (torchvision's min_size)")
    p.add_argument("--max-size", type=number(int, ge=1), default=1333, help="longer side cap (torchvision's max_size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_convert)


def add_summary_parser(sub) -> None:
    """``detkit summary``."""
    p = sub.add_parser("summary", help="per-layer table (parameters, operations, output volume) of a backbone")
    p.add_argument("name", help="registered backbone name (see detkit list backbones)")
    p.add_argument("--input-size", type=dims(3, ",", ge=1, example="3,224,224"), metavar="C,H,W",
                   help="input size, e.g. 3,224,224 (default: the backbone's input size)")
    p.set_defaults(func=cmd_summary)
