"""Two-stage detector assembly.

The detector only composes the parts it is handed (transform, trunk, proposal
source, RoI heads), as torchvision's ``GeneralizedRCNN`` does: Faster R-CNN is
this class with an RPN as proposal source; Fast R-CNN and SPP-net differ in the
parts, not in this class. Training returns a loss dict with stage-prefixed keys;
inference returns ``list[{"boxes", "scores", "labels"}]`` in original-image
coordinates.
"""
from __future__ import annotations

import inspect
import logging

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.config import ConfigError, ModelConfig, check_kwargs
from detkit.models.roi_heads import RoIHeads
from detkit.models.rpn import RegionProposalNetwork
from detkit.models.transform import DetectionTransform

log = logging.getLogger(__name__)


class TwoStageDetector(nn.Module):
    def __init__(self, transform: DetectionTransform, trunk: nn.Module, proposal_generator: nn.Module,
                 roi_heads: RoIHeads, class_names: list[str] | None = None):
        super().__init__()
        self.transform = transform
        self.trunk = trunk
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.class_names = list(class_names) if class_names else None
        self.channels_last = False  # set by the trainer (train.channels_last)
        self.test_scales: list[int] = []  # more than one: multi-scale testing

    def forward(self, images: list[Tensor], targets: list[dict] | None = None,
                proposals: list[Tensor] | None = None):
        """images: ``(3, H_i, W_i)`` uint8 or float in [0, 1]; targets: ``{"boxes" (N, 4) xyxy, "labels" (N,)}``,
        optionally ``"sample_seed"`` (int: the RPN and RoI samplers then draw that image's samples from a
        generator seeded by it instead of the global RNG); proposals: precomputed boxes per image
        (original-image coordinates) for proposal sources that take them (selective search caches); the RPN
        ignores them."""
        if self.training and targets is None:
            raise ValueError("a detector in training mode needs targets")
        if proposals is None and getattr(self.proposal_generator, "needs_proposals", False):
            proposals = self.proposal_generator.propose(images)
        if not self.training and len(self.test_scales) > 1:
            return self.detect_multiscale(images, proposals)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets = self.transform(images, targets)
        features = self.trunk(self._layout(image_list.tensors))
        if proposals is not None:
            proposals = _rescale(proposals, original_sizes, image_list.image_sizes)
        proposals, rpn_losses = self.proposal_generator(image_list, features, targets, proposals)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def _layout(self, batch: Tensor) -> Tensor:
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    @torch.no_grad()
    def detect_multiscale(self, images: list[Tensor], proposals: list[Tensor] | None = None) -> list[dict]:
        """Multi-scale testing (SPP-net Sec. 3.2, Fast R-CNN Sec. 5.2): features of an image pyramid, each
        region pooled from the scale at which its area is closest to 224 x 224 pixels. Without precomputed
        proposals, the proposal source runs at the largest scale."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        levels = []
        for side in self.test_scales:
            image_list, _ = self.transform(images, None, min_size=side)
            levels.append((image_list, self.trunk(self._layout(image_list.tensors))))
        if proposals is None:
            image_list, features = levels[max(range(len(levels)), key=lambda k: self.test_scales[k])]
            proposals, _ = self.proposal_generator(image_list, features, None, None)
            proposals = _rescale(proposals, image_list.image_sizes, original_sizes)
        boxes = torch.cat(proposals)
        image_index = torch.cat([torch.full((len(p),), i, device=boxes.device) for i, p in enumerate(proposals)])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
        scales = torch.tensor([[il.scales[i] for il, _ in levels] for i in range(len(images))], device=boxes.device)
        best = ((area[:, None] * scales[image_index] ** 2) - 224.0 ** 2).abs().argmin(dim=1)
        pooled = None
        for k, (image_list, features) in enumerate(levels):
            rows = torch.nonzero(best == k).squeeze(1)
            if rows.numel() == 0:
                continue
            per_image = [boxes[rows[image_index[rows] == i]] for i in range(len(images))]
            out = self.roi_heads.roi_extractor(features, _rescale(per_image, original_sizes, image_list.image_sizes),
                                               image_list.image_sizes)
            if pooled is None:
                pooled = out.new_zeros((boxes.shape[0], *out.shape[1:]))
            order = torch.cat([rows[image_index[rows] == i] for i in range(len(images))])
            pooled[order] = out
        if pooled is None:  # no proposals at all
            return [{"boxes": boxes.new_zeros((0, 4)), "scores": boxes.new_zeros((0,)),
                     "labels": torch.zeros(0, dtype=torch.int64, device=boxes.device)} for _ in images]
        class_logits, box_deltas = self.roi_heads.classify(pooled)
        return self.roi_heads.postprocess(class_logits, box_deltas, proposals, original_sizes)

    @torch.no_grad()
    def region_proposals(self, images: list[Tensor]) -> list[Tensor]:
        """The proposal source's boxes for ``images`` (original-image coordinates), with its current
        settings: what the RoI heads would see at test time. Cached sources search the images."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        if getattr(self.proposal_generator, "needs_proposals", False):
            return self.proposal_generator.propose(images)
        image_list, _ = self.transform(images, None, min_size=self.transform.min_sizes[-1])
        features = self.trunk(self._layout(image_list.tensors))
        proposals, _ = self.proposal_generator(image_list, features, None, None)
        return _rescale(proposals, image_list.image_sizes, original_sizes)

    @torch.no_grad()
    def extract_region_features(self, images: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Features of given regions, for post-hoc classifiers (R-CNN's SVMs and box regressor).

        images: ``(3, H_i, W_i)``; proposals: ``Tensor[N_i, 4]`` in original-image coordinates.
        Returns ``pooled (sum N_i, P)`` (the flattened pool5 grid) and ``vectors (sum N_i, D)`` (the RoI head's
        output, fc7 for VGG and AlexNet), at the test-time scale.
        """
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, _ = self.transform(images, None, min_size=self.transform.min_sizes[-1])
        features = self.trunk(self._layout(image_list.tensors))
        pooled = self.roi_heads.roi_extractor(features, _rescale(proposals, original_sizes, image_list.image_sizes),
                                              image_list.image_sizes)
        return pooled.flatten(1), self.roi_heads.box_head(pooled)


def _rescale(boxes: list[Tensor], from_sizes, to_sizes) -> list[Tensor]:
    """Per-image boxes from images of ``from_sizes`` (h, w) to the same images at ``to_sizes``."""
    return [b * torch.tensor([tw / fw, th / fh, tw / fw, th / fh], device=b.device, dtype=b.dtype)
            for b, (fh, fw), (th, tw) in zip(boxes, from_sizes, to_sizes)]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d with the same statistics.

    Detection batches of 1-2 images make batch statistics useless, so
    pretrained statistics are kept fixed (Detectron, torchvision).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.running_mean is not None:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def build_backbone(cfg: ModelConfig, registries, num_classes: int = 1000):
    """The configured backbone with its weights (if a local file is given)."""
    entry = registries.backbones.get(cfg.backbone.name)
    check_kwargs(entry.builder, {"num_classes": num_classes, **cfg.backbone.args}, "model.backbone.args")
    backbone = entry.builder(num_classes=num_classes, **cfg.backbone.args)
    if cfg.backbone.weights:
        missing = backbone.load_pretrained(cfg.backbone.weights)
        log.info("loaded backbone weights from %s (%d parameters not in the file)", cfg.backbone.weights, len(missing))
    return backbone


def build_two_stage(cfg: ModelConfig, num_classes: int, registries, class_names=None) -> TwoStageDetector:
    """Faster R-CNN (and any other two-stage combination) from a model config."""
    backbone = build_backbone(cfg, registries)
    parts = backbone.detection_parts()
    defaults = backbone.defaults
    frozen_bn = cfg.backbone.frozen_bn if cfg.backbone.frozen_bn is not None else bool(cfg.backbone.weights)
    if frozen_bn:
        freeze_batchnorm(parts.trunk)
        freeze_batchnorm(parts.roi_head)
    freeze_at = len(parts.stages) if cfg.backbone.freeze_at < 0 else cfg.backbone.freeze_at
    if freeze_at > len(parts.stages):
        raise ConfigError(f"model.backbone.freeze_at={cfg.backbone.freeze_at}: backbone {cfg.backbone.name!r} "
                          f"has only {len(parts.stages)} trunk stages")
    for stage in parts.stages[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)

    output_size = cfg.roi_extractor.output_size or defaults.roi_output_size
    ext_entry = registries.roi_extractors.get(cfg.roi_extractor.name)
    trunk, stride = parts.trunk, parts.stride
    if ext_entry.info.get("input") == "image":
        # R-CNN: the extractor crops regions from the image and owns the CNN trunk.
        extractor = ext_entry.builder(output_size=output_size, stride=1, cfg=cfg.roi_extractor, trunk=parts.trunk,
                                      input_size=defaults.input_size[-1])
        trunk, stride = nn.Identity(), 1
    else:
        extractor = ext_entry.builder(output_size=output_size, stride=parts.stride, cfg=cfg.roi_extractor)
    box_head = parts.roi_head
    if hasattr(extractor, "out_features"):
        box_head = _fit_first_linear(box_head, extractor.out_features(parts.out_channels), cfg)

    t = cfg.transform
    transform = DetectionTransform(
        t.min_size, t.max_size, t.mean or list(defaults.mean), t.std or list(defaults.std),
        t.size_divisible or stride, in_channels=defaults.input_size[0],
    )
    rpn_entry = registries.proposal_generators.get(cfg.proposal_generator)
    proposal_generator = rpn_entry.builder(cfg=cfg, in_channels=parts.out_channels, stride=stride)

    head_entry = registries.heads.get(cfg.roi_head.name)
    pooled_features = (extractor.out_features(parts.out_channels) if hasattr(extractor, "out_features")
                       else parts.out_channels * output_size * output_size)
    optional = {"pooled_features": pooled_features}  # for heads that also read the pooled grid (R-CNN)
    accepted = inspect.signature(head_entry.builder).parameters
    predictor = head_entry.builder(in_features=parts.head_channels, num_classes=num_classes, cfg=cfg.roi_head,
                                   **{k: v for k, v in optional.items() if k in accepted})
    roi_heads = RoIHeads(cfg.roi_head, extractor, box_head, predictor, num_classes)
    detector = TwoStageDetector(transform, trunk, proposal_generator, roi_heads, class_names)
    detector.test_scales = list(t.test_scales or [])
    return detector


def _fit_first_linear(box_head: nn.Module, in_features: int, cfg: ModelConfig) -> nn.Module:
    """SPP changes the length of the pooled vector: the RoI head's first fully connected layer (fc6) is
    rebuilt for it (and so starts untrained) when its input size differs."""
    first = next((m for m in box_head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if not isinstance(first, nn.Linear):
        raise ConfigError(f"model.roi_extractor.name={cfg.roi_extractor.name!r} pools a flat vector, but the RoI "
                          f"head of backbone {cfg.backbone.name!r} starts with "
                          f"{type(first).__name__ if first is not None else 'no layer'}, not a fully connected layer")
    if first.in_features == in_features:
        return box_head
    for module in box_head.modules():
        for name, child in module.named_children():
            if child is first:
                setattr(module, name, nn.Linear(in_features, first.out_features, bias=first.bias is not None))
                log.info("RoI head: %s rebuilt as %d -> %d for the pooled vector", name, in_features,
                         first.out_features)
                return box_head
    raise ConfigError(f"model.backbone.name={cfg.backbone.name!r}: could not rebuild the RoI head's first layer")


def build_detector(cfg: ModelConfig, registries, num_classes: int | None = None, class_names=None) -> nn.Module:
    num_classes = num_classes or cfg.num_classes
    if not num_classes or num_classes < 1:
        raise ConfigError("model.num_classes: expected a positive integer (or a training dataset to take it from)")
    entry = registries.detectors.get(cfg.detector)
    return entry.builder(cfg=cfg, num_classes=num_classes, registries=registries, class_names=class_names)


def build_rpn(cfg: ModelConfig, in_channels: int, stride: int) -> RegionProposalNetwork:
    return RegionProposalNetwork(cfg.rpn, cfg.anchors, in_channels, stride)

