"""The IoU of each stage's training samples for a trained cascade (the paper's Fig. 4).

    python -m detkit_cascade.stats CHECKPOINT [--data ANNOTATIONS.json] [--num-images N] [--device cpu]

Runs the checkpoint's detector as training runs it (proposals at the training top-N, each stage sampling from
the refined boxes of the one before, batch norm kept in inference mode, no gradient, nothing written) on the
first N images of ``--data`` (default: the checkpoint's ``data.train``) and prints, per stage, the share of its
sampled boxes (the added ground truth left out) at IoU >= 0.5 ... 0.9 with their best ground truth, and its
positives per image, as a markdown table.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from detkit.config import ConfigError
from detkit.data.dataset import DatasetError
from detkit.data.images import to_chw_tensor
from detkit.data.loading import build_dataset, dataset_from_path
from detkit.engine.checkpoint import CheckpointError
from detkit.engine.devices import resolve_device
from detkit.models.loading import model_from_checkpoint
from detkit.plugins import get_registries

from .heads import IOU_MARKS, CascadeRoIHeads


@torch.no_grad()
def stage_statistics(model: nn.Module, dataset, num_images: int, device: torch.device) -> list[dict]:
    """``CascadeRoIHeads.stage_statistics()`` over the training samples of the first ``num_images`` images."""
    heads = model.roi_heads
    heads.cfg.stats_period = 0  # count, do not log
    heads.stage_counts.zero_()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        model([to_chw_tensor(image, device)], [{"boxes": target["boxes"].to(device),
                                                "labels": target["labels"].to(device), "sample_seed": i}])
    return heads.stage_statistics()


def markdown(rows: list[dict]) -> str:
    head = ["stage", "IoU threshold", *[f"IoU >= {m:g}" for m in IOU_MARKS], "positives / image"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        shares = [f"{100 * r[f'iou>={m:g}']:.1f}%" for m in IOU_MARKS]
        lines.append(f"| {r['stage']} | {r['iou_threshold']:g} | " + " | ".join(shares)
                     + f" | {r['positives_per_image']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detkit_cascade.stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a cascade_rcnn checkpoint (final.pth)")
    parser.add_argument("--data", help="COCO annotations (images in images/ beside them); default: the "
                                       "checkpoint's data.train")
    parser.add_argument("--num-images", type=int, default=200, help="images to sample from (default 200)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.num_images < 1:
            raise ConfigError(f"--num-images {args.num_images}: expected a positive number")
        registries = get_registries()
        device = resolve_device(args.device)
        model, cfg, _ = model_from_checkpoint(args.checkpoint, registries, device)
        if not isinstance(model.roi_heads, CascadeRoIHeads):
            raise ConfigError(f"{args.checkpoint}: a {cfg.model.detector.name} checkpoint, not cascade_rcnn")
        spec = cfg.data.train
        if args.data:
            spec = dataset_from_path(args.data, registries.datasets, {})
            if spec is None:
                raise ConfigError(f"--data {args.data}: expected a COCO annotation file (.json)")
        dataset = build_dataset(spec, registries, "train")
    except (ConfigError, CheckpointError, DatasetError, OSError) as exc:
        print(f"detkit_cascade.stats: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(stage_statistics(model, dataset, args.num_images, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
