"""The hooks a detkit plugin may implement.

Every kind of part has one hook. A hook receives a ``register`` callback and
calls it once per part it provides::

    register(name: str, builder: Callable[..., object], **info)

``builder`` is called with the keyword arguments of the part's config section
(its signature is what the config is validated against); ``info`` is free-form
metadata shown by ``detkit list`` (for example ``family="resnet"``). A model part
whose training needs a schedule of its own declares it there: ``schedule="svm_posthoc"``
(see :func:`detkit_register_schedules`). The host owns the names: registering a name
twice raises and names both plugins.

A third-party plugin is an importable module with ``@hookimpl`` functions and
one ``[project.entry-points.detkit]`` line in its package metadata.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("detkit")
hookimpl = pluggy.HookimplMarker("detkit")


@hookspec
def detkit_register_backbones(register):
    """Register backbones: ``builder(num_classes=..., **kwargs) -> detkit.backbones.Backbone``."""


@hookspec
def detkit_register_proposal_generators(register):
    """Register proposal sources (RPN, selective search, ...):
    ``builder(cfg: ModelConfig, in_channels: int, stride: int) -> nn.Module`` whose forward takes
    ``(images: ImageList, features (B, C, H, W), targets | None, precomputed | None)`` (``precomputed``:
    per-image boxes handed to the detector, in resized-image coordinates) and returns
    ``(proposals: list[Tensor[N_i, 4]], losses: dict)``."""


@hookspec
def detkit_register_roi_extractors(register):
    """Register RoI feature extractors (RoI pooling, RoIAlign, SPP, warp):
    ``builder(output_size: int, stride: int, cfg: RoIExtractorConfig) -> nn.Module`` mapping
    ``(features (B, C, H, W), proposals list[Tensor[N_i, 4]], image_sizes)`` to ``(sum N_i, C, S, S)`` (or to
    flat vectors ``(sum N_i, D)``, then the module has ``out_features(channels) -> D`` and the RoI head's first
    fully connected layer is rebuilt for D, as SPP does). Registered with ``input="image"``, the builder also
    receives ``trunk`` and ``input_size`` and gets the normalised images instead of features (R-CNN's warp)."""


@hookspec
def detkit_register_heads(register):
    """Register detection heads on RoI-head vectors:
    ``builder(in_features: int, num_classes: int, cfg: RoIHeadConfig) -> nn.Module`` mapping
    ``(R, in_features)`` to ``(class_logits (R, K+1), box_deltas (R, 4(K+1)))``. A builder that accepts
    ``pooled_features`` receives the length of the flattened pooled grid; a module with ``needs_pooled = True``
    is called as ``head(vectors, pooled=...)``, and one with ``scores_are_probabilities = False`` has its scores
    used as they are instead of through a softmax (R-CNN's SVMs). A head that is not trained by SGD declares
    the schedule that fits it, e.g. ``register("svm", ..., schedule="svm_posthoc", finetune_head="softmax_box")``."""


@hookspec
def detkit_register_detectors(register):
    """Register detector assemblies: ``builder(cfg: ModelConfig, num_classes: int, registries, class_names) -> nn.Module``
    whose forward follows ``detkit.models.detector.TwoStageDetector``."""


@hookspec
def detkit_register_datasets(register):
    """Register dataset formats: ``builder(**kwargs) -> detkit.data.DetectionDataset``. A builder that accepts
    ``build_dataset`` receives ``build_dataset(spec: dict, key: str) -> DetectionDataset``, which builds a
    nested dataset mapping from the caller's registries (``concat``)."""


@hookspec
def detkit_register_schedules(register):
    """Register training schedules: ``run(cfg: Config, registries, resume: str | bool | None, progress: bool)
    -> {"checkpoint": path, "metrics": dict | None, "model": nn.Module}``. A schedule trains stages with
    ``detkit.training.train_stage`` (one run of the :class:`~detkit.training.Trainer`) and the helpers of
    ``detkit.training.stages``.

    ``train.schedule`` names the schedule. A schedule registered with ``default=True`` gives way to the
    schedule a part of the model declares (``register(..., schedule=NAME)`` in the part's own hook), so the
    default ``end_to_end`` trains an ``svm`` head by ``svm_posthoc``; any other named schedule wins. One
    registered with ``single_process=True`` refuses to run under ``torchrun`` (a staged schedule whose steps
    each use one process)."""
