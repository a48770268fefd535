"""The backbone interface every classification architecture implements.

A backbone is a classification network (its parameter names follow torchvision's
where torchvision has the architecture, so torchvision checkpoints load as they
are) that also says how to cut it for detection (Faster R-CNN paper, Sec. 4; the
ResNet paper, Appendix A): a *trunk* that maps an image to a feature map of
``out_channels`` channels at ``stride``, and a *RoI head* that maps pooled
region features ``(R, out_channels, S, S)`` to vectors ``(R, head_channels)``
(VGG's fc6/fc7, ResNet's res5 + global average pooling, ...). The detection
head (softmax classifier and box regressor, or SVMs) sits on those vectors.

Family modules register one builder per variant (timm's pattern): the builder
takes keyword arguments (``num_classes`` at least) and returns a
:class:`Backbone`. Defaults that belong to a variant (input size, mean/std,
the RoI pooling size used in the literature) are data on the instance
(:class:`BackboneDefaults`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneDefaults:
    """Per-variant defaults, declared next to the variant.

    input_size: (C, H, W) the classifier was designed for.
    mean, std: per-channel normalisation of RGB images scaled to [0, 1].
    roi_output_size: side of the RoI-pooled grid the RoI head expects
        (7 for VGG's fc6 on 7x7x512, 14 for ResNet-C4's res5, ...).
    min_input_size: the smallest square input the classifier accepts (tests use it).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    roi_output_size: int = 7
    min_input_size: int = 32


@dataclass
class DetectionParts:
    """What a detector takes from a backbone.

    trunk: image batch (B, 3, H, W) -> features (B, out_channels, ~H/stride, ~W/stride).
    roi_head: pooled regions (R, out_channels, S, S) -> (R, head_channels).
    stages: the trunk's sub-modules in input-to-output order; ``freeze_at = k``
        freezes the first k of them (the papers fine-tune from conv3_1 for VGG-16
        and from res3 for ResNets).
    """

    trunk: nn.Module
    roi_head: nn.Module
    out_channels: int
    stride: int
    head_channels: int
    stages: list[nn.Module] = field(default_factory=list)


class Backbone(nn.Module):
    """Base class of every registered backbone.

    Subclasses are complete classification models: ``forward(images)`` returns
    logits ``(B, num_classes)`` (training-time auxiliary outputs are allowed;
    then ``classification_loss`` must combine them). They implement
    :meth:`detection_parts`, which returns modules that *share parameters* with
    the classification model (no copies), so ImageNet weights loaded into the
    classifier are the detector's initialisation.
    """

    defaults: BackboneDefaults = BackboneDefaults()

    def detection_parts(self) -> DetectionParts:
        raise NotImplementedError(f"{type(self).__name__} does not define detection_parts()")

    def classification_loss(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``forward``'s outputs against class indices ``targets (B,)``."""
        return nn.functional.cross_entropy(outputs, targets)

    def remap_state_dict(self, state: dict) -> dict:
        """Rename keys of an older checkpoint layout to this model's (identity by default)."""
        return state

    def load_pretrained(self, path: str | os.PathLike, strict: bool = False) -> list[str]:
        """Load a torchvision-format state dict from a local file.

        The classifier layer is skipped when its shape differs (a 1000-class
        ImageNet checkpoint into a model with another number of classes).
        Returns the names of parameters that were not in the file.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a bad file
            raise ValueError(f"{path}: not a readable torch state dict ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
        state = self.remap_state_dict(dict(state))
        own = self.state_dict()
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        for k in skipped:
            state.pop(k)
        unexpected = [k for k in state if k not in own]
        if unexpected and strict:
            raise ValueError(f"{path}: {len(unexpected)} keys not in {type(self).__name__}, e.g. {unexpected[:3]}")
        result = self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        missing = list(result.missing_keys)
        if strict and [m for m in missing if not any(m.startswith(s.rsplit('.', 1)[0]) for s in skipped)]:
            raise ValueError(f"{path}: missing {len(missing)} keys, e.g. {missing[:3]}")
        return missing


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
