"""The hooks a detkit plugin may implement.

Every kind of part has one hook. A hook receives a ``register`` callback and
calls it once per part it provides::

    register(name: str, builder: Callable[..., object], settings: type | None = None, **info)

A model part (proposal generator, RoI extractor, head) owns its settings: ``settings`` is a dataclass whose
fields are the keys of the part's config section (``model.roi_extractor: {name: my_pool, bins: 5}``);
the section is validated against it (an unknown key gets the closest valid one, a wrong type names the
expected type) and the builder receives the instance as its first argument, followed by keyword
arguments the assembly supplies (listed per hook below; accept ``**_`` for the ones you do not use).
Backbones and datasets take their keys as builder keyword arguments instead (``model.backbone.args``,
``data.train``). ``info`` is metadata shown by ``detkit list`` (for example ``family="resnet"``) and
declarations the host reads: a model part whose training needs a schedule of its own declares it
(``schedule="svm_posthoc"``, see :func:`detkit_register_schedules`); an RoI extractor declares what it
consumes and produces (see :func:`detkit_register_roi_extractors`). The host owns the names: a
plugin's hooks are called, its registrations checked as a whole, and a plugin that fails (its hook raises,
registers an invalid part or a name twice, or a name a built-in plugin provides; a hook function whose name
matches no hook below, or a ``detkit_register_*`` function without ``@hookimpl``) is skipped with none of
its parts kept and reported by name with the reason (``detkit list plugins``). A name two third-party
plugins register is an error, naming both, for the command that asks for it.

A third-party plugin is an importable module with ``@hookimpl`` functions and
one ``[project.entry-points.detkit]`` line in its package metadata.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("detkit")
hookimpl = pluggy.HookimplMarker("detkit")


@hookspec
def detkit_register_backbones(register):
    """Register backbones: ``builder(num_classes=1000, **args) -> detkit.backbones.Backbone``.

    ``args`` are the keys of ``model.backbone.args``, checked against the builder's signature (an unknown key
    is a config error), so give every option a default: ``detkit list`` builds each backbone with no
    arguments (on the meta device) to count its parameters. The model is a complete classifier whose
    ``detection_parts()`` says how a detector cuts it (:class:`detkit.backbones.DetectionParts`: trunk,
    stride, channels, RoI head, the trunk's ``stages`` that ``model.backbone.freeze_at`` counts) and whose
    ``defaults`` (:class:`detkit.backbones.BackboneDefaults`: input size, mean/std, RoI grid) the detector
    uses; ``feature_stages()`` (optional) lets a neck (FPN) read its stages. ``info``: ``family=`` and
    ``paper=`` are shown by ``detkit list backbones``; the one key detkit acts on is ``schedule=`` (as for
    every part, see :func:`detkit_register_schedules`). A family of variants registers its table with
    :func:`detkit.backbones.register_variants`."""


@hookspec
def detkit_register_necks(register):
    """Register necks (FPN), between the backbone's stages and the heads (config ``model.neck``):
    ``builder(settings, stages: detkit.backbones.FeatureStages, backbone: str) -> nn.Module`` with
    ``in_indices`` (the stages whose outputs it reads, increasing), ``out_info`` (a
    :class:`~detkit.backbones.FeatureInfo` per map it returns, finest first) and ``roi_levels`` (how many of
    those maps, from the finest, the RoI extractor pools from; the rest serve the proposal generator only);
    ``forward(list of the stages' outputs) -> list[Tensor]``. Refuse a backbone whose stages do not fit
    with a ``ConfigError`` naming what is missing."""


@hookspec
def detkit_register_proposal_generators(register):
    """Register proposal sources (RPN, selective search, ...): ``builder(settings, in_channels: int,
    strides: list[int]) -> detkit.models.proposal_source.ProposalSource`` (``strides``: one per feature map,
    several with a neck): ``forward(images: ImageList, features (B, C, H, W) or a list of maps finest first,
    targets | None, given | None, phase | None) -> (proposals list[Tensor[N_i, 4]], losses dict)``, boxes in
    resized-image pixels; ``given`` are the boxes the batch carried, rescaled to the resized images by the
    detector; ``propose(images)`` makes boxes from the original images (None: the source needs features);
    ``dataset_proposals(dataset, ...)`` keeps boxes per dataset (None: it keeps none). A source registered with
    ``per_dataset=True`` keeps them and builds without a trunk (``in_channels=None, strides=None``), so
    ``detkit proposals compute / eval`` can fill and score its caches."""


@hookspec
def detkit_register_roi_extractors(register):
    """Register RoI feature extractors (RoI pooling, RoIAlign, SPP, warp): ``builder(settings, output_size: int,
    strides: list[int], trunk: nn.Module, input_size: int) -> nn.Module`` (``output_size``: the pooled grid
    the backbone's RoI head expects; ``strides``: of the maps to pool from, one without a neck, the neck's
    ``roi_levels`` with one; ``trunk`` and ``input_size``: the backbone's CNN and classifier input side;
    ``detkit.ops.roi.LevelPooling`` assigns regions to pyramid levels) mapping ``(features (B, C, H, W) or a
    list of maps, proposals list[Tensor[N_i, 4]] (resized-image pixels), image_sizes)``
    to ``(sum N_i, C, S, S)`` and giving ``out_features(C) -> int``, the length of one region's flattened
    output. Declarations: ``produces="vector"`` for an extractor whose output is a flat ``(sum N_i, D)``
    vector (the RoI head's first fully connected layer is then rebuilt for D, as for SPP; default "grid");
    ``consumes="image"`` for one that cuts windows from the normalised images and runs ``trunk`` itself
    (R-CNN's warp; built by the ``rcnn`` assembly; default "features")."""


@hookspec
def detkit_register_box_heads(register):
    """Register box heads, the layers between the pooled regions and the box predictor (config
    ``model.box_head``; ``backbone``, the default, is the backbone's own RoI head: fc6/fc7, res5):
    ``builder(settings, pooled_shape: tuple, backbone_head: nn.Module, head_channels: int)
    -> (module, out_features)``: ``pooled_shape`` is one region's ``(C, S, S)`` grid, or ``(D,)`` for an
    extractor that produces vectors; the module maps ``(R, *pooled_shape)`` to ``(R, out_features)``."""


@hookspec
def detkit_register_heads(register):
    """Register box predictors (the classifier and box regressor on the RoI head's vectors, config section
    ``model.box_predictor``): ``builder(settings, in_features: int, num_classes: int, pooled_features: int,
    box_coder_weights: tuple) -> detkit.models.roi_heads.BoxPredictor`` mapping ``(vectors (R, in_features),
    pooled (R, pooled_features))`` to ``(class_logits (R, K+1), box_deltas (R, 4(K+1)))``; its
    ``class_scores(class_logits)`` gives the test-time scores (a softmax by default; R-CNN's SVM margins are
    used as they are). A head that is not trained by SGD declares the schedule that fits it, e.g.
    ``register("svm", ..., schedule="svm_posthoc", finetune_head="softmax_box")``."""


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
def detkit_register_classification_datasets(register):
    """Register classification dataset formats for ``detkit pretrain`` and ``detkit eval-cls``:
    ``builder(**kwargs, transform) -> detkit.classification.datasets.ClassificationDataset`` (images with one
    label each; ``data.train: {name: ..., <the builder's keyword arguments>}``)."""


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
