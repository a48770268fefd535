"""A registered backbone as an N-way classifier: :class:`Classifier` and :func:`build_classifier`.

Every backbone in detkit is a complete classification network (with its training-time parts: auxiliary
classifiers, label smoothing, stochastic depth, drop-path, dropout, in its ``forward`` and
``classification_loss``), so pretraining needs no other head. The wrapper adds only the input side:
batches arrive as uint8 images (a quarter of the bytes of float images between the loader's workers and the
training process) and are normalised on the device with the backbone's mean and standard deviation;
one-channel networks (LeNet-5, the MNIST network) get the luminance.

``backbone.pth``, what ``detkit pretrain`` writes for detectors, is ``Classifier.backbone.weights_state_dict()``:
the backbone's own parameter names (torchvision's, where torchvision has the architecture), with its weights
layout recorded (a ResNet bottleneck's ``stride_in_1x1``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.config import ConfigError
from detkit.engine.state_dict import WeightsError

LUMA = (0.299, 0.587, 0.114)


class Classifier(nn.Module):
    """``images (B, 3, H, W)`` uint8 (or float in [0, 255]) -> the backbone's outputs: logits ``(B, K)`` at test
    time, and in training whatever its ``classification_loss`` takes (GoogLeNet: logits and two auxiliary
    logits)."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float], in_channels: int = 3):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ConfigError(f"model.mean/std: {len(mean)} and {len(std)} values for a {in_channels}-channel input")
        self.backbone = backbone
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        x = images.float()
        if self.in_channels == 1 and x.shape[1] == 3:
            x = (x * self.luma).sum(1, keepdim=True)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor):
        return self.backbone(self.normalize(images))

    def loss(self, outputs, labels: Tensor) -> Tensor:
        """The backbone's training loss (auxiliary terms and label smoothing included)."""
        return self.backbone.classification_loss(outputs, labels)


def main_logits(outputs) -> Tensor:
    """The final classifier's logits of ``forward``'s outputs (the first of a training tuple)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def build_classifier(model_cfg, registries, num_classes: int) -> Classifier:
    """The configured backbone (``model.backbone``: name, args, optional weights) with ``num_classes``
    outputs, wrapped with its normalisation."""
    from detkit.models.assembly import build_backbone

    try:
        backbone = build_backbone(model_cfg, registries, num_classes)
    except WeightsError as exc:
        raise ConfigError(f"model.backbone.weights: {exc}") from None
    defaults = backbone.defaults
    in_channels = defaults.input_size[0]
    return Classifier(backbone, list(model_cfg.mean or defaults.mean), list(model_cfg.std or defaults.std),
                      in_channels)


def input_side(model_cfg, classifier: Classifier) -> int:
    """``model.input_size``, else the side of the backbone's design input; ConfigError below the smallest input
    the backbone takes (its ``min_input_size``: Inception-v3 75, SqueezeNet 64, ...)."""
    defaults = classifier.backbone.defaults
    side = int(model_cfg.input_size or defaults.input_size[-1])
    if side < defaults.min_input_size:
        raise ConfigError(f"model.input_size={side}: {model_cfg.backbone.name} takes inputs of at least "
                          f"{defaults.min_input_size}x{defaults.min_input_size}")
    return side


def classifier_from_checkpoint(path: str, registries, device: torch.device, overrides: list[str] | None = None):
    """The classifier a ``detkit pretrain`` checkpoint holds: ``(model on device in eval mode, cfg, ckpt)``
    (``overrides``: ``KEY=VALUE`` changes to its embedded config)."""
    from detkit.config import ClassifierConfig, apply_overrides, from_dict
    from detkit.engine.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path, map_location="cpu", task="classification")
    data = apply_overrides(ckpt["config"], overrides or [], ClassifierConfig)
    cfg = from_dict(data, source=f"{path} (embedded config)", schema=ClassifierConfig)
    cfg.model.backbone.weights = None  # the weights are the checkpoint's
    model = build_classifier(cfg.model, registries, len(ckpt["class_names"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: "
                              f"{str(exc).splitlines()[0]}") from None
    cfg.model.input_size = input_side(cfg.model, model)
    return model.to(device).eval(), cfg, ckpt
