"""A detector's inference as one graph, for ``detkit export``.

The eager detector works on a list of images of any sizes and loops over them where it must (per-image
NMS, Python sizes). An exported graph instead takes one ``uint8 (B, 3, H, W)`` RGB batch of any size and
batch and does everything inside: the resize and normalisation of the transform, the trunk, the RPN's
top-N, NMS and top-N again, RoI pooling, the box head and predictor, and the post-processing (per-class
NMS, the detections per image, the mapping back to the input's pixels). It returns the detections of the
whole batch flat: ``boxes (N, 4)``, ``scores (N,)``, ``labels (N,)``, ``batch_index (N,)``; an image with no
detections simply has no rows, and ``N = 0`` is a valid output.

Every step is batched over the images (NMS over ``image x class`` groups, a rank per image from a one-hot
cumulative sum instead of a loop), so the batch size stays dynamic in the graph; sizes are symbolic
(``torch.sym_min``, ``math.floor``), so the image size does too. The same code compiles under TorchScript
(``torch.jit.is_scripting()`` branches), where the trunk and heads are traced modules.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.ops.anchors import shifted_anchors
from detkit.ops.boxes import decode_boxes
from detkit.ops.roi import level_indices


class ExportError(ValueError):
    """The detector (or the request) cannot be exported; the message says which part and why."""


def _fmin(a: float, b: float) -> float:
    if torch.jit.is_scripting():
        return min(a, b)
    return torch.sym_min(a, b)


def _imin(a: int, b: int) -> int:
    if torch.jit.is_scripting():
        return min(a, b)
    return torch.sym_min(a, b)


def _imax(a: int, b: int) -> int:
    if torch.jit.is_scripting():
        return max(a, b)
    return torch.sym_max(a, b)


def _float(a: int) -> float:
    """A symbolic size as a symbolic float (Python's ``float()`` would fix it to the example's value)."""
    if torch.jit.is_scripting():
        return float(a)
    return torch.sym_float(a)


def _side(length: int, scale: float) -> int:
    """``detkit.models.transform.resized_side`` on symbolic sizes (``trunc`` is ``floor`` here, the value
    being positive, and is what a saved program can hold)."""
    if torch.jit.is_scripting():
        return max(1, int(length * scale + 0.5))
    return torch.sym_max(1, math.trunc(length * scale + 0.5))


def _clip(boxes: Tensor, height: int, width: int) -> Tensor:
    x = boxes[..., 0::2].clamp(min=0.0, max=_float(width))
    y = boxes[..., 1::2].clamp(min=0.0, max=_float(height))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _bounded(rows: Tensor) -> Tensor:
    """``rows`` (a data-dependent count of rows) with its count declared at most 2^31: the exporters then
    bound the sizes derived from it (unbounded, ``rows x classes`` overflows int64 in ONNX's checks)."""
    if not torch.jit.is_scripting():
        torch._check(rows.shape[0] <= 2 ** 31)
    return rows


def _batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float) -> Tensor:
    """NMS within each group (torchvision's coordinate trick: the groups' boxes are moved apart so that
    one NMS call serves all of them); kept indices by decreasing score. Safe on no boxes at all."""
    span = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max() + 1.0
    shifted = boxes + (groups.to(boxes.dtype) * span)[:, None]
    return torch.ops.torchvision.nms(shifted, scores, threshold)


def _first_per_image(image: Tensor, batch: int, count: int) -> Tensor:
    """A mask of the first ``count`` entries of each image in ``image (N,)`` (entries in rank order): the
    rank of an entry within its image is a cumulative sum over a one-hot of the images, no loop."""
    onehot = (image[:, None] == torch.arange(batch, device=image.device)[None]).to(torch.int64)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    return rank < count


class RoIPooler(nn.Module):
    """Regions ``rois (K, 5)`` (image index, xyxy in resized pixels) pooled from the first
    ``len(strides)`` maps as the extractor's :class:`~detkit.ops.roi.PoolingOp` says, each region from its
    FPN level (Eq. 1, :func:`detkit.ops.roi.level_indices`)."""

    def __init__(self, op, strides: List[int]):
        super().__init__()
        if op.op not in ("roi_align", "roi_pool"):
            raise ExportError(f"RoI pooling {op.op!r} has no exported form (roi_align or roi_pool)")
        self.align = op.op == "roi_align"
        self.sizes: List[int] = [int(s) for s in op.sizes]
        self.sampling_ratio = int(op.sampling_ratio)
        self.aligned = bool(op.aligned)
        self.flatten = bool(op.flatten)
        self.strides: List[int] = [int(s) for s in strides]
        self.k_min = self.strides[0].bit_length() - 1
        self.k_max = self.strides[-1].bit_length() - 1

    def pool_level(self, x: Tensor, rois: Tensor, scale: float) -> Tensor:
        out: List[Tensor] = []
        for size in self.sizes:
            if self.align:
                pooled = torch.ops.torchvision.roi_align(x, rois, scale, size, size, self.sampling_ratio,
                                                         self.aligned)
            else:
                pooled = torch.ops.torchvision.roi_pool(x, rois, scale, size, size)[0]
            out.append(pooled.flatten(1) if self.flatten else pooled)
        return torch.cat(out, dim=1) if self.flatten else out[0]

    def forward(self, maps: List[Tensor], rois: Tensor) -> Tensor:
        if len(self.strides) == 1:
            return self.pool_level(maps[0], rois, 1.0 / self.strides[0])
        levels = level_indices(rois[:, 1:], self.k_min, self.k_max)
        parts: List[Tensor] = []
        order: List[Tensor] = []
        for i, x in enumerate(maps):
            if i < len(self.strides):
                rows = torch.nonzero(levels == i).squeeze(1)
                parts.append(self.pool_level(x, rois[rows], 1.0 / self.strides[i]))
                order.append(rows)
        # Regions come back in their input order: the pooled rows of all levels, scattered by index.
        return torch.cat(parts)[torch.argsort(torch.cat(order))]


class RegionClassifier(nn.Module):
    """Pooled regions -> ``scores (R, K+1)``, ``deltas (R, 4(K+1))``: the box head, the predictor and its
    test-time scores, as one module (traced whole under TorchScript)."""

    def __init__(self, box_head: nn.Module, predictor: nn.Module):
        super().__init__()
        self.box_head = box_head
        self.predictor = predictor

    def forward(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        logits, deltas = self.predictor(self.box_head(pooled), pooled.flatten(1))
        return self.predictor.class_scores(logits), deltas


class MapList(nn.Module):
    """The trunk's output as a list of maps (one for a single-map trunk)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: Tensor) -> List[Tensor]:
        out = self.trunk(x)
        return [out] if isinstance(out, Tensor) else list(out)


class DetectionGraph(nn.Module):
    """``images uint8 (B, 3, H, W)`` RGB -> ``boxes (N, 4)`` in the input's pixels, ``scores (N,)``,
    ``labels (N,)`` (1..K), ``batch_index (N,)``: a Faster R-CNN-style detector's test-time forward (the
    RPN's test top-N and the RoI heads' post-processing, at the transform's test scale), batched over the
    images. Built from a detector in eval mode; see :func:`check_exportable` for what it takes."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        check_exportable(detector)
        transform, rpn, heads = detector.transform, detector.proposal_generator, detector.roi_heads
        self.min_size = float(transform.min_sizes[-1])
        self.max_size = float(transform.max_size)
        self.divisor = int(transform.size_divisible)
        self.gray = transform.in_channels == 1
        self.register_buffer("mean", transform.mean.detach().clone().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", transform.std.detach().clone().view(1, -1, 1, 1), persistent=False)
        self.trunk = MapList(detector.trunk)
        self.rpn_head = rpn.head
        generators = rpn.anchor_generators
        self.anchor_strides: List[int] = [g.stride for g in generators]
        self.anchor_offset = float(generators[0].offset)
        self.anchors_per_cell = generators[0].num_anchors_per_location
        self.register_buffer("cells", torch.cat([g.cell_anchors(torch.float32) for g in generators]),
                             persistent=False)
        cfg = rpn.cfg
        self.pre_nms = int(cfg.pre_nms_top_n_test)
        self.post_nms = int(cfg.post_nms_top_n_test)
        self.rpn_nms = float(cfg.nms_thresh)
        self.rpn_min_size = float(cfg.min_size)
        self.rpn_weights: Tuple[float, float, float, float] = tuple(rpn.box_coder.weights)
        self.rpn_clamp = float(rpn.box_coder.scale_clamp)
        extractor = heads.roi_extractor
        self.pooler = RoIPooler(extractor.pooling_op(), list(extractor.strides))
        self.classifier = RegionClassifier(heads.box_head, heads.predictor)
        self.num_classes = int(heads.num_classes)
        self.score_thresh = float(heads.cfg.score_thresh)
        self.nms_thresh = float(heads.cfg.nms_thresh)
        self.detections = int(heads.cfg.detections_per_img)
        self.head_weights: Tuple[float, float, float, float] = tuple(heads.box_coder.weights)
        self.head_clamp = float(heads.box_coder.scale_clamp)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, height, width = images.shape[0], images.shape[2], images.shape[3]
        scale = _fmin(self.min_size / _imin(height, width), self.max_size / _imax(height, width))
        nh, nw = _side(height, scale), _side(width, scale)
        x = self.preprocess(images, nh, nw)
        maps = self.trunk(x)
        rois = self.proposals(maps, batch, nh, nw, scale)
        # One zero region more, dropped after the heads: a conv head (ResNet's res5) on a data-dependent number
        # of regions makes torch.export ask whether that number is 0; with the extra row it never is.
        pooled = self.pooler(maps, rois)
        pooled = torch.cat([pooled, pooled.new_zeros((1,) + pooled.shape[1:])])
        scores, deltas = self.classifier(pooled)
        scores, deltas = scores[:-1], deltas[:-1]
        boxes, scores, labels, index = self.postprocess(scores, deltas, rois, batch, nh, nw)
        factor = torch.tensor([width / nw, height / nh, width / nw, height / nh], dtype=boxes.dtype,
                              device=boxes.device)
        boxes = _clip((boxes * factor).clamp(min=0.0), height, width)
        return boxes, scores, labels, index

    def preprocess(self, images: Tensor, nh: int, nw: int) -> Tensor:
        """uint8 RGB -> the resized, normalised batch, zero-padded to multiples of the size divisor (as the
        eager transform, image by image)."""
        x = images.float() / 255.0
        if self.gray:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(1, keepdim=True)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        d = self.divisor
        return F.pad(x, (0, (nw + d - 1) // d * d - nw, 0, (nh + d - 1) // d * d - nh))

    def anchors(self, level: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``AnchorGenerator.grid_anchors`` of one level on a symbolic map size (without its cache)."""
        a = self.anchors_per_cell
        cells = self.cells[level * a:(level + 1) * a].to(device)
        return shifted_anchors(cells, h, w, float(self.anchor_strides[level]), self.anchor_offset).to(dtype)

    def proposals(self, maps: List[Tensor], batch: int, nh: int, nw: int, scale: float) -> Tensor:
        """The RPN at test time: per level the top-N anchors by objectness, decoded, clipped, small ones
        dropped, NMS per image and level, the post-NMS top-N per image. Returns ``rois (K, 5)``."""
        boxes: List[Tensor] = []
        scores: List[Tensor] = []
        levels: List[Tensor] = []
        for i, x in enumerate(maps):
            if i < len(self.anchor_strides):
                obj, delta = self.rpn_head(x)
                h, w = obj.shape[2], obj.shape[3]
                obj = obj.permute(0, 2, 3, 1).reshape(batch, -1)
                delta = delta.view(batch, self.anchors_per_cell, 4, h, w).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
                top, idx = obj.topk(_imin(self.pre_nms, h * w * self.anchors_per_cell), dim=1)
                anchors = self.anchors(i, h, w, delta.dtype, delta.device)
                picked = torch.gather(delta, 1, idx[..., None].expand(-1, -1, 4)).reshape(-1, 4)
                decoded = decode_boxes(picked, anchors[idx.reshape(-1)], self.rpn_weights, self.rpn_clamp)
                boxes.append(decoded.view(batch, -1, 4))
                scores.append(top)
                levels.append(torch.full_like(top, i, dtype=torch.int64))
        all_boxes = _clip(torch.cat(boxes, 1), nh, nw).reshape(-1, 4)
        all_scores = torch.cat(scores, 1).reshape(-1)
        image = torch.arange(batch, device=all_boxes.device)[:, None].expand(-1, all_scores.shape[0] // batch)
        image = image.reshape(-1)
        groups = image * len(self.anchor_strides) + torch.cat(levels, 1).reshape(-1)
        min_size = self.rpn_min_size * scale
        sides = all_boxes[:, 2:] - all_boxes[:, :2]
        keep = _bounded(torch.nonzero((sides >= min_size).all(dim=1)).squeeze(1))
        keep = keep[_batched_nms(all_boxes[keep], all_scores[keep], groups[keep], self.rpn_nms)]
        keep = keep[_first_per_image(image[keep], batch, self.post_nms)]
        return _bounded(torch.cat([image[keep, None].to(all_boxes.dtype), all_boxes[keep]], dim=1))

    def postprocess(self, scores: Tensor, deltas: Tensor, rois: Tensor, batch: int, nh: int, nw: int
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-class boxes decoded and clipped, scores above the threshold, small boxes dropped, NMS per
        image and class, the first ``detections_per_img`` of each image (resized-image pixels)."""
        k = self.num_classes
        boxes = decode_boxes(deltas, rois[:, 1:], self.head_weights, self.head_clamp).view(-1, k + 1, 4)
        boxes = _clip(boxes, nh, nw)[:, 1:].reshape(-1, 4)
        labels = torch.arange(1, k + 1, device=boxes.device)[None].expand(rois.shape[0], -1).reshape(-1)
        image = rois[:, 0].to(torch.int64)[:, None].expand(-1, k).reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        sides = boxes[:, 2:] - boxes[:, :2]
        keep = _bounded(torch.nonzero((scores > self.score_thresh) & (sides >= 1e-2).all(dim=1)).squeeze(1))
        keep = keep[_batched_nms(boxes[keep], scores[keep], image[keep] * (k + 1) + labels[keep], self.nms_thresh)]
        keep = keep[_first_per_image(image[keep], batch, self.detections)]
        return boxes[keep], scores[keep], labels[keep], image[keep]


def check_exportable(detector: nn.Module) -> None:
    """Raise :class:`ExportError` naming the part a graph cannot hold: proposals from outside the network
    (selective search, precomputed boxes), an extractor that is not RoI pooling (R-CNN's warp), several
    test scales."""
    from detkit.models.roi_heads import RoIHeads

    if not isinstance(getattr(detector, "roi_heads", None), RoIHeads):
        raise ExportError(f"the exported graph restates the two-stage detector's test-time steps (one RoIHeads); "
                          f"{type(detector).__name__} has another shape and no exported form: run it eagerly")
    pg = getattr(detector, "proposal_generator", None)
    if not getattr(pg, "anchor_based", False):  # a declaration of the source (ProposalSource.anchor_based)
        raise ExportError(f"the detector's proposals come from {type(pg).__name__}, outside the network: only a "
                          "detector with an RPN (Faster R-CNN) exports as one graph; detectors on selective "
                          "search or precomputed boxes need their proposals at run time")
    extractor = detector.roi_heads.roi_extractor
    if not hasattr(extractor, "pooling_op"):
        raise ExportError(f"RoI extractor {type(extractor).__name__} does not state its pooling as torchvision "
                          "operators (pooling_op): only roi_pool, roi_align and spp export")
    if len(detector.test_scales) > 1:
        raise ExportError(f"multi-scale testing (test scales {detector.test_scales}) has no exported form: "
                          "export at one scale (--set model.transform.test_scales=[...] with one side)")
