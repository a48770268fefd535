"""``detkit proposals compute`` and ``eval``: the selective search cache of a config's datasets, and proposal
recall (of selective search and, with ``--checkpoint``, of a trained RPN)."""
from __future__ import annotations

import os

from detkit.cli.common import _add_model_run_options, _add_no_progress, _add_set, _device, _registries, number


def _dataset_proposal_source(cfg, registries):
    """The config's proposal source, which must keep boxes per dataset (registered with ``per_dataset=True``,
    as selective search is): ``detkit proposals`` computes and evaluates those boxes without a model."""
    from detkit.config import ConfigError

    part = cfg.model.proposal_generator
    entry = registries.proposal_generators.get(part.name)
    if not entry.info.get("per_dataset"):
        raise ConfigError(f"detkit proposals computes the boxes a proposal source keeps per dataset (selective "
                          f"search), and model.proposal_generator.name is {part.name!r}: give a config whose "
                          f"proposal generator is selective_search (e.g. configs/fast_rcnn_tiny_synth.yaml) or "
                          f"--set model.proposal_generator=selective_search")
    from detkit.registry.binding import call_builder
    from detkit.registry.contexts import ProposalGeneratorContext

    return call_builder(registries.part_kind("proposal_generator"), entry, part.settings,
                        ProposalGeneratorContext(in_channels=None, strides=None))


def _proposal_cache(source, dataset, key: str, args):
    """The selective search cache of ``dataset`` (``data.<key>``), computed where incomplete."""
    from detkit.config import ConfigError
    from detkit.proposals import ProposalCacheError

    try:
        return source.dataset_proposals(dataset, progress=not args.no_progress, num_workers=args.workers)
    except ProposalCacheError as exc:
        raise ConfigError(f"data.{key}: {exc}") from None


def cmd_proposals_compute(args) -> int:
    from detkit.config import load_config
    from detkit.data.loading import build_dataset

    registries = _registries()
    cfg = load_config(args.config, args.overrides, registries)
    source = _dataset_proposal_source(cfg, registries)
    keys = ["train", "test"] if args.split == "both" else [args.split]
    datasets = [(key, build_dataset(getattr(cfg.data, key), registries, key)) for key in keys]  # all checked first
    for key, dataset in datasets:
        cache = _proposal_cache(source, dataset, key, args)
        counts = [len(cache.get(i)) for i in range(len(cache))]
        print(f"{key}: {cache.directory}")
        print(f"  {len(counts)} images; boxes per image: mean {sum(counts) / len(counts):.1f}, "
              f"min {min(counts)}, max {max(counts)}")
    return 0


def _rpn_proposals(checkpoint: str, dataset, registries, device, progress: bool) -> list:
    """Proposals of a trained proposal network for every image of ``dataset``, in original-image pixels."""
    from detkit.config import ConfigError
    from detkit.models.loading import model_from_checkpoint
    from detkit.proposals.compute import compute_proposals

    model, ckpt_cfg, _ = model_from_checkpoint(checkpoint, registries, device)
    if not any(True for _ in model.proposal_generator.parameters()):
        raise ConfigError(f"{checkpoint}: its proposal source {ckpt_cfg.model.proposal_generator.name!r} is not "
                          f"learned; --checkpoint needs a detector with an RPN")
    return compute_proposals(model, dataset, device, progress=progress)


def cmd_proposals_eval(args) -> int:
    from detkit.config import ConfigError, load_config
    from detkit.data.loading import build_dataset
    from detkit.engine.files import write_bytes_atomic, write_json_atomic
    from detkit.proposals import format_recall_table, plot_recall, proposal_recall

    registries = _registries()
    cfg = load_config(args.config, args.overrides, registries)
    source = _dataset_proposal_source(cfg, registries)
    dataset = build_dataset(getattr(cfg.data, args.split), registries, args.split)
    gt = []
    for i in range(len(dataset)):
        ann = dataset.annotations(i)
        gt.append(ann["boxes"][~(ann["iscrowd"] | ann["difficult"])])  # not counted, as in the papers' figures
    if not sum(len(g) for g in gt):
        raise ConfigError(f"data.{args.split}: {dataset.source} has no ground-truth boxes (crowd and difficult "
                          f"ones aside); recall is undefined")
    cache = _proposal_cache(source, dataset, args.split, args)
    mode = getattr(cfg.model.proposal_generator.settings, "mode", None)
    results = {cfg.model.proposal_generator.name + (f" ({mode})" if mode else ""):
               proposal_recall(gt, [cache.get(i) for i in range(len(cache))])}
    if args.checkpoint:
        proposals = _rpn_proposals(args.checkpoint, dataset, registries, _device(args.device), not args.no_progress)
        results[f"rpn ({os.path.basename(args.checkpoint)})"] = proposal_recall(gt, proposals)
    out = args.output or os.path.join(cfg.train.work_dir, "proposals_eval")
    os.makedirs(out, exist_ok=True)
    table = format_recall_table(results)
    write_json_atomic(os.path.join(out, "recall.json"), {"dataset": dataset.source, "cache": cache.directory,
                                                         "results": results}, indent=2)
    write_bytes_atomic(os.path.join(out, "recall.txt"), table.encode("utf-8"))
    plot_recall(results, os.path.join(out, "recall.png"))
    print(table, end="")
    print(f"recall: {os.path.join(out, 'recall.json')}, {os.path.join(out, 'recall.png')}")
    return 0


def add_proposals_parser(sub) -> None:
    """``detkit proposals compute`` and ``detkit proposals eval``."""
    p = sub.add_parser("proposals", help="selective search proposals: compute the cache, evaluate recall")
    psub = p.add_subparsers(dest="proposals_command", required=True, metavar="SUBCOMMAND", help="compute or eval")
    config_help = "the config file: its datasets and its model.proposal_generator (selective_search)"
    ps = psub.add_parser("compute", help="compute (or resume) the selective search cache of a config's datasets "
                                         "(settings: model.proposal_generator, a selective_search section)")
    ps.add_argument("config", help=config_help)
    ps.add_argument("--split", choices=["train", "test", "both"], default="both",
                    help="which of data.train / data.test (default: both)")
    ps.add_argument("--workers", type=number(int, ge=0), help="processes (default: model.proposal_generator.num_workers, "
                                                "else all cores)")
    _add_no_progress(ps)
    _add_set(ps)
    ps.set_defaults(func=cmd_proposals_compute)
    ps = psub.add_parser("eval", help="proposal recall at IoU 0.5/0.7 of selective search and, with --checkpoint, "
                                      "of a trained RPN")
    ps.add_argument("config", help=config_help)
    ps.add_argument("--split", choices=["train", "test"], default="test", help="data.train or data.test (default: test)")
    ps.add_argument("--checkpoint", help="also evaluate this checkpoint's RPN proposals")
    ps.add_argument("--output", help="output directory (default: <train.work_dir>/proposals_eval)")
    ps.add_argument("--workers", type=number(int, ge=0), help="processes computing missing selective search boxes")
    _add_model_run_options(ps, "where --checkpoint's RPN runs: auto (CUDA when available, else the CPU), cpu, cuda "
                               "or cuda:N (default: auto)")
    ps.set_defaults(func=cmd_proposals_eval)
