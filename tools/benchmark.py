#!/usr/bin/env python
"""Benchmarks: ``python tools/benchmark.py faster_rcnn --help``.

faster_rcnn: detkit's Faster R-CNN against torchvision's FasterRCNN built around the same modules and
weights, timed in the same process with interleaved runs (see detkit/benchmarks/torchvision_parity.py). Prints
throughputs and ratios detkit / torchvision (> 1: detkit faster); ``--markdown`` prints a docs/benchmarks.md
section.
``--neck fpn`` compares R50-FPN-style models (FPN P2-P6, two-fc box head, one anchor size per level).
pipelines: R-CNN, SPP-net, Fast R-CNN and Faster R-CNN checkpoints on the same test images: proposal,
convolution, region-wise and total time per image and mAP, in the form of the Faster R-CNN paper's
timing table (see detkit/benchmarks/pipeline.py).
pretrain: images/s of ``detkit pretrain``'s training against the plain PyTorch loop of the ImageNet example
(torchvision ImageFolder, transforms and DataLoader) on the same backbone, data and settings, with interleaved
runs in one process (see detkit/benchmarks/pretrain.py); ratio detkit / plain (> 1: detkit faster).
export: an exported detector against the eager one: detections, mAP and CPU latency (see
detkit/benchmarks/export.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected HxW, e.g. 240x320") from None
    if min(h, w) < 16:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: both sides must be >= 16")
    return h, w


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,8") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be >= 1")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("faster_rcnn", help="detkit vs torchvision Faster R-CNN, same weights and settings")
    f.add_argument("--backbone", default="tiny", help="registered backbone name(s), comma-separated")
    f.add_argument("--image-size", type=_image_size, default=(240, 320), help="HxW of the synthetic images")
    f.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="inference batch sizes")
    f.add_argument("--train-batch", type=int, default=2, help="images per training iteration")
    f.add_argument("--iters", type=int, default=7, help="timed runs per measurement (the median is reported)")
    f.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    f.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast for both models")
    f.add_argument("--channels-last", action="store_true")
    f.add_argument("--compile", action="store_true", help="torch.compile the trunk (shared by both models)")
    f.add_argument("--neck", choices=["fpn"], default=None,
                   help="fpn: R50-FPN-style models (as torchvision's fasterrcnn_resnet50_fpn): an FPN on the "
                        "backbone's maps at strides 4-32 plus a max-pooled level, a two-fc 1024 box head on 7x7 "
                        "RoIAlign, one anchor size per level (16, 32, ... px); default: the trunk's one map")
    f.add_argument("--anchors", choices=["torchvision", "detkit"], default="torchvision",
                   help="torchvision's stock anchors (default; with --neck fpn detkit uses them too) or "
                        "detkit's cell-centred ones in both")
    f.add_argument("--tuned-set", action="append", default=[], metavar="KEY=VALUE",
                   help="also time detkit's inference at settings of its own (model.* overrides that keep the "
                        "weights, e.g. model.proposal_generator.post_nms_top_n_test=300; repeatable), against "
                        "torchvision at its defaults")
    f.add_argument("--tuned-channels-last", action="store_true", help="the tuned detkit in channels-last")
    f.add_argument("--tuned-compile", action="store_true", help="the tuned detkit with its trunk compiled")
    f.add_argument("--no-loader", action="store_true", help="skip the data-loader throughput measurement")
    f.add_argument("--output", help="write the results as JSON to this path")
    f.add_argument("--markdown", action="store_true", help="print a section for docs/benchmarks.md")
    q = sub.add_parser("pipelines", help="R-CNN / SPP-net / Fast R-CNN / Faster R-CNN timing and mAP table")
    q.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT|CONFIG",
                   help="e.g. R-CNN=work_dirs/rcnn/final.pth (order of the table's rows); a .yaml config instead "
                        "of a checkpoint times that detector with untrained weights (time only, no AP)")
    q.add_argument("--images", type=int, default=20, help="test images timed and scored (the first N)")
    q.add_argument("--synthetic", type=_image_size, metavar="HxW",
                   help="time on --images synthetic images of this size (detkit data synth) instead of the "
                        "first model's data.test")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the .yaml entries, e.g. model.backbone.name=vgg16 (repeatable)")
    q.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast for every model")
    q.add_argument("--warmup", type=int, default=1, help="untimed images before timing")
    q.add_argument("--svd", nargs="?", const="1024,256", metavar="RANKS",
                   help="add a truncated-SVD row for every model with fully connected RoI-head layers")
    q.add_argument("--device", default="auto")
    q.add_argument("--output", help="write the results as JSON to this path")
    c = sub.add_parser("pretrain", help="detkit pretrain vs a plain PyTorch training loop, images/s")
    c.add_argument("config", help="a detkit pretrain config whose data.train is an image_folder")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.backbone.name=resnet18 (repeatable)")
    c.add_argument("--iters", type=int, default=50, help="timed iterations per run")
    c.add_argument("--warmup", type=int, default=10,
                   help="untimed iterations at the start of each run (they absorb the DataLoader workers' "
                        "start-up; 0: start-up is timed, in both sides)")
    c.add_argument("--runs", type=int, default=3, help="runs per side, interleaved (the median is reported)")
    c.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device)")
    c.add_argument("--json", metavar="FILE", help="write the results as JSON to this path")
    e = sub.add_parser("export", help="exported (ONNX Runtime, TorchScript, torch.export) vs eager detector: "
                                      "detections, mAP and CPU latency in one process")
    e.add_argument("models", nargs="+", metavar="CHECKPOINT|CONFIG",
                   help="checkpoints (mAP measured) or .yaml configs (initial weights: detections and time only)")
    e.add_argument("--formats", default="onnx,torchscript", help="comma-separated: onnx, torchscript, exported")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for .yaml entries")
    e.add_argument("--images", type=int, default=20, help="test images the detections are compared on")
    e.add_argument("--timed", type=int, default=8, help="of those, the images timed one at a time")
    e.add_argument("--iters", type=int, default=5, help="timed rounds (the median is reported)")
    e.add_argument("--out", default="work_dirs/export_benchmark", help="folder for the exported files")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON to this path")
    e.add_argument("--markdown", action="store_true", help="print a section for docs/benchmarks.md")
    g = sub.add_parser("loggers", help="what train.loggers cost: the time spent in the loggers' calls during a run, "
                                       "as a share of the run")
    g.add_argument("config", help="a detection config (e.g. configs/faster_rcnn_tiny_fpn_synth.yaml)")
    g.add_argument("--loggers", default="tensorboard,csv", help="comma-separated loggers beside log.jsonl")
    g.add_argument("--iters", type=int, default=400, help="training iterations (no evaluation, no checkpoints)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    g.add_argument("--work-dir", default="work_dirs/logger_benchmark", help="the run's train.work_dir (replaced)")
    return p


def loggers(args) -> int:
    """Time every call of the run's loggers (``training.loggers.Loggers``) around a ``detkit.train`` call."""
    import json
    import time

    import detkit
    from detkit.training import loggers as logging_module

    spent = {"seconds": 0.0, "calls": 0}
    originals = {name: getattr(logging_module.Loggers, name) for name in ("log_scalars", "log_images", "log_config")}
    for name, original in originals.items():

        def timed(self, *a, _original=original, **k):
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                spent["seconds"] += time.perf_counter() - start
                spent["calls"] += 1

        setattr(logging_module.Loggers, name, timed)
    chosen = [{"name": n.strip()} for n in args.loggers.split(",") if n.strip()]
    overrides = [*args.set, f"train.max_iters={args.iters}", f"train.work_dir={args.work_dir}",
                 "train.eval_at_end=false", "train.checkpoint_period=0", f"train.loggers={json.dumps(chosen)}"]
    try:
        cfg = detkit.load_config(args.config, overrides)
        start = time.perf_counter()
        detkit.train(cfg, overwrite=True, progress=False)
        total = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(logging_module.Loggers, name, original)
    print(json.dumps({"config": args.config, "loggers": ["jsonl", *(c["name"] for c in chosen)], "iters": args.iters,
                      "log_period": cfg.train.log_period, "train_seconds": round(total, 2),
                      "logger_seconds": round(spent["seconds"], 4), "logger_calls": spent["calls"],
                      "share_percent": round(100 * spent["seconds"] / total, 4)}))
    return 0


def export(args) -> int:
    import torch

    from detkit.benchmarks import export as export_benchmark
    from detkit.cli.common import _registries

    registries = _registries(report=False)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    results = []
    for i, source in enumerate(args.models):
        model, cfg, names, untrained = _pipeline_model(source, args.set, registries, torch.device("cpu"), None)
        results.append(export_benchmark.run(model, cfg, names, not untrained, source, registries,
                                     os.path.join(args.out, str(i)), formats, args.images, args.timed,
                                     iters=args.iters))
        print(json.dumps(results[-1], indent=1))
    if args.markdown:
        print(export_benchmark.markdown(results, "python tools/benchmark.py " + " ".join(args.argv)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    return 0


def _pipeline_model(path: str, overrides: list[str], registries, device, class_names: list[str] | None):
    """``(model, cfg, class_names, untrained)`` for a checkpoint, or for a .yaml config (random weights;
    its classes are ``class_names`` when given, else its data.test's)."""
    import torch

    from detkit.config import load_config
    from detkit.data.loading import build_dataset
    from detkit.models.assembly import build_detector
    from detkit.models.loading import model_from_checkpoint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or config file")
    if not path.endswith((".yaml", ".yml")):
        model, cfg, ckpt = model_from_checkpoint(path, registries, device)
        return model, cfg, list(ckpt["class_names"]), False
    cfg = load_config(path, overrides)
    if class_names is None:
        class_names = list(build_dataset(cfg.data.test, registries, "data.test").class_names)
    model = build_detector(cfg.model, registries, len(class_names), class_names)
    for module in model.modules():
        # Post-hoc SVMs and ridge regressors (R-CNN, SPP-net) refuse to score before their stage has run;
        # zero weights marked fitted do the same arithmetic as trained ones, which is all that is timed here.
        # (Zero margins pass the -1 score threshold, so every window reaches NMS: post time is an upper bound.)
        for flag in ("fitted", "regressor_fitted"):
            if isinstance(getattr(module, flag, None), torch.Tensor):
                getattr(module, flag).fill_(True)
    return model.to(device).eval(), cfg, class_names, True


def pipelines(args: argparse.Namespace) -> int:
    import copy
    import tempfile

    import torch

    from detkit.benchmarks.common import machine
    from detkit.benchmarks.pipeline import subset, timing_table
    from detkit.data.synth import synthesize
    from detkit.data.loading import build_dataset
    from detkit.engine.devices import resolve_device
    from detkit.models.svd import compress_fully_connected
    from detkit.plugins import get_registries

    specs = []
    for spec in args.checkpoints:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            print(f"{spec!r}: expected NAME=CHECKPOINT or NAME=CONFIG.yaml", file=sys.stderr)
            return 2
        if not os.path.isfile(path):
            print(f"{spec!r}: {path} is not a file", file=sys.stderr)
            return 2
        specs.append((name, path))
    if args.images < 1 or args.warmup < 0:
        print(f"--images {args.images} / --warmup {args.warmup}: expected images >= 1, warmup >= 0", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    registries = get_registries()
    with tempfile.TemporaryDirectory(prefix="detkit-pipelines-") as tmp:
        dataset = None
        if args.synthetic:
            synthesize(tmp, "coco", args.images, seed=0, image_size=args.synthetic)
            dataset = build_dataset({"name": "coco", "images": f"{tmp}/images",
                                     "annotations": f"{tmp}/annotations.json"}, registries, "--synthetic")
        rows = []
        for name, path in specs:
            names = list(dataset.class_names) if dataset is not None else None
            model, cfg, model_names, untrained = _pipeline_model(path, args.set, registries, device, names)
            if dataset is None:
                dataset = build_dataset(cfg.data.test, registries, "test")
            elif model_names != list(dataset.class_names):
                print(f"{path}: classes {model_names} differ from the test images' {list(dataset.class_names)}",
                      file=sys.stderr)
                return 2
            indices = list(range(min(args.images, len(dataset))))
            scored = subset(dataset, indices)
            variants = [(name, model)]
            if args.svd:
                fc_model = copy.deepcopy(model)
                try:
                    compress_fully_connected(fc_model.svd_layers(), [int(r) for r in args.svd.split(",")])
                    variants.append((f"{name} + SVD", fc_model))
                except ValueError as exc:
                    print(f"{name}: no SVD row ({exc})", file=sys.stderr)
            for label, m in variants:
                rows.append(_pipeline_row(label, path, m, dataset, scored, indices, device, args, untrained))
            del model, variants, m
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\nMachine: {machine()}; {len(indices)} images of {dataset.source}; device {device}; "
          f"amp {args.amp}.\n")
    print(timing_table(rows))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "device": str(device), "images": len(indices),
                       "amp": args.amp, "rows": rows}, fh, indent=1)
    return 0


def _pipeline_row(label, path, model, dataset, scored, indices, device, args, untrained) -> dict:
    """Time ``model`` on ``indices`` and score its detections (untrained models are timed only)."""
    from detkit.evaluation import score_results
    from detkit.evaluation import detections_to_coco_results
    from detkit.benchmarks.pipeline import time_detector

    timing = time_detector(model, dataset, indices, device, warmup=args.warmup, amp=args.amp)
    row = {"name": label, "checkpoint": path, "seconds": timing["seconds"], "untrained": untrained}
    ap = "untrained: no AP"
    if not untrained:
        results = []
        for det in timing["detections"]:
            results.extend(detections_to_coco_results(det["image_id"], det, list(dataset.cat_ids)))
        metrics = score_results(scored.to_coco(), results, "coco", class_names=list(dataset.class_names))
        row |= {"map50": metrics["AP50"], "map": metrics["AP"]}
        ap = f"AP50 {metrics['AP50']:.3f}, AP {metrics['AP']:.3f}"
    s = timing["seconds"]
    print(f"{label}: proposals {s['proposal'] * 1e3:.1f} ms, conv {s['conv'] * 1e3:.1f} ms, region-wise "
          f"{s['region'] * 1e3:.1f} ms (RoI head {s['roi_head'] * 1e3:.1f}, post {s['post'] * 1e3:.1f}), "
          f"total {s['total'] * 1e3:.1f} ms; {ap}", flush=True)
    return row


def faster_rcnn(args: argparse.Namespace) -> int:
    import torch

    from detkit.benchmarks import torchvision_parity as parity
    from detkit.benchmarks.common import load_average, machine
    from detkit.benchmarks.torchvision_pair import Setup, pyramid_in_strides
    from detkit.config import ConfigError
    from detkit.engine.devices import resolve_device
    from detkit.plugins import get_registries

    device = resolve_device(args.device)
    registries = get_registries()
    names = [n.strip() for n in args.backbone.split(",") if n.strip()]
    for name in names:
        if name not in registries.backbones:
            print(f"--backbone: {name!r} is not a registered backbone", file=sys.stderr)
            return 2
        if args.neck:
            try:
                pyramid_in_strides(name, registries)
            except ValueError as exc:
                print(f"--backbone {name} --neck {args.neck}: {exc}", file=sys.stderr)
                return 2
    if args.iters < 1 or args.warmup < 0 or args.train_batch < 1:
        print(f"--iters {args.iters} / --warmup {args.warmup} / --train-batch {args.train_batch}: expected "
              f"iters >= 1, warmup >= 0, train batch >= 1", file=sys.stderr)
        return 2
    tuned = None
    if args.tuned_set or args.tuned_channels_last or args.tuned_compile:
        tuned = parity.Tuned(tuple(args.tuned_set), args.tuned_channels_last, args.tuned_compile)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    results = []
    for name in names:
        setup = Setup(backbone=name, image_size=args.image_size, anchors=args.anchors, neck=args.neck)
        try:
            r = parity.run(setup, registries, device, tuple(args.batch_sizes), args.train_batch, args.warmup,
                              args.iters, args.amp, args.channels_last, args.compile, tuned)
        except ConfigError as exc:
            print(f"--tuned-set: {exc}", file=sys.stderr)
            return 2
        results.append(r)
        inference = ", ".join(f"b{bs} {v['detkit']:.2f} vs {v['torchvision']:.2f} img/s (ratio {v['ratio']:.2f}"
                              + (f"; tuned {v['tuned']:.2f}, ratio {v['tuned_ratio']:.2f})" if tuned else ")")
                              for bs, v in r["inference"].items())
        t = r["train"]
        print(f"{parity.model_name(r['setup'])}: inference {inference}; train {t['detkit']:.2f} vs "
              f"{t['torchvision']:.2f} it/s (ratio {t['ratio']:.2f}); peak memory MiB {r['memory']}; agreement {r['agreement']}", flush=True)
    loader_ips = None
    if not args.no_loader:
        loader_ips = parity.loader_throughput(registries, image_size=args.image_size)
        step_ips = args.train_batch * results[0]["train"]["detkit"]
        print(f"data loader: {loader_ips:.1f} images/s; detkit training step consumes {step_ips:.1f} images/s")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "load_average": load_average(),
                       "results": results, "loader_images_per_s": loader_ips}, fh, indent=1)
    if args.markdown:
        print(parity.markdown(results, loader_ips, "python tools/benchmark.py " + " ".join(args.argv)))
    return 0


def pretrain(args: argparse.Namespace) -> int:
    from detkit.benchmarks.pretrain import load_benchmark_config, run_pretrain_benchmark, table
    from detkit.config import ConfigError
    from detkit.data.dataset import DatasetError
    from detkit.plugins import get_registries

    if args.iters < 1 or args.warmup < 0 or args.runs < 1:
        print(f"--iters {args.iters} / --warmup {args.warmup} / --runs {args.runs}: expected iters >= 1, "
              f"warmup >= 0, runs >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_benchmark_config(args.config, args.set, args.device)
        result = run_pretrain_benchmark(cfg, get_registries(), args.iters, args.warmup, args.runs)
    except (ConfigError, DatasetError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"pretrain: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    return {"faster_rcnn": faster_rcnn, "pipelines": pipelines, "pretrain": pretrain,
            "export": export, "loggers": loggers}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
