"""``detkit eval``, ``infer``, ``export`` and ``eval-cls``: the commands that run a trained model (a detector from
its checkpoint, compressed with ``--svd`` or replaced by an ``--export`` file; a pretrained classifier)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from detkit.cli.common import (DeprecatedAlias, _add_model_run_options, _add_set, _data_spec, _device,
                               _mapping_argument, _registries, number)


def cmd_eval(args) -> int:
    from detkit.api import evaluate
    from detkit.data.media import check_output_dir

    registries = _registries()
    if args.results:
        return _eval_results_file(args, registries)
    if not args.checkpoint:
        raise argparse.ArgumentTypeError("eval: give a CHECKPOINT, or --results DETS.json with --data")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    check_output_dir(out, "--output" if args.output else "--output (default: eval/ beside the checkpoint)")
    given = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    evaluate(args.checkpoint, data=args.data, output=out, device=args.device or "auto", metric=args.metric,
             max_detections=args.max_detections, overrides=args.overrides, progress=not args.no_progress,
             export=args.export, svd=_svd_ranks(args.svd), images=args.images, split=args.split,
             classes=given or None, registries=registries)
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return 0


def _eval_results_file(args, registries) -> int:
    """Score a COCO-format results file produced elsewhere against a dataset."""
    import json

    from detkit.config import ConfigError
    from detkit.data.loading import build_dataset
    from detkit.data.media import check_output_dir
    from detkit.evaluation.coco_eval import DEFAULT_MAX_DETECTIONS
    from detkit.evaluation.runner import score_and_write

    spec = _data_spec(args.dataset or args.data, args)
    if spec is None:
        raise ConfigError("--results needs --data (a COCO json, a VOC directory, a YOLO data.yaml or a dataset "
                          "mapping)")
    dataset = build_dataset(spec, registries, "--data")
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
    results = _dataset_image_ids(results, args.results, dataset)
    metric = args.metric or "coco"
    if args.max_detections and metric != "coco":
        raise ConfigError(f"--max-detections: the {metric} metric of a results file counts every detection; "
                          f"the option is COCO's maxDets")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.results)), "eval")
    check_output_dir(out, "--output")
    try:
        cap = (args.max_detections or DEFAULT_MAX_DETECTIONS) if metric == "coco" else None  # VOC counts every one
        score_and_write(dataset, results, out, metric, "faster_coco_eval", list(dataset.class_names),
                        write_results=False, max_detections=cap)
    except ValueError as exc:
        raise ConfigError(f"{args.results}: {exc}") from None
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return 0


def _dataset_image_ids(results: list[dict], path: str, dataset) -> list[dict]:
    """Results ``detkit infer`` wrote (an ``images.json`` beside them) number images by their position in it: their
    ids become the dataset's, matched by file name. Other results keep theirs (which must be the dataset's)."""
    import json

    from detkit.config import ConfigError
    from detkit.evaluation.runner import results_by_file_name

    index = os.path.join(os.path.dirname(os.path.abspath(path)), "images.json")
    if not os.path.isfile(index):
        return results
    try:
        with open(index, encoding="utf-8") as f:
            images = json.load(f)
        mapped = results_by_file_name(results, images, dataset.to_coco()["images"], index)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    print(f"note: {path}: image ids mapped to the dataset's by file name through {index} (written by detkit infer)",
          file=sys.stderr)
    return mapped


def _exported_model(args, model):
    """``--export FILE``: the exported detector instead of the checkpoint's eager model (the checkpoint still gives
    the config and the classes)."""
    if not args.export:
        return model
    from detkit.api import exported_in_place_of
    from detkit.config import ConfigError

    if args.svd:
        raise ConfigError("--svd compresses the eager model's fc layers; an --export file is run as it was written")
    return exported_in_place_of(model, args.export)


def _svd_ranks(spec: str | None) -> list[int] | None:
    """``--svd [RANKS]``: the ranks of a truncated SVD of the box head's fully connected layers."""
    if spec is None:
        return None
    from detkit.config import ConfigError

    try:
        return [int(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--svd {spec!r}: expected comma-separated ranks such as 1024,256") from None


def _apply_svd(model, spec: str | None) -> None:
    """``--svd [RANKS]`` on ``model`` (:func:`detkit.api.compress`)."""
    ranks = _svd_ranks(spec)
    if ranks is not None:
        from detkit.api import compress

        print("truncated SVD: " + "; ".join(compress(model, ranks)))


def cmd_infer(args) -> int:
    from detkit.config import TileSettings
    from detkit.data.media import check_output_dir
    from detkit.inference.predictor import check_output_apart, run
    from detkit.models.roi_heads import detections_capped
    from detkit.models.loading import model_from_checkpoint
    from detkit.models.tiling import settings_with_options, tiled

    registries = _registries()
    check_output_dir(args.output, "--output")  # before the model is built
    check_output_apart(args.input, args.output)
    tile_options = {"size": args.tile, "overlap": args.overlap, "merge": args.tile_merge, "batch": args.tile_batch,
                    "full_image": args.tile_full_image or None}
    settings_with_options(TileSettings(), tile_options)  # bad options fail before the model is built
    device = _device(args.device)
    model, cfg, ckpt = model_from_checkpoint(args.checkpoint, registries, device, args.overrides)
    _apply_svd(model, args.svd)
    model = _exported_model(args, model)
    # the checkpoint's eval.tile (--set eval.tile.size=...), with the --tile options over it
    model = tiled(model, settings_with_options(cfg.eval.tile, tile_options), progress=not args.no_progress)
    # --max-detections: the RoI heads' detections_per_img for this run (an exported file keeps its own)
    with detections_capped(model, args.max_detections) if args.max_detections else contextlib.nullcontext():
        summary = run(model, list(ckpt["class_names"]), list(ckpt["cat_ids"]), args.input, args.output, device,
                      score_thr=args.score_thr, max_frames=args.max_frames, progress=not args.no_progress,
                      results_thr=args.results_thr)
    for path in summary["outputs"][:5]:
        print(f"wrote {path}")
    if len(summary["outputs"]) > 5:
        print(f"... and {len(summary['outputs']) - 5} more in {args.output}")
    unit = "frames" if summary["kind"] in ("video", "webcam") else "images"
    kept = "every detection" if args.results_thr is None else f"those scoring at least {args.results_thr:g}"
    print(f"{summary['drawn']} detections scoring at least {args.score_thr:g} drawn on {summary['images']} {unit}; "
          f"results.json holds {summary['detections']} ({kept}), images.json their image ids: "
          f"{os.path.join(args.output, 'results.json')}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable images: {', '.join(summary['skipped'][:5])}")
    return 0


def cmd_export(args) -> int:
    from detkit.engine.signals import Stopped
    from detkit.export.run import ExportMismatch, export_checkpoint

    try:  # Ctrl-C or SIGTERM (Stopped, see cli.main): the temporary is removed, the output left as it was
        table = export_checkpoint(args.checkpoint, args.format, args.output, _registries(), images=args.images,
                                  count=args.num_images, overrides=args.overrides, overwrite=args.overwrite,
                                  tolerance=args.tolerance)
    except ExportMismatch as exc:  # not a usage error: the export itself is wrong
        print(f"detkit export: {exc}", file=sys.stderr)
        return 1
    except Stopped as exc:
        kept = "left as it was" if os.path.exists(args.output) else "not written"
        print(f"detkit export: {exc}: {args.output} {kept}, no temporary left", file=sys.stderr)
        return exc.exit_code
    print(table)
    print(f"wrote {args.output} ({args.format}; verified against the eager model)")
    return 0


def cmd_eval_cls(args) -> int:
    from detkit.classification.evaluate import classification_metrics, format_metrics, predict, write_report
    from detkit.classification.model import classifier_from_checkpoint
    from detkit.classification.loading import build_classification_dataset
    from detkit.data.media import check_output_dir

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


def _cls_data_spec(text: str) -> dict:
    """``--data`` of eval-cls: a class-folder directory, a CSV/JSON list, or a mapping ``{name: ..., ...}``."""
    if os.path.isdir(text):
        return {"name": "image_folder", "root": text}
    if os.path.isfile(text) and text.lower().endswith((".csv", ".json")):
        return {"name": "image_list", "file": text}
    return _mapping_argument(text, "a folder of class folders, a .csv/.json image list, or a mapping such as "
                                   "'{name: digits, split: test}'")


def _check_same_classes(data_classes: list[str], model_classes: list[str], checkpoint: str) -> None:
    from detkit.config import ConfigError

    if list(data_classes) != list(model_classes):
        raise ConfigError(f"--data: its classes ({', '.join(data_classes[:8])}{', ...' if len(data_classes) > 8 else ''}) "
                          f"are not the {len(model_classes)} classes {checkpoint} was trained on "
                          f"({', '.join(model_classes[:8])}{', ...' if len(model_classes) > 8 else ''}), in that order")


def _svd_spec(text: str) -> str:
    """An argparse ``type=`` for ``--svd RANKS``: comma-separated integers >= 1 (given back as written, for
    :func:`_svd_ranks`)."""
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ranks >= 1 such as 1024,256")
    return text


CHECKPOINT_HELP = "a checkpoint written by detkit train (final.pth, iter_NNNNNNN.pth)"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What runs in eval and infer: the checkpoint's eager model, compressed (--svd), or an exported file."""
    p.add_argument("--export", metavar="FILE", help="run this file written by detkit export (.onnx, .ts, .pt2) "
                                                  "instead of the checkpoint's eager model")
    p.add_argument("--svd", nargs="?", const="1024,256", metavar="RANKS", type=_svd_spec,
                   help="truncated SVD of the RoI head's fc layers at these ranks (default: fc6 1024, fc7 256)")


def add_detector_parsers(sub) -> None:
    """eval, infer and export: the commands that run a trained detector."""
    p = sub.add_parser("eval", help="COCO or VOC mAP of a checkpoint on its test split or --data, "
                                    "or of a results file (--results) on --data")
    p.add_argument("checkpoint", nargs="?", help=f"{CHECKPOINT_HELP}; leave it out with --results")
    p.add_argument("--results", metavar="DETS.json",
                   help="score this COCO-format results file (original category ids) on --data instead of running "
                        "a model")
    # --dataset: the earlier name of --data with --results; args.dataset stays None, the value goes to args.data
    p.add_argument("--dataset", dest="data", action=DeprecatedAlias, new="--data")
    p.set_defaults(dataset=None)
    p.add_argument("--metric", choices=["coco", "voc07", "voc"], help="default: the config's eval.metric (coco)")
    p.add_argument("--max-detections", type=number(int, ge=10), metavar="N",
                   help="detections per image the detector returns and COCO counts (maxDets; default: the config's "
                        "eval.max_detections, 100): raise it for scenes with more objects")
    p.add_argument("--data", help="the dataset: a COCO json, a VOC directory, a YOLO data.yaml, or a mapping "
                                  "'{name: coco, images: ..., annotations: ...}' (default: the checkpoint's "
                                  "data.test; required with --results)")
    p.add_argument("--images", help="images directory for a COCO json given with --data")
    p.add_argument("--split", default="test", help="split file for a VOC directory given with --data (default: test)")
    p.add_argument("--classes", help="comma-separated class list for a VOC directory (default: the checkpoint's "
                                     "classes; with --results, the 20 VOC classes)")
    p.add_argument("--output", help="output directory (default: eval/ next to the checkpoint)")
    _add_model_options(p)
    _add_model_run_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("infer", help="detect objects in an image, a folder, a video or a webcam")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("input", help="image file, folder of images, video file, or webcam index (0, 1, ...)")
    p.add_argument("--output", default="outputs/infer",
                   help="output directory: annotated pictures or video, results.json, images.json "
                        "(default: outputs/infer)")
    p.add_argument("--score-thr", type=number(), default=0.5,
                   help="draw the detections scoring at least this (default 0.5; any finite number: an SVM "
                        "predictor's scores are margins); results.json keeps every detection unless --results-thr")
    p.add_argument("--results-thr", type=number(), metavar="SCORE",
                   help="keep only the detections scoring at least this in results.json (default: every detection "
                        "the model returns, for an evaluation of the whole precision-recall curve)")
    p.add_argument("--max-frames", type=number(int, ge=1), help="stop after this many frames (videos, webcams)")
    p.add_argument("--max-detections", type=number(int, ge=1), metavar="N",
                   help="detections per image the detector returns at most (default: the checkpoint's "
                        "model.roi_heads.detections_per_img, 100)")
    _add_model_options(p)
    p.add_argument("--tile", type=number(int, ge=0), metavar="SIZE",
                   help="tiled inference for images far larger than the model's input: SIZE x SIZE windows at "
                        "native resolution (0: off; default: the checkpoint's eval.tile.size, 0)")
    p.add_argument("--overlap", type=number(ge=0, lt=1), help="share of a window its neighbours also cover, in [0, 1) "
                                                 "(default 0.2; at least the largest object's share)")
    p.add_argument("--tile-merge", choices=["nms", "larger", "ios"],
                   help="how the windows' duplicates merge: nms (default), larger (the larger box of a pair), "
                        "ios (the union of boxes that cover each other)")
    p.add_argument("--tile-batch", type=number(int, ge=1), metavar="N", help="windows per forward pass (default 4)")
    p.add_argument("--tile-full-image", action="store_true",
                   help="also detect on the whole image at the model's size (keeps objects larger than a window)")
    _add_model_run_options(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("export", help="the whole detector (resize, NMS and all) as ONNX, TorchScript or a torch.export "
                                      "program with dynamic batch and image size, verified against the eager model",
                       description="Exports the whole detector (resize, NMS and all) with dynamic batch and image size "
                                   "and verifies the file against the eager model before keeping it. Export runs on "
                                   "the CPU by design, so it takes no --device: the model is loaded, traced and "
                                   "verified on the CPU, and the file runs on any device afterwards (detkit eval/infer "
                                   "--export FILE --device ...).")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported"],
                   help="onnx (.onnx; runs in onnxruntime: pip install 'detkit[export]'), torchscript (.ts), "
                        "exported (.pt2, torch.export)")
    p.add_argument("--output", required=True, help="the file to write (kept only if its detections match)")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="image files or folders to verify on (default: the checkpoint's test set)")
    p.add_argument("--num-images", type=number(int, ge=1), default=4, help="how many verification images (default 4)")
    p.add_argument("--tolerance", type=number(gt=0), default=1e-3,
                   help="largest box coordinate difference in pixels for a match (default 1e-3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_set(p)
    p.set_defaults(func=cmd_export)


def add_eval_cls_parser(sub) -> None:
    """``detkit eval-cls``."""
    p = sub.add_parser("eval-cls", help="top-1/top-5, per-class accuracy and confusion matrix of a pretrain "
                                        "checkpoint on its data.test or --data")
    p.add_argument("checkpoint", help="a checkpoint written by detkit pretrain (final.pth, iter_NNNNNNN.pth)")
    p.add_argument("--data", help="a folder of class folders, a .csv/.json image list, or a mapping "
                                  "'{name: digits, split: test}' (default: the config's data.test)")
    p.add_argument("--ten-crop", action="store_true", help="average the 4 corner, centre and mirrored crops "
                                                           "(AlexNet Sec. 4.1, GoogLeNet Sec. 7)")
    p.add_argument("--batch-size", type=number(int, ge=1), default=64, help="images per forward pass (default 64)")
    p.add_argument("--output", help="output directory (default: eval_cls/ next to the checkpoint)")
    _add_model_run_options(p)
    p.set_defaults(func=cmd_eval_cls)
