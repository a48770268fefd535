"""Speed of detkit's Faster R-CNN (Ren et al. 2015) against torchvision's, on the same work, in one process.

Both detectors are built around the *same modules and weights*: torchvision's ``FasterRCNN`` receives
detkit's trunk as its backbone and detkit's RoI head (fc6/fc7, res5, ...) as its box head, and copies of
detkit's RPN head (Sec. 3.1) and box predictor (Fast R-CNN Sec. 2.2); anchor sizes and ratios, image sizes,
proposal counts (Sec. 3.3), anchor and RoI sampling, RoIAlign (output size, sampling ratio), box coder
weights and postprocessing thresholds are set alike. Where detkit's defaults follow the paper and
torchvision does not, detkit is switched to torchvision's behaviour for the comparison: cross-boundary
anchors kept in RPN training, background RoIs from IoU 0 (not 0.1), RPN minimum box size 1e-3 pixels.

With ``Setup.neck == "fpn"`` both are R50-FPN-style Faster R-CNNs (Lin et al. 2017, as torchvision's
``fasterrcnn_resnet50_fpn``): detkit's trunk is then its backbone's stages and an FPN reading the backbone's
maps at strides 4-32 (C2-C5; tiny stops at C4) with one extra max-pooled level, P2-P6, which torchvision
receives as ``{"0": P2, ..., "pool": P6}``; the box head is the two 1024-d fully connected layers on 7x7
RoIAlign grids, shared as above; the RPN has one anchor size per level, and with ``Setup.anchors ==
"torchvision"`` detkit places them as torchvision does (centres on cell corners, rounded cell anchors), so
detections agree to float precision. Images are padded to the coarsest level's stride in both (64 when P6
follows a stride-32 C5, not torchvision's 32): torchvision infers a level's anchor stride as padded size //
map size, which is exact only then (an odd P5 would give P6 anchors a stride of e.g. 60).

Known remaining differences (``Setup.anchors == "torchvision"``, the default and what is timed): without a
neck, torchvision puts anchor centres on cell corners ``(i * stride)`` and rounds the cell anchors to whole
pixels; detkit centres them in the cell ``((i + 0.5) * stride)`` and keeps fractions. With equal head
outputs the proposals are therefore shifted by half a stride, and detections differ accordingly.
``Setup.anchors == "detkit"`` gives torchvision detkit's anchors, after which proposals and detections
agree to float precision (see :func:`agreement`). With or without a neck, torchvision also ranks RPN
proposals by sigmoid probability rather than logit (same order, except ties where float32 saturates) and
regenerates its anchors on every call, where detkit caches them per feature-map size.

Timings are medians of repeated runs after warm-up; detkit and torchvision runs are interleaved in
ABBA order so that background load and cache effects hit both alike. Ratios are detkit / torchvision
throughput (> 1: detkit faster).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import MultiScaleRoIAlign, box_iou

from detkit.config import Config, ConfigError, ModelConfig, PartConfig, apply_overrides, from_dict, to_dict
from detkit.devices import autocast
from detkit.models.assembly import build_backbone, build_detector
from detkit.models.roi_heads import SoftmaxBoxHead

MODELS = ("detkit", "torchvision")


@dataclass
class Setup:
    """What both detectors are built for.

    image_size: ``(H, W)`` of the synthetic images; the transform keeps them at that size (min_size = the
        shorter side, max_size = the longer).
    anchor_sizes: anchor sides in pixels, one per pyramid level with a neck; None: :func:`anchor_sizes`.
    roi_output_size: RoIAlign grid side; None: the backbone's (7 for VGG and tiny, 14 for ResNet C4), 7
        with a neck.
    anchors: ``"torchvision"`` (its stock corner-centred, rounded anchors in torchvision: what is timed;
        with a neck detkit places its anchors so too) or ``"detkit"`` (torchvision given detkit's
        cell-centred anchors, for an exact agreement check).
    neck: None (the trunk's one map) or ``"fpn"`` (P2-P6, a two-fc box head).
    """

    backbone: str = "tiny"
    image_size: tuple[int, int] = (240, 320)
    num_classes: int = 5
    anchor_sizes: tuple[float, ...] | None = None
    roi_output_size: int | None = None
    sampling_ratio: int = 2
    anchors: str = "torchvision"
    neck: str | None = None

    def __post_init__(self):
        if self.anchors not in ("torchvision", "detkit"):
            raise ValueError(f"Setup.anchors: expected 'torchvision' or 'detkit', got {self.anchors!r}")
        if self.neck not in (None, "fpn"):
            raise ValueError(f"Setup.neck: expected None or 'fpn', got {self.neck!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"Setup.image_size: expected (H, W) with both >= 16, got {self.image_size!r}")


#: Anchor sides on one map: smaller than the paper's 128-512 (for 600-pixel images) since the images are small.
SINGLE_MAP_ANCHOR_SIZES = (32.0, 64.0, 128.0, 256.0)
#: FPN's anchor side on P2, doubling level to level: half the FPN paper's 32 (for 800-pixel images), likewise.
PYRAMID_FIRST_ANCHOR_SIZE = 16.0
#: torchvision's fasterrcnn_resnet50_fpn: FPN width, extra max-pooled levels (P6), box head width, RoI grid.
FPN_CHANNELS, FPN_EXTRA_LEVELS, TWO_FC_DIM, FPN_ROI_OUTPUT_SIZE = 256, 1, 1024, 7


def pyramid_in_strides(backbone: str, registries) -> list[int]:
    """The strides 4-32 at which ``backbone``'s feature stages have maps, increasing: what the FPN reads
    (C2-C5; ``[4, 8, 16]`` for tiny, which stops at stride 16). Raises ValueError for a backbone without
    feature stages or without such maps."""
    cfg = ModelConfig()
    cfg.backbone.name = backbone
    try:
        stages = build_backbone(cfg, registries).feature_stages()
    except NotImplementedError as exc:
        raise ValueError(f"benchmark: neck 'fpn' needs feature stages, and backbone {backbone!r} has none "
                         f"({exc})") from None
    strides = sorted({info.stride for info in stages.info if 4 <= info.stride <= 32})
    if not strides:
        raise ValueError(f"benchmark: neck 'fpn': backbone {backbone!r} has no map at strides 4-32 (its strides: "
                         f"{sorted({info.stride for info in stages.info})})")
    return strides


def anchor_sizes(setup: Setup, levels: int) -> tuple[float, ...]:
    """``setup.anchor_sizes``, or by default :data:`SINGLE_MAP_ANCHOR_SIZES` on one map and one size per
    level of a pyramid of ``levels`` maps, :data:`PYRAMID_FIRST_ANCHOR_SIZE` on the finest, doubling."""
    if setup.anchor_sizes is not None:
        return tuple(float(s) for s in setup.anchor_sizes)
    if setup.neck is None:
        return SINGLE_MAP_ANCHOR_SIZES
    return tuple(PYRAMID_FIRST_ANCHOR_SIZE * 2**k for k in range(levels))


def detkit_config(setup: Setup, in_strides: list[int] | None = None) -> ModelConfig:
    """detkit's model config for ``setup``, with torchvision's behaviour where the two differ.

    in_strides: with ``setup.neck``, the backbone maps the FPN reads (:func:`pyramid_in_strides`).
    """
    cfg = ModelConfig()
    cfg.backbone.name = setup.backbone
    h, w = setup.image_size
    cfg.transform.min_size, cfg.transform.max_size = min(h, w), max(h, w)
    if setup.neck is not None and not in_strides:
        raise ValueError(f"benchmark: neck {setup.neck!r} needs the strides of the maps it reads")
    levels = 1 if setup.neck is None else len(in_strides) + FPN_EXTRA_LEVELS
    anchors: dict = {"sizes": list(anchor_sizes(setup, levels))}
    output_size = setup.roi_output_size
    if setup.neck is not None:
        cfg.neck = PartConfig("fpn", {"in_strides": list(in_strides), "out_channels": FPN_CHANNELS,
                                      "extra_levels": FPN_EXTRA_LEVELS})
        cfg.box_head = PartConfig("two_fc", {"fc_dim": TWO_FC_DIM})
        output_size = output_size or FPN_ROI_OUTPUT_SIZE
        if setup.anchors == "torchvision":
            anchors |= {"offset": 0.0, "round": True}
    # With a neck, fasterrcnn_resnet50_fpn's proposal counts (per level before NMS, per image after it).
    counts = {} if setup.neck is None else {"pre_nms_top_n_train": 2000, "post_nms_top_n_train": 2000,
                                            "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 1000}
    cfg.proposal_generator = PartConfig("rpn", {
        "anchors": anchors,
        "straddle_thresh": -1.0,  # torchvision trains on cross-boundary anchors too
        "min_size": 1e-3,  # torchvision's RPN min_size, in resized-image pixels (scale is 1 here)
        **counts,
    })
    if setup.neck is not None:
        cfg.roi_heads.batch_size_per_image = 512  # fasterrcnn_resnet50_fpn's RoI batch
    cfg.roi_extractor = PartConfig("roi_align", {"output_size": output_size, "sampling_ratio": setup.sampling_ratio})
    cfg.roi_heads.bg_iou_thresh_lo = 0.0  # torchvision's background is IoU [0, 0.5)
    cfg.roi_heads.nms_thresh = 0.5  # torchvision's default; the same value goes to both
    return cfg


class TrunkAsBackbone(nn.Module):
    """detkit's trunk with the ``out_channels`` attribute torchvision's FasterRCNN requires, its maps named
    as torchvision's RPN and MultiScaleRoIAlign take them.

    ``(B, 3, H, W)`` -> ``{map_names[i]: (B, out_channels, H / stride_i, W / stride_i)}``: one map ``{"0"}``
    (what torchvision makes of a backbone returning a Tensor), or a pyramid finest first, e.g.
    ``{"0": P2, "1": P3, "2": P4, "3": P5, "pool": P6}`` as torchvision's FPN backbone names them. With
    ``channels_last`` the batch is converted as detkit's detector converts it, so both feed the shared trunk
    the same memory format.
    """

    def __init__(self, trunk: nn.Module, out_channels: int, map_names: Sequence[str] = ("0",)):
        super().__init__()
        self.body = trunk
        self.out_channels = out_channels
        self.map_names = list(map_names)
        self.channels_last = False

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.name_maps(self.body(x))

    def name_maps(self, features: Tensor | list[Tensor]) -> OrderedDict[str, Tensor]:
        """The trunk's output (a map, or a list of maps finest first) keyed by ``map_names``."""
        maps = [features] if isinstance(features, Tensor) else list(features)
        if len(maps) != len(self.map_names):
            raise ValueError(f"the trunk gave {len(maps)} maps, expected {len(self.map_names)} ({self.map_names})")
        return OrderedDict(zip(self.map_names, maps))


class CentredAnchorGenerator(TVAnchorGenerator):
    """torchvision's anchor generator placing anchors as detkit does: centres at ``(i + 0.5) * stride``
    and unrounded sides. Only for the agreement check; timings use the stock generator."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        # float64 then cast, like detkit's cell anchors, so the two agree bit for bit.
        scales = torch.as_tensor(scales, dtype=torch.float64)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        h_ratios = torch.sqrt(ratios)
        ws = (1.0 / h_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).to(dtype=dtype, device=device)

    def grid_anchors(self, grid_sizes, strides) -> list[Tensor]:
        anchors = []
        for (gh, gw), (sh, sw), base in zip(grid_sizes, strides, self.cell_anchors):
            xs = (torch.arange(gw, dtype=torch.float32, device=base.device) + 0.5) * sw
            ys = (torch.arange(gh, dtype=torch.float32, device=base.device) + 0.5) * sh
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base.float()[None]).reshape(-1, 4).to(base.dtype))
        return anchors


def copy_head_weights(ours: nn.Module, theirs: FasterRCNN) -> None:
    """Copy detkit's RPN head and box predictor weights into torchvision's (the only unshared parts).

    torchvision's RPNHead wraps its 3x3 conv as ``conv[0][0]`` (a Conv2dNormActivation without norm).
    """
    src, dst = ours.proposal_generator.head, theirs.rpn.head
    dst.conv[0][0].load_state_dict(src.conv.state_dict())
    dst.cls_logits.load_state_dict(src.cls_logits.state_dict())
    dst.bbox_pred.load_state_dict(src.bbox_pred.state_dict())
    theirs.roi_heads.box_predictor.load_state_dict(ours.roi_heads.predictor.state_dict())


def setup_config(setup: Setup, registries) -> ModelConfig:
    """detkit's model config for ``setup`` (:func:`detkit_config` with the backbone's pyramid strides)."""
    return detkit_config(setup, pyramid_in_strides(setup.backbone, registries) if setup.neck else None)


def build_pair(setup: Setup, registries, cfg: ModelConfig | None = None) -> tuple[nn.Module, FasterRCNN]:
    """detkit's Faster R-CNN for ``setup`` (built from ``cfg``, default :func:`setup_config`) and a
    torchvision FasterRCNN sharing its trunk and RoI head and holding copies of its RPN head and box
    predictor."""
    cfg = cfg or setup_config(setup, registries)
    ours = build_detector(cfg, registries, setup.num_classes)
    rpn, heads, tf = ours.proposal_generator, ours.roi_heads, ours.transform
    if not isinstance(heads.predictor, SoftmaxBoxHead) or not isinstance(heads.predictor.dropout, nn.Identity):
        raise ValueError(f"benchmark: model.box_predictor must be softmax_box without dropout (torchvision's "
                         f"FastRCNNPredictor), got {type(heads.predictor).__name__}")
    in_channels = rpn.head.conv.in_channels
    if rpn.head.conv.out_channels != in_channels:
        raise ValueError(f"benchmark: model.proposal_generator.conv_channels={rpn.head.conv.out_channels} differs from the "
                         f"trunk's {in_channels} channels; torchvision's RPNHead keeps them equal")
    gens = rpn.anchor_generators
    # Both order a location's anchors ratio-major, then size; one generator (and one map) per level.
    anchor_cls = TVAnchorGenerator if setup.anchors == "torchvision" else CentredAnchorGenerator
    anchors = anchor_cls(sizes=tuple(tuple(g.sizes) for g in gens),
                         aspect_ratios=tuple(tuple(g.aspect_ratios) for g in gens))
    # torchvision's names: the pooled levels "0", "1", ..., the RPN-only max-pooled level "pool".
    roi_levels = len(heads.roi_extractor.strides)
    map_names = [str(i) for i in range(roi_levels)] + ["pool"] * (len(gens) - roi_levels)
    output_size = heads.roi_extractor.output_size[0]
    r, h = cfg.proposal_generator.settings, cfg.roi_heads
    theirs = FasterRCNN(
        TrunkAsBackbone(ours.trunk, in_channels, map_names), num_classes=None,
        min_size=tf.min_sizes[-1], max_size=tf.max_size,
        image_mean=tf.mean.flatten().tolist(), image_std=tf.std.flatten().tolist(),
        rpn_anchor_generator=anchors, rpn_head=TVRPNHead(in_channels, gens[0].num_anchors_per_location),
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train, rpn_pre_nms_top_n_test=r.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train, rpn_post_nms_top_n_test=r.post_nms_top_n_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(map_names[:roi_levels], output_size, setup.sampling_ratio),
        box_head=heads.box_head,
        box_predictor=FastRCNNPredictor(heads.predictor.cls_score.in_features, setup.num_classes + 1),
        box_score_thresh=h.score_thresh, box_nms_thresh=h.nms_thresh, box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh, box_bg_iou_thresh=h.bg_iou_thresh_hi,
        box_batch_size_per_image=h.batch_size_per_image, box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.box_coder_weights))
    theirs.rpn.min_size = r.min_size
    # torchvision pads to a multiple of 32, detkit to the coarsest map's stride: pad alike so the trunk sees
    # the same sizes and torchvision infers the same anchor strides and RoIAlign scales.
    theirs.transform.size_divisible = tf.size_divisible
    copy_head_weights(ours, theirs)
    return ours, theirs


@dataclass
class Tuned:
    """detkit at settings of its own, for inference beside the two at the same settings (each side at its
    best: torchvision keeps its defaults). Same weights; ``overrides`` are ``model.*`` config overrides
    that leave every weight's shape alone (e.g. ``model.proposal_generator.post_nms_top_n_test=300``)."""

    overrides: tuple[str, ...] = ()
    channels_last: bool = False
    compile: bool = False


def tuned_model(setup: Setup, registries, cfg: ModelConfig, weights: nn.Module, tuned: Tuned) -> nn.Module:
    """detkit's detector for ``cfg`` with ``tuned``'s overrides, holding ``weights``' parameters (a copy),
    in eval mode; channels-last and compiled trunk as ``tuned`` asks."""
    bad = [o for o in tuned.overrides if not o.startswith("model.")]
    if bad:
        raise ConfigError(f"tuned settings: {bad[0]!r}: expected a model.* override (KEY=VALUE)")
    data = apply_overrides(to_dict(Config(model=cfg)), list(tuned.overrides))
    model = build_detector(from_dict(data, "tuned settings").model, registries, setup.num_classes)
    try:
        model.load_state_dict(weights.state_dict())
    except RuntimeError as exc:
        raise ConfigError(f"tuned settings {list(tuned.overrides)} change the model's weights: "
                          f"{str(exc).splitlines()[0]}") from exc
    model.eval()
    if tuned.channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if tuned.compile:
        model.trunk.compile()
    return model


def synthetic_batch(setup: Setup, n: int, device: torch.device, seed: int = 0) -> tuple[list[Tensor], list[dict]]:
    """``n`` random images ``(3, H, W)`` float in [0, 1] and targets with 4 boxes ``(4, 4)`` xyxy each."""
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


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    """The largest ``|a - b|`` of two lists of boxes ``(N, 4)`` taken in order; inf when their lengths
    differ, 0 when both are empty."""
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


@torch.no_grad()
def agreement(ours: nn.Module, theirs: FasterRCNN, images: list[Tensor]) -> dict[str, float]:
    """How closely the two detectors agree on ``images`` (eval mode).

    Returns: ``input_max_abs_diff`` (the normalised, padded batches), ``rpn_objectness_max_abs_diff`` and
    ``rpn_deltas_max_abs_diff`` (head outputs on the same features, every level: 0 when the copies are
    faithful), ``top_proposal_iou`` (mean over images of the IoU of the two top-ranked proposals), for
    detections ``top_detection_iou``, ``top_score_abs_diff`` and ``top_label_agree`` (means over images
    with detections from both), ``matched_fraction``: the share of detkit's top-10 detections that
    torchvision also has (same label, IoU > 0.9), ``detection_box_max_abs_diff``: the largest coordinate
    difference of the two detection lists taken in order (inf where an image's counts differ), and
    ``detection_labels_equal``: the share of images whose label lists are equal.
    """
    ours.eval()
    theirs.eval()
    ours_list, _ = ours.transform(images)
    theirs_list, _ = theirs.transform(images)
    features = ours.trunk(ours_list.tensors)
    named = theirs.backbone.name_maps(features)
    a_obj, a_box = zip(*(ours.proposal_generator.head(m) for m in named.values()))
    b_obj, b_box = theirs.rpn.head(list(named.values()))
    a_props, _ = ours.proposal_generator(ours_list, features)
    b_props, _ = theirs.rpn(theirs_list, named)
    result = {
        "input_max_abs_diff": float((ours_list.tensors - theirs_list.tensors).abs().max()),
        "rpn_objectness_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(a_obj, b_obj)),
        "rpn_deltas_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(a_box, b_box)),
        "top_proposal_iou": statistics.mean(float(box_iou(a[:1], b[:1]).max()) if len(a) and len(b) else 0.0
                                            for a, b in zip(a_props, b_props)),
    }
    ious, score_diffs, label_agree, matched, box_diffs, labels_equal = [], [], [], [], [], []
    for a, b in zip(ours(images), theirs(images)):
        box_diffs.append(_max_abs_diff(a["boxes"], b["boxes"]))
        labels_equal.append(float(torch.equal(a["labels"], b["labels"])))
        if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
            continue
        ious.append(float(box_iou(a["boxes"][:1], b["boxes"][:1])[0, 0]))
        score_diffs.append(float((a["scores"][0] - b["scores"][0]).abs()))
        label_agree.append(float(a["labels"][0] == b["labels"][0]))
        iou = box_iou(a["boxes"][:10], b["boxes"])
        iou[a["labels"][:10, None] != b["labels"][None, :]] = 0.0
        matched.append(float((iou.max(dim=1).values > 0.9).float().mean()))
    for key, values in (("top_detection_iou", ious), ("top_score_abs_diff", score_diffs),
                        ("top_label_agree", label_agree), ("matched_fraction", matched)):
        result[key] = statistics.mean(values) if values else float("nan")
    result["detection_box_max_abs_diff"] = max(box_diffs)
    result["detection_labels_equal"] = statistics.mean(labels_equal)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int,
                     device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function over ``iters`` calls after ``warmup`` calls.

    Calls alternate between the functions, in reversed order every other round (ABBA), so a load
    spike or a warm cache does not systematically favour the one that runs first.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters={iters}, warmup={warmup}: expected iters >= 1 and warmup >= 0")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak growth of the process's resident memory while the block runs, in bytes (``.growth``).

    A thread samples ``/proc/self/statm`` every ``interval`` seconds. What it measures: memory the
    allocator took from the OS during the block beyond what the process held at its start (activations,
    gradients, optimizer state first touched, allocator slack); memory freed earlier and reused inside
    the block does not count. ``malloc_trim`` first returns freed heap to the OS so that one model's
    leftovers do not hide the other's peak. Linux only; ``growth`` is -1 where /proc is missing.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.growth = -1
        self._stop = threading.Event()

    def _poll(self, start: int) -> None:
        peak = start
        while not self._stop.is_set():
            peak = max(peak, _rss_bytes())
            self._stop.wait(self.interval)
        self.growth = max(peak, _rss_bytes()) - start

    def __enter__(self) -> "PeakRSS":
        if not os.path.exists("/proc/self/statm"):
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._thread = threading.Thread(target=self._poll, args=(_rss_bytes(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()


def _peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` in MiB: CUDA max_memory_allocated, or on CPU peak RSS growth."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    with PeakRSS() as peak:
        fn()
    return peak.growth / 2**20


def run(setup: Setup, registries, device: torch.device, batch_sizes: tuple[int, ...] = (1, 8),
        train_batch: int = 2, warmup: int = 2, iters: int = 5, amp: str = "none",
        channels_last: bool = False, compile_trunk: bool = False, tuned: Tuned | None = None) -> dict:
    """Time inference at each of ``batch_sizes`` and training steps at ``train_batch`` for both detectors.

    Returns ``{"setup", "inference": {bs: {"detkit", "torchvision", "ratio"}} (images/s),
    "train": {"detkit", "torchvision", "ratio"} (iterations/s, forward + backward + SGD step),
    "memory": {"train" | "inference": {"detkit", "torchvision"}} (MiB; see ``memory_kind``),
    "memory_kind", "agreement"}``; ratios are detkit / torchvision (> 1: detkit faster).
    ``compile_trunk`` compiles the trunk (``torch.compile``), which both detectors share, so both run it
    compiled; the warm-up runs absorb the compilation. ``tuned``: a third detector, detkit at its own
    settings (:class:`Tuned`), is timed for inference too: ``inference[bs]["tuned"]`` and
    ``["tuned_ratio"]`` (against torchvision at the same settings, i.e. its defaults).
    """
    if any(b < 1 for b in batch_sizes) or train_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_sizes={list(batch_sizes)}, train_batch={train_batch}")
    torch.manual_seed(0)
    cfg = setup_config(setup, registries)
    ours, theirs = build_pair(setup, registries, cfg)
    ours.to(device)
    theirs.to(device)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)  # its own RPN head copy; the trunk is shared
        ours.channels_last = True
        theirs.backbone.channels_last = True
    if compile_trunk:
        ours.trunk.compile()  # in place; torchvision's TrunkAsBackbone holds the same module
    models = {"detkit": ours, "torchvision": theirs}
    timed = dict(models)
    if tuned is not None:
        timed["tuned"] = tuned_model(setup, registries, cfg, ours, tuned).to(device)
    sizes = [float(s) for g in ours.proposal_generator.anchor_generators for s in g.sizes]
    result: dict = {
        "setup": asdict(setup) | {"anchor_sizes": sizes, "device": str(device), "amp": amp,
                                  "channels_last": channels_last, "compile": compile_trunk,
                                  "warmup": warmup, "iters": iters, "train_batch": train_batch,
                                  "tuned": None if tuned is None else asdict(tuned)},
        "inference": {}, "memory": {"inference": {}, "train": {}},
        "memory_kind": ("CUDA max_memory_allocated" if device.type == "cuda"
                        else "peak RSS growth of the process during one call"),
    }
    images, _ = synthetic_batch(setup, 1, device, seed=2)
    result["agreement"] = agreement(ours, theirs, images)

    for model in models.values():
        model.eval()

    def infer(model: nn.Module, images: list[Tensor]) -> None:
        with torch.no_grad(), autocast(device, amp):
            model(images)

    for bs in batch_sizes:
        result["inference"][bs] = _inference_throughput(timed, synthetic_batch(setup, bs, device)[0], infer,
                                                        warmup, iters, device)
    images, _ = synthetic_batch(setup, max(batch_sizes), device)
    for k, m in models.items():
        result["memory"]["inference"][k] = _peak_memory_mib(lambda m=m: infer(m, images), device)

    images, targets = synthetic_batch(setup, train_batch, device, seed=1)
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for k, m in models.items()}
    for model in models.values():
        model.train()

    def step(name: str) -> None:
        with autocast(device, amp):
            losses = models[name](images, targets)
        optimizers[name].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizers[name].step()

    # The trunk and RoI head are shared, so both optimizers move the same tensors; only speed is compared.
    t = time_interleaved({k: (lambda k=k: step(k)) for k in models}, warmup, iters, device)
    result["train"] = {k: 1.0 / v for k, v in t.items()}
    result["train"]["ratio"] = result["train"]["detkit"] / result["train"]["torchvision"]
    for k in models:
        result["memory"]["train"][k] = _peak_memory_mib(lambda k=k: step(k), device)
    return result


def _inference_throughput(models: dict[str, nn.Module], images: list[Tensor], infer: Callable, warmup: int,
                          iters: int, device: torch.device) -> dict[str, float]:
    """Images/s of each of ``models`` on ``images`` (interleaved timing), with detkit's and, when timed,
    the tuned detkit's ratio to torchvision."""
    t = time_interleaved({k: (lambda m=m: infer(m, images)) for k, m in models.items()}, warmup, iters, device)
    ips = {k: len(images) / v for k, v in t.items()}
    ips["ratio"] = ips["detkit"] / ips["torchvision"]
    if "tuned" in ips:
        ips["tuned_ratio"] = ips["tuned"] / ips["torchvision"]
    return ips


def loader_throughput(registries, image_size: tuple[int, int] = (240, 320), num_images: int = 64,
                      batch_size: int = 2, num_workers: int = 2, batches: int = 30) -> float:
    """Images per second through detkit's training data pipeline (PNG decode, flip, collate) on
    ``detkit.data.synth`` images, with the trainer's sampler and worker setup; worker start-up excluded."""
    from detkit.data import build_transform
    from detkit.data.synth import synthesize
    from detkit.data.loading import PositionSeeded, StreamBatchSampler, build_dataset, to_tensor_batch

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, "coco", num_images, seed=0, image_size=image_size)
        ds = build_dataset({"name": "coco", "images": f"{tmp}/images", "annotations": f"{tmp}/annotations.json"},
                           registries, "benchmark", transform=build_transform(True, 0.5))
        sampler = StreamBatchSampler(list(range(len(ds))), batch_size, 0)
        loader = torch.utils.data.DataLoader(PositionSeeded(ds), batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=to_tensor_batch)
        it = iter(loader)
        next(it)  # workers started
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        elapsed = time.perf_counter() - start
        del it  # shut the workers down before the directory goes
        return batches * batch_size / elapsed


def machine() -> str:
    """One line naming the machine: CPU model, cores, torch version and threads, GPU if any."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def load_average() -> str:
    """The 1/5/15-minute load averages, to judge how much others used the machine meanwhile."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def model_name(setup: dict) -> str:
    """The backbone, and the neck if any (``resnet50 + fpn``), as a results table names a model."""
    return setup["backbone"] + (f" + {setup['neck']}" if setup.get("neck") else "")


def markdown(results: list[dict], loader_ips: float | None, command: str) -> str:
    """A docs/benchmarks.md section: machine, command, throughput table with ratios, memory, agreement."""
    lines = [f"Machine: {machine()}; load average after the run: {load_average()}.", "",
             f"Command: `{command}`", "",
             "| backbone | image | device | amp | batch | detkit | torchvision | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["setup"]
        prefix = f"| {model_name(s)} | {s['image_size'][0]}x{s['image_size'][1]} | {s['device']} | {s['amp']} |"
        for bs, v in r["inference"].items():
            lines.append(f"{prefix} infer b{bs} (img/s) | {v['detkit']:.2f} | {v['torchvision']:.2f} | "
                         f"**{v['ratio']:.2f}** |")
            if "tuned" in v:
                lines.append(f"{prefix} infer b{bs}, detkit tuned (img/s) | {v['tuned']:.2f} | "
                             f"{v['torchvision']:.2f} | **{v['tuned_ratio']:.2f}** |")
        t = r["train"]
        lines.append(f"{prefix} train b{s['train_batch']} (it/s) | {t['detkit']:.2f} | {t['torchvision']:.2f} | "
                     f"**{t['ratio']:.2f}** |")
    for r in results:
        if r["setup"].get("tuned"):
            t = r["setup"]["tuned"]
            lines += ["", f"detkit tuned ({model_name(r['setup'])}): {', '.join(t['overrides']) or 'same settings'}"
                          f"{', channels-last' if t['channels_last'] else ''}{', compiled trunk' if t['compile'] else ''}"
                          f"; torchvision at its defaults (the same settings as the first rows)."]
    lines += ["", f"Peak memory (MiB, {results[0]['memory_kind']}):", "",
              "| backbone | phase | detkit | torchvision |", "| --- | --- | --- | --- |"]
    for r in results:
        batch = {"inference": max(r["inference"]), "train": r["setup"]["train_batch"]}
        for phase, v in r["memory"].items():
            lines.append(f"| {model_name(r['setup'])} | {phase} (b{batch[phase]}) | {v['detkit']:.0f} | "
                         f"{v['torchvision']:.0f} |")
    lines += ["", "Agreement on one image, same weights, eval mode:", ""]
    for r in results:
        a = r["agreement"]
        lines.append(f"- {model_name(r['setup'])}: RPN objectness max |diff| {a['rpn_objectness_max_abs_diff']:.2g}, "
                     f"top proposal IoU {a['top_proposal_iou']:.3f}, top detection IoU {a['top_detection_iou']:.3f}, "
                     f"top score |diff| {a['top_score_abs_diff']:.3g}, top-10 matched {a['matched_fraction']:.2f}, "
                     f"detection boxes max |diff| {a['detection_box_max_abs_diff']:.2g}, "
                     f"labels equal {a['detection_labels_equal']:.2f}")
    if loader_ips is not None:
        r = results[0]
        b = r["setup"]["train_batch"]
        lines += ["", f"Data loader (synthetic COCO PNGs, decode + flip + collate, 2 workers): {loader_ips:.1f} "
                      f"images/s; detkit's training step at batch {b} consumes {b * r['train']['detkit']:.1f} images/s."]
    return "\n".join(lines)
