"""The ``detkit`` command line: list, config, train, eval, infer, pretrain, eval-cls, data, summary, proposals.

``tools/train.py``, ``tools/eval.py``, ``tools/infer.py`` and ``tools/pretrain.py`` are the same
commands. User errors (bad config keys, missing files, unreadable inputs, not a
checkpoint) end with a one-line message naming the file, key or index and exit
status 2, never a traceback; ``DETKIT_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations must not reach the network at import

log = logging.getLogger("detkit")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.01 (repeatable)")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of a training command (train, pretrain)."""
    p.add_argument("config")
    _add_set(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or from the newest checkpoint in train.work_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="train afresh in a train.work_dir that holds a run: its checkpoints, log and metrics go first")
    p.add_argument("--no-progress", action="store_true")


def _registries(report: bool = True):
    """The registries; each plugin that was skipped is reported once, as one line (``report``: on stderr)."""
    from detkit.plugins import collected_plugin_warnings, get_registries

    with collected_plugin_warnings() as messages:
        registries = get_registries()
    for message in messages if report else ():
        print(f"warning: {message}", file=sys.stderr)
    return registries


def _device(name: str | None):
    from detkit.devices import resolve_device

    return resolve_device(name or "auto")


# ----------------------------------------------------------------------------- commands


def cmd_list(args) -> int:
    import dataclasses

    if args.kind == "plugins":  # every plugin: what it registered, or why it was skipped
        from detkit.plugins import format_plugins

        print(format_plugins(_registries(report=False)), end="")
        return 0
    registries = _registries()
    kinds = [args.kind] if args.kind else registries.kinds
    for kind in kinds:
        registry = registries.kind(kind)
        print(f"{kind} ({len(registry)}):")
        for entry in registry.entries():
            extra = ""
            if kind == "backbones":
                extra = _backbone_facts(entry)
            if entry.settings is not None:  # the part's config keys (detkit config show prints their values)
                extra = f"keys=[{', '.join(f.name for f in dataclasses.fields(entry.settings))}] "
            info = ", ".join(f"{k}={v}" for k, v in entry.info.items())
            print(f"  {entry.name:<28} plugin={entry.plugin:<12} {extra}{info}")
    return 0


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


def cmd_config_show(args) -> int:
    from detkit.config import dump, load_config

    print(dump(load_config(args.config, args.overrides, _registries())), end="")
    return 0


def cmd_train(args) -> int:
    from detkit.config import load_config
    from detkit.training import train

    registries = _registries()
    cfg = load_config(args.config, args.overrides, registries)
    result = train(cfg, registries, resume=args.resume if args.resume != "" else True,
                   progress=not args.no_progress, overwrite=args.overwrite)
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


def _mapping_argument(text: str, expected: str) -> dict:
    """``--data`` given as a YAML mapping (``{name: ..., ...}``); ConfigError naming what was ``expected``."""
    import yaml

    from detkit.config import ConfigError

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict):
        raise ConfigError(f"--data {text!r}: expected {expected}")
    return data


def _cls_data_spec(text: str) -> dict:
    """``--data`` of eval-cls: a class-folder directory, a CSV/JSON list, or a mapping ``{name: ..., ...}``."""
    if os.path.isdir(text):
        return {"name": "image_folder", "root": text}
    if os.path.isfile(text) and text.lower().endswith((".csv", ".json")):
        return {"name": "image_list", "file": text}
    return _mapping_argument(text, "a folder of class folders, a .csv/.json image list, or a mapping such as "
                                   "'{name: digits, split: test}'")


def cmd_eval_cls(args) -> int:
    from detkit.classification.evaluate import classification_metrics, format_metrics, predict, write_report
    from detkit.classification.model import classifier_from_checkpoint
    from detkit.classification.loading import build_classification_dataset
    from detkit.media import check_output_dir

    registries = _registries()
    device = _device(args.device)
    model, cfg, _ = classifier_from_checkpoint(args.checkpoint, registries, device, args.overrides)
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval_cls")
    check_output_dir(out, "--output")
    spec = _cls_data_spec(args.data) if args.data else cfg.data.test
    dataset = build_classification_dataset(spec, registries, "test")
    _check_same_classes(dataset.class_names, cfg.model.class_names, args.checkpoint)
    probs, labels = predict(model, dataset, cfg.model.input_size, cfg.data.augment.test_resize, device,
                            args.batch_size, cfg.data.num_workers, ten_crop=args.ten_crop,
                            progress=not args.no_progress)
    metrics = classification_metrics(probs, labels, cfg.model.class_names)
    metrics["ten_crop"] = bool(args.ten_crop)
    write_report(metrics, out, f"{cfg.model.backbone.name}: top-1 {metrics['top1']:.1%} "
                               f"({'10 crops' if args.ten_crop else 'centre crop'})")
    print(format_metrics(metrics))
    print(f"report: {os.path.join(out, 'metrics.json')}, {os.path.join(out, 'confusion_matrix.png')}")
    return 0


def _check_same_classes(data_classes: list[str], model_classes: list[str], checkpoint: str) -> None:
    from detkit.config import ConfigError

    if list(data_classes) != list(model_classes):
        raise ConfigError(f"--data: its classes ({', '.join(data_classes[:8])}{', ...' if len(data_classes) > 8 else ''}) "
                          f"are not the {len(model_classes)} classes {checkpoint} was trained on "
                          f"({', '.join(model_classes[:8])}{', ...' if len(model_classes) > 8 else ''}), in that order")


def cmd_convert(args) -> int:
    from detkit.checkpoint import save_checkpoint
    from detkit.config import ConfigError, to_dict
    from detkit.convert import from_torchvision, torchvision_config

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


def cmd_export(args) -> int:
    from detkit.export.run import ExportMismatch, export_checkpoint

    try:
        table = export_checkpoint(args.checkpoint, args.format, args.output, _registries(), images=args.images,
                                  count=args.num_images, overrides=args.overrides, overwrite=args.overwrite,
                                  tolerance=args.tolerance)
    except ExportMismatch as exc:  # not a usage error: the export itself is wrong
        print(f"detkit export: {exc}", file=sys.stderr)
        return 1
    print(table)
    print(f"wrote {args.output} ({args.format}; verified against the eager model)")
    return 0


def _eval_results_file(args, registries) -> int:
    """Score a COCO-format results file produced elsewhere against a dataset."""
    import json

    from detkit.config import ConfigError
    from detkit.data.loading import build_dataset
    from detkit.evaluation.runner import score_and_write
    from detkit.media import check_output_dir

    spec = _data_spec(args.dataset or args.data, args)
    if spec is None:
        raise ConfigError("--results needs --dataset (a COCO json, a VOC directory or a dataset mapping)")
    dataset = build_dataset(spec, registries, "--dataset")
    try:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"results file not found: {args.results}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{args.results}: invalid JSON ({exc})") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and {"image_id", "category_id", "bbox", "score"}
                                                <= set(r) for r in results):
        raise ConfigError(f"{args.results}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.results)), "eval")
    check_output_dir(out, "--output")
    try:
        score_and_write(dataset, results, out, args.metric or "coco", "faster_coco_eval", list(dataset.class_names),
                        write_results=False)
    except ValueError as exc:
        raise ConfigError(f"{args.results}: {exc}") from None
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return 0


def _data_spec(spec: str | None, args, classes: list[str] | None = None) -> dict | None:
    """The dataset ``--data``/``--dataset`` names; a VOC directory's classes are ``--classes``, else
    ``classes`` (a checkpoint's), else the 20 VOC classes."""
    if not spec:
        return None
    if spec.endswith(".json"):
        images = args.images or os.path.join(os.path.dirname(os.path.abspath(spec)), "images")
        return {"name": "coco", "images": images, "annotations": spec}
    if os.path.isdir(os.path.join(spec, "Annotations")):
        voc = {"name": "voc", "root": spec, "split": args.split}
        if args.classes:
            voc["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
        elif classes:
            voc["classes"] = list(classes)
        return voc
    return _mapping_argument(spec, "a COCO json file, a VOC directory (with Annotations/) or a mapping such as "
                                   "'{name: coco, images: DIR, annotations: FILE}'")


def _exported_model(args, model):
    """``--export FILE``: the exported detector instead of the checkpoint's eager one (the checkpoint still gives
    the config and the classes)."""
    if not args.export:
        return model
    from detkit.config import ConfigError
    from detkit.export.formats import load_exported

    if args.svd:
        raise ConfigError("--svd compresses the eager model's fc layers; an --export file is run as it was written")
    exported = load_exported(args.export)
    if exported.class_names and exported.class_names != list(model.class_names or exported.class_names):
        raise ConfigError(f"--export {args.export}: its classes {exported.class_names} are not the checkpoint's "
                          f"{model.class_names}")
    return exported


def _apply_svd(model, spec: str | None) -> None:
    """``--svd [RANKS]``: truncated SVD of the RoI head's fully connected layers (Fast R-CNN Sec. 3.1)."""
    if spec is None:
        return
    from detkit.config import ConfigError
    from detkit.models.svd import compress_fully_connected

    try:
        ranks = [int(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--svd {spec!r}: expected comma-separated ranks such as 1024,256") from None
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if head is None:
        raise ConfigError("--svd: this model has no RoI head with fully connected layers")
    try:
        replaced = compress_fully_connected(head, ranks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print("truncated SVD: " + "; ".join(replaced))


def cmd_eval(args) -> int:
    from detkit.checkpoint import model_from_checkpoint
    from detkit.data.loading import build_dataset
    from detkit.evaluation import evaluate
    from detkit.media import check_output_dir

    registries = _registries()
    if args.results:
        return _eval_results_file(args, registries)
    if not args.checkpoint:
        raise argparse.ArgumentTypeError("eval: give a CHECKPOINT, or --results DETS.json with --dataset")
    if args.metric:
        args.overrides.append(f"eval.metric={args.metric}")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    check_output_dir(out, "--output" if args.output else "--output (default: eval/ beside the checkpoint)")
    device = _device(args.device)
    model, cfg, ckpt = model_from_checkpoint(args.checkpoint, registries, device, args.overrides)
    _apply_svd(model, args.svd)
    model = _exported_model(args, model)
    spec = _data_spec(args.data, args, list(ckpt["class_names"]))  # a VOC directory: the model's classes
    dataset = build_dataset(spec or cfg.data.test, registries, "test" if spec is None else "--data")
    evaluate(model, cfg, registries, device, out, dataset=dataset, progress=not args.no_progress)
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return 0


def cmd_infer(args) -> int:
    from detkit.checkpoint import model_from_checkpoint
    from detkit.config import TileSettings
    from detkit.inference import run
    from detkit.media import check_output_dir
    from detkit.tiling import settings_with_options, tiled

    registries = _registries()
    check_output_dir(args.output, "--output")  # before the model is built
    tile_options = {"size": args.tile, "overlap": args.overlap, "merge": args.tile_merge, "batch": args.tile_batch,
                    "full_image": args.tile_full_image or None}
    settings_with_options(TileSettings(), tile_options)  # bad options fail before the model is built
    device = _device(args.device)
    model, cfg, ckpt = model_from_checkpoint(args.checkpoint, registries, device, args.overrides)
    _apply_svd(model, args.svd)
    model = _exported_model(args, model)
    # the checkpoint's eval.tile (--set eval.tile.size=...), with the --tile options over it
    model = tiled(model, settings_with_options(cfg.eval.tile, tile_options), progress=not args.no_progress)
    summary = run(model, list(ckpt["class_names"]), list(ckpt["cat_ids"]), args.input, args.output, device,
                  score_thr=args.score_thr, max_frames=args.max_frames, progress=not args.no_progress)
    for path in summary["outputs"][:5]:
        print(f"wrote {path}")
    if len(summary["outputs"]) > 5:
        print(f"... and {len(summary['outputs']) - 5} more in {args.output}")
    print(f"{summary['detections']} detections on {summary['images']} {'frames' if summary['kind'] in ('video', 'webcam') else 'images'}"
          f"; results: {os.path.join(args.output, 'results.json')}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable images: {', '.join(summary['skipped'][:5])}")
    return 0


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
    return entry.builder(part.settings, in_channels=None, strides=None)


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
    from detkit.checkpoint import model_from_checkpoint
    from detkit.config import ConfigError
    from detkit.proposals.compute import compute_proposals

    model, ckpt_cfg, _ = model_from_checkpoint(checkpoint, registries, device)
    if not any(True for _ in model.proposal_generator.parameters()):
        raise ConfigError(f"{checkpoint}: its proposal source {ckpt_cfg.model.proposal_generator.name!r} is not "
                          f"learned; --checkpoint needs a detector with an RPN")
    return compute_proposals(model, dataset, device, progress=progress)


def cmd_proposals_eval(args) -> int:
    from detkit.config import ConfigError, load_config
    from detkit.data.loading import build_dataset
    from detkit.media import write_bytes_atomic, write_json_atomic
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


def cmd_synth(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.synth import synthesize

    variant = args.variant
    if args.scene:  # a size-dependent layout of its own (detkit.data.synth.scene_variant)
        if args.variant != "default":
            raise ConfigError(f"--scene draws its own layout (objects of 24-64 px); it does not combine with "
                              f"--variant {args.variant}")
        try:
            h, w = _size(args.scene)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"--scene {args.scene!r}: expected HEIGHTxWIDTH, e.g. 4000x4000") from None
        variant = "scene"
    else:
        h, w = _size(args.size)
    try:
        synthesize(args.out, args.format, args.num_images, args.seed, image_size=(h, w), variant=variant)
    except ValueError as exc:  # the arguments, named in the message
        raise ConfigError(str(exc)) from None
    print(f"wrote {args.num_images} images ({args.format}, variant {variant}) to {args.out}")
    return 0


def cmd_data_tile(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.loading import build_dataset, check_image_files
    from detkit.data.tile import DEFAULT_MIN_VISIBILITY, TileSpec, tile_dataset

    visibility = DEFAULT_MIN_VISIBILITY if args.min_visibility is None else args.min_visibility
    tiling = TileSpec(args.size, args.overlap, visibility, args.keep_empty)  # the options first, before any reading
    expected = ("a COCO json, a VOC directory (with Annotations/) or a mapping "
                "'{name: coco, images: DIR, annotations: FILE}'")
    if not args.input.lstrip().startswith("{"):
        if not os.path.exists(args.input):
            raise ConfigError(f"--in {args.input}: no such file or folder; expected {expected}")
        if os.path.isdir(args.input) and not os.path.isdir(os.path.join(args.input, "Annotations")):
            raise ConfigError(f"--in {args.input}: a folder without Annotations/; expected {expected}")
    spec = _data_spec(args.input, args)
    dataset = build_dataset(spec, _registries(), "--in")
    check_image_files(dataset, "--in")
    fmt = args.format or ("voc" if spec.get("name") == "voc" else "coco")
    done = tile_dataset(dataset, args.out, tiling, fmt=fmt, split=args.split, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print(f"wrote {done['tiles']} tiles of {args.size} px ({fmt}) from {done['images']} images to {args.out}: "
          f"{done['boxes']} boxes of {done['objects']} objects; {done['skipped_empty']} of {done['empty_tiles']} "
          f"tiles without objects left out (--keep-empty {args.keep_empty:g})")
    if done["lost"]:
        print(f"warning: {done['lost']} of the {done['objects']} objects are in no tile (less than "
              f"--min-visibility {visibility:g} of each inside any tile: larger than the tiles, or cut everywhere; "
              f"a larger --size or --overlap keeps them)", file=sys.stderr)
    return 0


def cmd_synth_cls(args) -> int:
    from detkit.config import ConfigError
    from detkit.data.synth_cls import synthesize_classification

    try:
        summary = synthesize_classification(args.out, args.per_class, args.val_per_class, args.seed, args.size)
    except ValueError as exc:
        raise ConfigError(f"--out {args.out}: {exc}" if args.out in str(exc) else str(exc)) from None
    print(f"wrote {summary['images']['train']} training and {summary['images']['val']} validation crops of "
          f"{len(summary['classes'])} classes ({args.size}x{args.size}) to {args.out}/train and {args.out}/val")
    return 0


def cmd_synth_video(args) -> int:
    from detkit.data.synth import synthesize_video

    h, w = _size(args.size)
    synthesize_video(args.out, args.frames, args.seed, fps=args.fps, size=(h, w))
    print(f"wrote {args.frames} frames to {args.out}")
    return 0


def cmd_summary(args) -> int:
    from detkit.summary import summary_command

    size = None
    if args.input_size:
        try:
            size = tuple(int(v) for v in args.input_size.split(","))
            assert len(size) == 3
        except (ValueError, AssertionError):
            raise argparse.ArgumentTypeError(f"--input-size {args.input_size!r}: expected C,H,W, e.g. 3,224,224") from None
    print(summary_command(_registries(), args.name, size))
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 240x320") from None
    return h, w


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from detkit.plugins import KINDS

    parser = argparse.ArgumentParser(prog="detkit", description="Two-stage object detection toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered parts and the plugin each came from; 'list plugins': every "
                                    "plugin, its distribution, what it registered or why it failed")
    p.add_argument("kind", nargs="?", choices=[*KINDS.values(), "plugins"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("config", help="config utilities")
    csub = p.add_subparsers(dest="config_command", required=True)
    ps = csub.add_parser("show", help="print the resolved config (base chain merged, overrides applied)")
    ps.add_argument("config")
    _add_set(ps)
    ps.set_defaults(func=cmd_config_show)

    p = sub.add_parser("convert", help="import another toolkit's detection weights as a detkit checkpoint")
    p.add_argument("source", choices=["torchvision"], help="torchvision: a fasterrcnn_resnet50_fpn state dict")
    p.add_argument("weights", help="the state dict file (nothing is downloaded)")
    p.add_argument("--output", required=True, help="the detkit checkpoint to write")
    p.add_argument("--min-size", type=int, default=800, help="shorter image side (torchvision's min_size)")
    p.add_argument("--max-size", type=int, default=1333, help="longer side cap (torchvision's max_size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train a detector from a config")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("summary", help="per-layer table (parameters, operations, output volume) of a backbone")
    p.add_argument("name", help="registered backbone name (see detkit list backbones)")
    p.add_argument("--input-size", help="C,H,W (default: the backbone's input size)")
    p.set_defaults(func=cmd_summary)

    _add_detector_commands(sub)
    _add_classification_commands(sub)
    _add_proposals_commands(sub)
    _add_data_commands(sub)
    return parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What runs in eval and infer: the checkpoint's eager model, compressed (--svd), or an exported file."""
    p.add_argument("--export", metavar="FILE", help="run this file written by detkit export (.onnx, .ts, .pt2) "
                                                  "instead of the checkpoint's eager model")
    p.add_argument("--svd", nargs="?", const="1024,256", metavar="RANKS",
                   help="truncated SVD of the RoI head's fc layers at these ranks (default: fc6 1024, fc7 256)")


def _add_detector_commands(sub) -> None:
    """eval, infer and export: the commands that run a trained detector."""
    p = sub.add_parser("eval", help="COCO or VOC mAP of a checkpoint on its test split or --data, "
                                    "or of a results file (--results) on --dataset")
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--results", help="score this COCO-format results file instead of running a model")
    p.add_argument("--dataset", help="the dataset --results refers to (same forms as --data)")
    p.add_argument("--metric", choices=["coco", "voc07", "voc"], help="default: the config's eval.metric (coco)")
    p.add_argument("--data", help="COCO json, VOC directory, or a mapping '{name: coco, images: ..., annotations: ...}'")
    p.add_argument("--images", help="images directory for a COCO json given with --data")
    p.add_argument("--split", default="test", help="split file for a VOC directory given with --data/--dataset")
    p.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the 20 VOC classes)")
    p.add_argument("--output", help="output directory (default: eval/ next to the checkpoint)")
    _add_model_options(p)
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("infer", help="detect objects in an image, a folder, a video or a webcam")
    p.add_argument("checkpoint")
    p.add_argument("input", help="image file, folder of images, video file, or webcam index (0, 1, ...)")
    p.add_argument("--output", default="outputs/infer")
    p.add_argument("--score-thr", type=float, default=0.5)
    p.add_argument("--max-frames", type=int, help="stop after this many frames (videos, webcams)")
    _add_model_options(p)
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="tiled inference for images far larger than the model's input: SIZE x SIZE windows at "
                        "native resolution (0: off; default: the checkpoint's eval.tile.size, 0)")
    p.add_argument("--overlap", type=float, help="share of a window its neighbours also cover, in [0, 1) "
                                                 "(default 0.2; at least the largest object's share)")
    p.add_argument("--tile-merge", choices=["nms", "larger", "ios"],
                   help="how the windows' duplicates merge: nms (default), larger (the larger box of a pair), "
                        "ios (the union of boxes that cover each other)")
    p.add_argument("--tile-batch", type=int, metavar="N", help="windows per forward pass (default 4)")
    p.add_argument("--tile-full-image", action="store_true",
                   help="also detect on the whole image at the model's size (keeps objects larger than a window)")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("export", help="the whole detector (resize, NMS and all) as ONNX, TorchScript or a torch.export "
                                      "program with dynamic batch and image size, verified against the eager model")
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported"],
                   help="onnx (.onnx; runs in onnxruntime: pip install 'detkit[export]'), torchscript (.ts), "
                        "exported (.pt2, torch.export)")
    p.add_argument("--output", required=True, help="the file to write (kept only if its detections match)")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="image files or folders to verify on (default: the checkpoint's test set)")
    p.add_argument("--num-images", type=int, default=4, help="how many verification images (default 4)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest box coordinate difference in pixels for a match (default 1e-3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_set(p)
    p.set_defaults(func=cmd_export)


def _add_classification_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="train a backbone as a classifier (backbone.pth for model.backbone.weights)")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval-cls", help="top-1/top-5, per-class accuracy and confusion matrix of a pretrain "
                                        "checkpoint on its data.test or --data")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="a folder of class folders, a .csv/.json image list, or a mapping "
                                  "'{name: digits, split: test}' (default: the config's data.test)")
    p.add_argument("--ten-crop", action="store_true", help="average the 4 corner, centre and mirrored crops "
                                                           "(AlexNet Sec. 4.1, GoogLeNet Sec. 7)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="output directory (default: eval_cls/ next to the checkpoint)")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    _add_set(p)
    p.set_defaults(func=cmd_eval_cls)



def _add_proposals_commands(sub) -> None:
    p = sub.add_parser("proposals", help="selective search proposals: compute the cache, evaluate recall")
    psub = p.add_subparsers(dest="proposals_command", required=True)
    ps = psub.add_parser("compute", help="compute (or resume) the selective search cache of a config's datasets "
                                         "(settings: model.proposal_generator, a selective_search section)")
    ps.add_argument("config")
    ps.add_argument("--split", choices=["train", "test", "both"], default="both",
                    help="which of data.train / data.test (default: both)")
    ps.add_argument("--workers", type=int, help="processes (default: model.proposal_generator.num_workers, "
                                                "else all cores)")
    ps.add_argument("--no-progress", action="store_true")
    _add_set(ps)
    ps.set_defaults(func=cmd_proposals_compute)
    ps = psub.add_parser("eval", help="proposal recall at IoU 0.5/0.7 of selective search and, with --checkpoint, "
                                      "of a trained RPN")
    ps.add_argument("config")
    ps.add_argument("--split", choices=["train", "test"], default="test")
    ps.add_argument("--checkpoint", help="also evaluate this checkpoint's RPN proposals")
    ps.add_argument("--output", help="output directory (default: <train.work_dir>/proposals_eval)")
    ps.add_argument("--workers", type=int, help="processes computing missing selective search boxes")
    ps.add_argument("--device", help="device for --checkpoint (default: auto)")
    ps.add_argument("--no-progress", action="store_true")
    _add_set(ps)
    ps.set_defaults(func=cmd_proposals_eval)


def _add_data_commands(sub) -> None:
    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    ps = dsub.add_parser("synth", help="generate the built-in synthetic dataset")
    ps.add_argument("--out", required=True)
    ps.add_argument("--format", choices=["coco", "voc"], default="coco")
    ps.add_argument("--num-images", type=int, default=200)
    ps.add_argument("--seed", type=int, default=0)
    size = ps.add_mutually_exclusive_group()
    size.add_argument("--size", default="240x320", help="HEIGHTxWIDTH")
    size.add_argument("--scene", metavar="HEIGHTxWIDTH",
                      help="large scenes of this size (e.g. 4000x4000; at least 64x64) for tiled inference: objects "
                           "of 24-64 px, as many per area as the default images have (about 700 in 4000x4000), on "
                           "the same background; use a few (--num-images 3): each 4000x4000 takes about 2 s and "
                           "33 MB of PNG")
    # The names of detkit.data.synth.VARIANTS, listed here because importing it would import torch (detkit.data)
    # for every command; tests/test_synth.py checks that the two agree.
    ps.add_argument("--variant", choices=["default", "small"], default="default",
                    help="small: 15-40 objects per image, nearly all COCO-small (for FPN vs single-map detectors)")
    ps.set_defaults(func=cmd_synth)
    ps = dsub.add_parser("tile", help="cut a dataset of large images into a dataset of overlapping tiles at native "
                                      "resolution, to train (or evaluate) on them")
    ps.add_argument("--in", dest="input", required=True, metavar="DATASET",
                    help="COCO json (images in images/ beside it, or --images), VOC directory (with Annotations/; "
                         "--split, --classes) or a mapping '{name: coco, images: DIR, annotations: FILE}'")
    ps.add_argument("--images", help="images directory for a COCO json given with --in")
    ps.add_argument("--split", default="trainval", help="VOC split to read, and to write for a VOC output")
    ps.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the 20 VOC classes)")
    ps.add_argument("--out", required=True, help="output dataset folder (new or empty; see --overwrite)")
    ps.add_argument("--size", type=int, default=512, help="tile side in pixels, at least 32 (default: 512)")
    ps.add_argument("--overlap", type=float, default=0.2,
                    help="fraction of a tile that neighbouring tiles share, in [0, 1) (default: 0.2)")
    ps.add_argument("--min-visibility", type=float,
                    help="a tile keeps a box when at least this fraction of its area is inside it, in (0, 1] "
                         "(default: 0.5: half an object is still recognisable; a smaller piece lies whole in a "
                         "neighbour when the overlap is at least its size)")
    ps.add_argument("--keep-empty", type=float, nargs="?", const=1.0, default=0.0, metavar="FRACTION",
                    help="keep this fraction of the tiles without objects (alone: all of them; default: none, as "
                         "training skips images without objects and every kept tile has background around its "
                         "objects; keep them to evaluate on tiles)")
    ps.add_argument("--format", choices=["coco", "voc"], help="output format (default: the input's)")
    ps.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ps.add_argument("--no-progress", action="store_true")
    ps.set_defaults(func=cmd_data_tile)
    ps = dsub.add_parser("synth-cls", help="generate the built-in classification crops (class folders train/, val/)")
    ps.add_argument("--out", required=True)
    ps.add_argument("--per-class", type=int, default=2000, help="training images per class")
    ps.add_argument("--val-per-class", type=int, default=100, help="validation images per class (0: no val/)")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--size", type=int, default=64, help="side of the square crops in pixels")
    ps.set_defaults(func=cmd_synth_cls)
    ps = dsub.add_parser("synth-video", help="generate a synthetic video of the built-in classes")
    ps.add_argument("--out", required=True)
    ps.add_argument("--frames", type=int, default=48)
    ps.add_argument("--fps", type=int, default=12)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--size", default="240x320", help="HEIGHTxWIDTH")
    ps.set_defaults(func=cmd_synth_video)


def _user_errors() -> tuple[type[BaseException], ...]:
    from detkit.checkpoint import CheckpointError
    from detkit.config import ConfigError
    from detkit.plugins import PluginError, UnknownNameError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, PluginError, UnknownNameError,
                                         FileNotFoundError, NotADirectoryError, argparse.ArgumentTypeError]
    for module, name in (("detkit.data.images", "ImageReadError"), ("detkit.data.dataset", "DatasetError"),
                         ("detkit.media", "MediaError"), ("detkit.proposals.cache", "ProposalCacheError"),
                         ("detkit.feature_cache", "FeatureCacheError"), ("detkit.state_dict", "WeightsError"),
                         ("detkit.training.loop", "TrainingDiverged"), ("detkit.export.graph", "ExportError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if os.environ.get("DETKIT_DEBUG"):
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"detkit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
