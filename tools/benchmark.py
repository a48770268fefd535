#!/usr/bin/env python
"""Benchmarks: ``python tools/benchmark.py faster_rcnn --help``.

faster_rcnn: detkit's Faster R-CNN against torchvision's FasterRCNN built around the same modules and
weights, timed in the same process with interleaved runs (see detkit/benchmark.py). Prints throughputs
and ratios detkit / torchvision (> 1: detkit faster); ``--markdown`` prints a docs/benchmarks.md section.
pipelines: R-CNN, SPP-net, Fast R-CNN and Faster R-CNN checkpoints on the same test images: proposal,
convolution, region-wise and total time per image and mAP, in the form of the Faster R-CNN paper's
timing table (see detkit/pipeline_benchmark.py).
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
    f.add_argument("--anchors", choices=["torchvision", "detkit"], default="torchvision",
                   help="torchvision's stock anchors (default) or detkit's cell-centred ones in both")
    f.add_argument("--no-loader", action="store_true", help="skip the data-loader throughput measurement")
    f.add_argument("--output", help="write the results as JSON to this path")
    f.add_argument("--markdown", action="store_true", help="print a section for docs/benchmarks.md")
    q = sub.add_parser("pipelines", help="R-CNN / SPP-net / Fast R-CNN / Faster R-CNN timing and mAP table")
    q.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT",
                   help="e.g. R-CNN=work_dirs/rcnn/final.pth (order of the table's rows)")
    q.add_argument("--images", type=int, default=20, help="test images timed and scored (the first N)")
    q.add_argument("--svd", nargs="?", const="1024,256", metavar="RANKS",
                   help="add a truncated-SVD row for every model with fully connected RoI-head layers")
    q.add_argument("--device", default="auto")
    q.add_argument("--output", help="write the results as JSON to this path")
    return p


def pipelines(args: argparse.Namespace) -> int:
    import copy

    from detkit import benchmark
    from detkit.engine import build_dataset, model_from_checkpoint, resolve_device, score_results
    from detkit.evaluation import detections_to_coco_results
    from detkit.models.svd import compress_fully_connected
    from detkit.pipeline_benchmark import markdown_table, subset, time_detector
    from detkit.plugins import get_registries

    device = resolve_device(args.device)
    registries = get_registries()
    rows, dataset, indices = [], None, None
    for spec in args.checkpoints:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            print(f"{spec!r}: expected NAME=CHECKPOINT", file=sys.stderr)
            return 2
        model, cfg, ckpt = model_from_checkpoint(path, registries, device)
        if dataset is None:
            dataset = build_dataset(cfg.data.test, registries, "test")
            indices = list(range(min(args.images, len(dataset))))
            scored = subset(dataset, indices)
        elif list(dataset.class_names) != list(ckpt["class_names"]):
            print(f"{path}: classes {ckpt['class_names']} differ from the first checkpoint's", file=sys.stderr)
            return 2
        variants = [(name, model)]
        if args.svd:
            fc_model = copy.deepcopy(model)
            try:
                compress_fully_connected(fc_model.roi_heads.box_head, [int(r) for r in args.svd.split(",")])
                variants.append((f"{name} + SVD", fc_model))
            except ValueError as exc:
                print(f"{name}: no SVD row ({exc})", file=sys.stderr)
        for label, m in variants:
            timing = time_detector(m, dataset, indices, device)
            results = []
            for det in timing["detections"]:
                results.extend(detections_to_coco_results(det["image_id"], det, list(dataset.cat_ids)))
            metrics = score_results(scored.to_coco(), results, "coco", class_names=list(dataset.class_names))
            rows.append({"name": label, "checkpoint": path, "seconds": timing["seconds"],
                         "map50": metrics["AP50"], "map": metrics["AP"]})
            s = timing["seconds"]
            print(f"{label}: proposals {s['proposal'] * 1e3:.0f} ms, conv {s['conv'] * 1e3:.0f} ms, region-wise "
                  f"{s['region'] * 1e3:.0f} ms, total {s['total'] * 1e3:.0f} ms; AP50 {metrics['AP50']:.3f}, "
                  f"AP {metrics['AP']:.3f}", flush=True)
    print(f"\nMachine: {benchmark.machine()}; {len(indices)} images of {dataset.source}; device {device}.\n")
    print(markdown_table(rows))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"machine": benchmark.machine(), "device": str(device), "images": len(indices),
                       "rows": rows}, fh, indent=1)
    return 0


def faster_rcnn(args: argparse.Namespace) -> int:
    import torch

    from detkit import benchmark
    from detkit.engine import resolve_device
    from detkit.plugins import get_registries

    device = resolve_device(args.device)
    registries = get_registries()
    names = [n.strip() for n in args.backbone.split(",") if n.strip()]
    for name in names:
        if name not in registries.backbones:
            print(f"--backbone: {name!r} is not a registered backbone", file=sys.stderr)
            return 2
    if args.iters < 1 or args.warmup < 0 or args.train_batch < 1:
        print(f"--iters {args.iters} / --warmup {args.warmup} / --train-batch {args.train_batch}: expected "
              f"iters >= 1, warmup >= 0, train batch >= 1", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = device.type == "cuda"
    results = []
    for name in names:
        setup = benchmark.Setup(backbone=name, image_size=args.image_size, anchors=args.anchors)
        r = benchmark.run(setup, registries, device, tuple(args.batch_sizes), args.train_batch, args.warmup,
                          args.iters, args.amp, args.channels_last)
        results.append(r)
        inference = ", ".join(f"b{bs} {v['detkit']:.2f} vs {v['torchvision']:.2f} img/s (ratio {v['ratio']:.2f})"
                              for bs, v in r["inference"].items())
        t = r["train"]
        print(f"{name}: inference {inference}; train {t['detkit']:.2f} vs {t['torchvision']:.2f} it/s "
              f"(ratio {t['ratio']:.2f}); peak memory MiB {r['memory']}; agreement {r['agreement']}", flush=True)
    loader_ips = None
    if not args.no_loader:
        loader_ips = benchmark.loader_throughput(registries, image_size=args.image_size)
        step_ips = args.train_batch * results[0]["train"]["detkit"]
        print(f"data loader: {loader_ips:.1f} images/s; detkit training step consumes {step_ips:.1f} images/s")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"machine": benchmark.machine(), "load_average": benchmark.load_average(),
                       "results": results, "loader_images_per_s": loader_ips}, fh, indent=1)
    if args.markdown:
        print(benchmark.markdown(results, loader_ips, "python tools/benchmark.py " + " ".join(args.argv)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    return {"faster_rcnn": faster_rcnn, "pipelines": pipelines}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
