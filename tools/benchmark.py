#!/usr/bin/env python
"""Benchmarks. `python tools/benchmark.py faster_rcnn --help`.

faster_rcnn: detkit's Faster R-CNN against torchvision's FasterRCNN built around the same modules and
weights, timed in the same process (see detkit/benchmark.py). Prints ratios detkit / torchvision.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv=None) -> int:
    import torch

    from detkit import benchmark
    from detkit.engine import resolve_device
    from detkit.plugins import get_registries

    parser = argparse.ArgumentParser(prog="tools/benchmark.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("faster_rcnn", help="detkit vs torchvision Faster R-CNN, same weights and settings")
    p.add_argument("--backbone", action="append", help="registered backbone (repeatable; default tiny)")
    p.add_argument("--image-size", default="240x320", help="HxW")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--loader", action="store_true", help="also measure data-loader throughput")
    p.add_argument("--output", help="write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="print a table for docs/benchmarks.md")
    args = parser.parse_args(argv)

    h, w = (int(v) for v in args.image_size.split("x"))
    device = resolve_device(args.device)
    registries = get_registries()
    results = []
    for name in args.backbone or ["tiny"]:
        setup = benchmark.Setup(backbone=name, image_size=(h, w))
        r = benchmark.run(setup, registries, device, [int(b) for b in args.batch_sizes.split(",")],
                          args.train_batch, args.warmup, args.repeats, args.amp, args.channels_last)
        results.append(r)
        print(f"{name}: inference " + ", ".join(f"b{bs} {v['detkit']:.2f} vs {v['torchvision']:.2f} img/s "
                                               f"(ratio {v['ratio']:.2f})" for bs, v in r["inference"].items())
              + f"; train {r['train']['detkit']:.2f} vs {r['train']['torchvision']:.2f} it/s "
                f"(ratio {r['train']['ratio']:.2f})" + (f"; peak MiB {r['memory']}" if r["memory"] else ""))
    loader_ips = benchmark.loader_throughput(registries, image_size=(h, w)) if args.loader else None
    if loader_ips is not None:
        step = 1.0 / results[0]["train"]["detkit"]
        print(f"data loader: {loader_ips:.1f} images/s; model step at batch {args.train_batch}: "
              f"{args.train_batch / step:.1f} images/s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"machine": benchmark.machine(), "results": results, "loader_images_per_s": loader_ips}, f,
                      indent=1)
    if args.markdown:
        print(benchmark.markdown(results, loader_ips, "python tools/benchmark.py " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
