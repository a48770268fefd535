"""detkit's Faster R-CNN (Ren et al. 2015) and torchvision's, built to do the same work, and how closely they
agree: what :mod:`detkit.benchmarks.torchvision_parity` times against each other.

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
"""
from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import MultiScaleRoIAlign, box_iou

from detkit.config import ModelConfig, from_dict
from detkit.models.assembly import build_backbone, build_detector
from detkit.models.roi_heads import SoftmaxBoxHead


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
    if setup.neck is not None and not in_strides:
        raise ValueError(f"benchmark: neck {setup.neck!r} needs the strides of the maps it reads")
    levels = 1 if setup.neck is None else len(in_strides) + FPN_EXTRA_LEVELS
    anchors: dict = {"sizes": list(anchor_sizes(setup, levels))}
    h, w = setup.image_size
    model: dict = {
        "backbone": {"name": setup.backbone},
        "transform": {"min_size": min(h, w), "max_size": max(h, w)},
        "roi_extractor": {"name": "roi_align", "output_size": setup.roi_output_size,
                          "sampling_ratio": setup.sampling_ratio},
        # torchvision's background is IoU [0, 0.5) and its NMS 0.5; the same values go to both
        "roi_heads": {"bg_iou_thresh_lo": 0.0, "nms_thresh": 0.5},
    }
    rpn = {"straddle_thresh": -1.0,  # torchvision trains on cross-boundary anchors too
           "min_size": 1e-3}  # torchvision's RPN min_size, in resized-image pixels (scale is 1 here)
    if setup.neck is not None:
        model["neck"] = {"name": "fpn", "in_strides": list(in_strides), "out_channels": FPN_CHANNELS,
                         "extra_levels": FPN_EXTRA_LEVELS}
        model["box_head"] = {"name": "two_fc", "fc_dim": TWO_FC_DIM}
        model["roi_extractor"]["output_size"] = setup.roi_output_size or FPN_ROI_OUTPUT_SIZE
        model["roi_heads"]["batch_size_per_image"] = 512  # fasterrcnn_resnet50_fpn's RoI batch
        if setup.anchors == "torchvision":
            anchors |= {"offset": 0.0, "round": True}
        # fasterrcnn_resnet50_fpn's proposal counts (per level before NMS, per image after it)
        rpn |= {"pre_nms_top_n_train": 2000, "post_nms_top_n_train": 2000, "pre_nms_top_n_test": 1000,
                "post_nms_top_n_test": 1000}
    model["proposal_generator"] = {"name": "rpn", "anchors": anchors, **rpn}
    return from_dict({"model": model}, source="benchmark setup").model


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

