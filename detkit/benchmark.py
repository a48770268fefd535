"""Speed of detkit's Faster R-CNN against torchvision's, on the same work, in the same process.

Both detectors are built around the *same modules and weights*: torchvision's ``FasterRCNN`` receives
detkit's trunk as its backbone and detkit's RoI head as its box head, and copies of detkit's RPN head and
box predictor; anchors, image sizes, proposal counts, RoI sampling, RoIAlign (output size, sampling
ratio) and postprocessing thresholds are set alike. detkit's paper-specific defaults that torchvision
does not have are switched to torchvision's behaviour for the comparison (cross-boundary anchors kept,
background RoIs from IoU 0, RPN minimum box size 1e-3). Remaining differences: torchvision centres
anchors on cell corners and rounds them; detkit centres them on cell centres.

Timings are medians of repeated runs after warm-up, with detkit and torchvision runs interleaved so that
background load affects both alike. Ratios are detkit / torchvision throughput (> 1: detkit faster).
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from detkit.config import ModelConfig
from detkit.models.detector import build_detector


@dataclass
class Setup:
    backbone: str = "tiny"
    image_size: tuple[int, int] = (240, 320)
    num_classes: int = 5
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0)
    roi_output_size: int = 7
    sampling_ratio: int = 2


def detkit_config(setup: Setup) -> ModelConfig:
    cfg = ModelConfig()
    cfg.backbone.name = setup.backbone
    cfg.anchors.sizes = list(setup.anchor_sizes)
    cfg.roi_extractor.name = "roi_align"
    cfg.roi_extractor.output_size = setup.roi_output_size
    cfg.roi_extractor.sampling_ratio = setup.sampling_ratio
    h, w = setup.image_size
    cfg.transform.min_size, cfg.transform.max_size = min(h, w), max(h, w)
    cfg.rpn.straddle_thresh = -1.0
    cfg.rpn.min_size = 1e-3
    cfg.roi_head.bg_iou_thresh_lo = 0.0
    cfg.roi_head.nms_thresh = 0.5
    return cfg


class _Trunk(nn.Module):
    def __init__(self, trunk: nn.Module, out_channels: int):
        super().__init__()
        self.body = trunk
        self.out_channels = out_channels

    def forward(self, x):
        return self.body(x)


def build_pair(setup: Setup, registries) -> tuple[nn.Module, nn.Module]:
    """detkit's detector and a torchvision FasterRCNN sharing its weights."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    cfg = detkit_config(setup)
    ours = build_detector(cfg, registries, setup.num_classes)
    rpn, heads, tf = ours.proposal_generator, ours.roi_heads, ours.transform
    in_channels = rpn.head.conv.in_channels
    num_anchors = rpn.anchor_generator.num_anchors_per_location
    rpn_head = RPNHead(in_channels, num_anchors)
    rpn_head.conv[0][0].load_state_dict(rpn.head.conv.state_dict())
    rpn_head.cls_logits.load_state_dict(rpn.head.cls_logits.state_dict())
    rpn_head.bbox_pred.load_state_dict(rpn.head.bbox_pred.state_dict())
    predictor = FastRCNNPredictor(heads.predictor.cls_score.in_features, setup.num_classes + 1)
    predictor.load_state_dict({k: v for k, v in heads.predictor.state_dict().items()})
    # torchvision orders a location's anchors ratio-major, like detkit.
    anchors = AnchorGenerator(sizes=(tuple(int(s) for s in cfg.anchors.sizes),),
                              aspect_ratios=(tuple(cfg.anchors.aspect_ratios),))
    r, h = cfg.rpn, cfg.roi_head
    theirs = FasterRCNN(
        _Trunk(ours.trunk, in_channels), num_classes=None, min_size=tf.min_sizes[-1], max_size=tf.max_size,
        image_mean=tf.mean.flatten().tolist(), image_std=tf.std.flatten().tolist(),
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train, rpn_pre_nms_top_n_test=r.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train, rpn_post_nms_top_n_test=r.post_nms_top_n_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], setup.roi_output_size, setup.sampling_ratio),
        box_head=heads.box_head, box_predictor=predictor, box_score_thresh=h.score_thresh,
        box_nms_thresh=h.nms_thresh, box_detections_per_img=h.detections_per_img, box_fg_iou_thresh=h.fg_iou_thresh,
        box_bg_iou_thresh=h.bg_iou_thresh_hi, box_batch_size_per_image=h.batch_size_per_image,
        box_positive_fraction=h.positive_fraction, bbox_reg_weights=tuple(h.box_coder_weights))
    # torchvision pads to a multiple of 32; detkit to its stride: pad alike so the trunk sees the same sizes.
    theirs.transform.size_divisible = tf.size_divisible
    return ours, theirs


def synthetic_batch(setup: Setup, n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = setup.image_size
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 20 + torch.rand(4, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, setup.num_classes + 1, (4,), generator=g).to(device)})
    return images, targets


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, amp: str):
    import contextlib

    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def time_pair(fns: dict, warmup: int, repeats: int, device) -> dict[str, float]:
    """Median seconds per call of each function; calls interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run(setup: Setup, registries, device: torch.device, batch_sizes=(1, 8), train_batch: int = 2,
        warmup: int = 2, repeats: int = 5, amp: str = "none", channels_last: bool = False) -> dict:
    torch.manual_seed(0)
    ours, theirs = build_pair(setup, registries)
    ours.to(device)
    theirs.to(device)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
        ours.channels_last = True
    result: dict = {"setup": setup.__dict__ | {"device": str(device), "amp": amp}, "inference": {}, "memory": {}}
    ours.eval()
    theirs.eval()
    for bs in batch_sizes:
        images, _ = synthetic_batch(setup, bs, device)

        def infer(model, images=images):
            with torch.no_grad(), _autocast(device, amp):
                model(images)

        t = time_pair({"detkit": lambda: infer(ours), "torchvision": lambda: infer(theirs)}, warmup, repeats, device)
        result["inference"][bs] = {k: bs / v for k, v in t.items()}
        result["inference"][bs]["ratio"] = result["inference"][bs]["detkit"] / result["inference"][bs]["torchvision"]

    images, targets = synthetic_batch(setup, train_batch, device, seed=1)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    ours.train()
    theirs.train()

    def step(model, opt):
        with _autocast(device, amp):
            losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    # Both share trunk and RoI head weights, so the steps move the same tensors; speed is what is compared.
    t = time_pair({"detkit": lambda: step(ours, opt_ours), "torchvision": lambda: step(theirs, opt_theirs)},
                  warmup, repeats, device)
    result["train"] = {k: 1.0 / v for k, v in t.items()}
    result["train"]["ratio"] = result["train"]["detkit"] / result["train"]["torchvision"]
    if device.type == "cuda":
        for name, model, opt in (("detkit", ours, opt_ours), ("torchvision", theirs, opt_theirs)):
            torch.cuda.reset_peak_memory_stats(device)
            step(model, opt)
            _sync(device)
            result["memory"][name] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def loader_throughput(registries, num_images: int = 64, num_workers: int = 2, batch_size: int = 2,
                      image_size=(240, 320), batches: int = 30) -> float:
    """Images per second through detkit's training data pipeline (decode, flip, collate) on synthetic data."""
    import tempfile

    from detkit.data import build_transform
    from detkit.data.synth import synthesize
    from detkit.engine import StreamBatchSampler, _PositionSeeded, build_dataset, to_tensor_batch

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, "coco", num_images, seed=0, image_size=image_size)
        ds = build_dataset({"name": "coco", "images": f"{tmp}/images", "annotations": f"{tmp}/annotations.json"},
                           registries, "benchmark", transform=build_transform(True, 0.5))
        loader = torch.utils.data.DataLoader(_PositionSeeded(ds), batch_sampler=StreamBatchSampler(
            list(range(len(ds))), batch_size, 0), num_workers=num_workers, collate_fn=to_tensor_batch)
        it = iter(loader)
        next(it)  # workers started
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch_size / (time.perf_counter() - t)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def markdown(results: list[dict], loader_ips: float | None, command: str) -> str:
    lines = [f"Machine: {machine()}", "", f"Command: `{command}`", "",
             "| backbone | image | device | amp | infer b1 img/s (detkit / tv / ratio) | "
             "infer b8 img/s (detkit / tv / ratio) | train it/s (detkit / tv / ratio) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["setup"]
        cells = []
        for bs in (1, 8):
            inf = r["inference"].get(bs)
            cells.append(f"{inf['detkit']:.2f} / {inf['torchvision']:.2f} / **{inf['ratio']:.2f}**" if inf else "-")
        tr = r["train"]
        lines.append(f"| {s['backbone']} | {s['image_size'][0]}x{s['image_size'][1]} | {s['device']} | {s['amp']} | "
                     f"{cells[0]} | {cells[1]} | {tr['detkit']:.2f} / {tr['torchvision']:.2f} / **{tr['ratio']:.2f}** |")
    if loader_ips is not None:
        lines += ["", f"Data loader (synthetic COCO, decode + flip + collate, 2 workers): {loader_ips:.1f} images/s."]
    return "\n".join(lines)
