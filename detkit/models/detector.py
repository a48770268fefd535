"""Two-stage detector: the composition of the parts it is handed.

The detector only composes its parts (transform, trunk, proposal source, RoI heads), as torchvision's
``GeneralizedRCNN`` does: R-CNN, SPP-net, Fast R-CNN and Faster R-CNN differ in the parts
(``detkit.models.assembly`` builds them from a config), not in this class. Proposals take one route:
boxes the batch carries (or the source makes from the images) are in original-image pixels and are
rescaled here, once, to the resized images. Training returns a loss dict with stage-prefixed keys;
inference returns ``list[{"boxes", "scores", "labels"}]`` in original-image coordinates.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.models.roi_heads import RoIHeads
from detkit.models.transform import DetectionTransform, ImageList


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
        generator seeded by it instead of the global RNG); proposals: boxes per image the batch carries
        (original-image pixels), for the sources that take them (selective search caches); the RPN
        ignores them."""
        if self.training and targets is None:
            raise ValueError("a detector in training mode needs targets")
        if proposals is None:
            proposals = self.proposal_generator.propose(images)
        if not self.training and len(self.test_scales) > 1:
            return self.detect_multiscale(images, proposals)
        image_list, features, targets = self.features(images, targets)
        proposals, rpn_losses = self.proposal_generator(image_list, features, targets,
                                                        self.to_resized(proposals, image_list))
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, image_list.original_sizes)

    def svd_layers(self) -> nn.Module:
        """The part whose fully connected layers ``--svd`` may factor by truncated SVD (Fast R-CNN Sec. 3.1): the
        box head (fc6/fc7 of VGG). A detector of another shape declares its own by this method."""
        return self.roi_heads.box_head

    def features(self, images: list[Tensor], targets: list[dict] | None = None, min_size: int | None = None
                 ) -> tuple[ImageList, Tensor, list[dict] | None]:
        """The resized, normalised batch, the trunk's features of it and the targets in its coordinates
        (``min_size``: the shorter side; None: the transform's, drawn per image in training)."""
        image_list, targets = self.transform(images, targets, min_size=min_size)
        batch = image_list.tensors
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return image_list, self.trunk(batch), targets

    @staticmethod
    def to_resized(boxes: list[Tensor] | None, image_list: ImageList) -> list[Tensor] | None:
        """Per-image boxes in original-image pixels -> the same boxes in ``image_list``'s resized images."""
        if boxes is None:
            return None
        return _rescale(boxes, image_list.original_sizes, image_list.image_sizes)

    @torch.no_grad()
    def detect_multiscale(self, images: list[Tensor], proposals: list[Tensor] | None = None) -> list[dict]:
        """Multi-scale testing (SPP-net Sec. 3.2, Fast R-CNN Sec. 5.2): features of an image pyramid, each
        region pooled from the scale at which its area is closest to 224 x 224 pixels. Without given
        proposals, the proposal source runs at the largest scale."""
        levels = [self.features(images, min_size=side)[:2] for side in self.test_scales]
        if proposals is None:
            image_list, features = levels[max(range(len(levels)), key=lambda k: self.test_scales[k])]
            proposals, _ = self.proposal_generator(image_list, features, None, None)
            proposals = _rescale(proposals, image_list.image_sizes, image_list.original_sizes)
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
            out = self.roi_heads.roi_extractor(features, self.to_resized(per_image, image_list),
                                               image_list.image_sizes)
            if pooled is None:
                pooled = out.new_zeros((boxes.shape[0], *out.shape[1:]))
            order = torch.cat([rows[image_index[rows] == i] for i in range(len(images))])
            pooled[order] = out
        original_sizes = levels[0][0].original_sizes
        if pooled is None:  # no proposals at all
            return [{"boxes": boxes.new_zeros((0, 4)), "scores": boxes.new_zeros((0,)),
                     "labels": torch.zeros(0, dtype=torch.int64, device=boxes.device)} for _ in images]
        class_logits, box_deltas = self.roi_heads.classify(pooled)
        return self.roi_heads.postprocess(class_logits, box_deltas, proposals, original_sizes)

    @torch.no_grad()
    def region_proposals(self, images: list[Tensor], phase: str = "test") -> list[Tensor]:
        """The proposal source's boxes for ``images`` (original-image coordinates): what the RoI heads
        would see at test time (``phase="train"``: with the source's training settings, e.g. the RPN's
        training top-N). Sources that work on the images (selective search) search them."""
        given = self.proposal_generator.propose(images)
        if given is not None:
            return given
        image_list, features, _ = self.features(images, min_size=self.transform.min_sizes[-1])
        proposals, _ = self.proposal_generator(image_list, features, None, None, phase=phase)
        return _rescale(proposals, image_list.image_sizes, image_list.original_sizes)

    @torch.no_grad()
    def extract_region_features(self, images: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Features of given regions, for post-hoc classifiers (R-CNN's SVMs and box regressor).

        images: ``(3, H_i, W_i)``; proposals: ``Tensor[N_i, 4]`` in original-image coordinates.
        Returns ``pooled (sum N_i, P)`` (the flattened pool5 grid) and ``vectors (sum N_i, D)`` (the RoI head's
        output, fc7 for VGG and AlexNet), at the test-time scale.
        """
        image_list, features, _ = self.features(images, min_size=self.transform.min_sizes[-1])
        pooled = self.roi_heads.roi_extractor(features, self.to_resized(proposals, image_list),
                                              image_list.image_sizes)
        return pooled.flatten(1), self.roi_heads.box_head(pooled)


def _rescale(boxes: list[Tensor], from_sizes, to_sizes) -> list[Tensor]:
    """Per-image boxes from images of ``from_sizes`` (h, w) to the same images at ``to_sizes``."""
    return [b * torch.tensor([tw / fw, th / fh, tw / fw, th / fh], device=b.device, dtype=b.dtype)
            for b, (fh, fw), (th, tw) in zip(boxes, from_sizes, to_sizes)]
