"""The one table of part kinds: every kind of part detkit builds is declared here once.

Each :class:`PartKind` says what the rest of detkit derives from it: the hook a plugin implements
(:mod:`detkit.hookspecs` is made from this table), the registry it fills (``registries.<plural>``,
``detkit list <plural>``), how its builder is called (with a settings dataclass and a typed
:mod:`~detkit.registry.contexts` class, or with keyword arguments for backbones and datasets), whether a part
of it may declare the training schedule it needs, and the names it had before (kept for one release with a
deprecation warning). A detector chooses its parts through the :class:`Slot` s it declares; the config's part
sections, their validation and the schedule resolution follow from those declarations. Adding a kind is one
entry in :data:`KINDS`.
"""
from __future__ import annotations

from dataclasses import dataclass

from detkit.registry import contexts as ctx


@dataclass(frozen=True)
class PartKind:
    """One kind of part.

    key: the singular word (config keys, messages): ``"box_predictor"``.
    plural: the registry and ``detkit list`` name: ``"box_predictors"``.
    doc: what a builder of this kind gets and returns (the hook's documentation).
    context: the build context class its builder receives after its settings; None: the builder takes
        keyword arguments (a backbone's ``model.backbone.args``, a dataset's own keys).
    schedules: a part of this kind may declare ``schedule=NAME`` (the training it needs).
    legacy_hooks: hook names of earlier releases that still register this kind (with a warning).
    legacy_plurals: registry names of earlier releases (``registries.heads``), with a warning.
    """

    key: str
    plural: str
    doc: str
    context: type | None = None
    schedules: bool = True
    legacy_hooks: tuple[str, ...] = ()
    legacy_plurals: tuple[str, ...] = ()

    @property
    def hook(self) -> str:
        return f"detkit_register_{self.plural}"

    @property
    def takes_settings(self) -> bool:
        """Registered with ``settings=`` (a dataclass of its config section's keys) and built with a context."""
        return self.context is not None


@dataclass(frozen=True)
class Slot:
    """A place in a detector for one part or one settings section, under ``model.<key>``.

    key: the config key (``"roi_extractor"``: ``model.roi_extractor: {name: roi_align, ...}``).
    kind: the :class:`PartKind` key of the part it holds; None for a settings section of the detector's own
        (``settings`` is its dataclass, e.g. the second stage's sampling and post-processing).
    default: the part chosen when the config names none; None: the slot is optional and left empty.
    choices: the part names this detector accepts (empty: any registered one).
    settings: the dataclass of a settings section (``kind`` None).
    doc: one line for ``detkit list detectors`` and the docs.
    """

    key: str
    kind: str | None = None
    default: str | None = None
    choices: tuple[str, ...] = ()
    settings: type | None = None
    doc: str = ""

    def problem(self, kinds: dict[str, PartKind]) -> str | None:
        """Why this declaration is invalid, or None (``kinds``: the kinds of part there are, by key)."""
        if not self.key.isidentifier():
            return f"slot key {self.key!r} is not an identifier"
        if self.kind is None:
            return None if isinstance(self.settings, type) else f"slot {self.key!r} has neither kind nor settings"
        slotted = [k.key for k in kinds.values() if k.context is not None and k.key not in NOT_SLOTTED]
        if self.kind not in slotted:
            return f"slot {self.key!r} holds kind {self.kind!r}, which is no model part kind ({', '.join(slotted)})"
        return None


KINDS: tuple[PartKind, ...] = (
    PartKind("backbone", "backbones", """Backbones: ``builder(num_classes=1000, **args) ->
    detkit.backbones.Backbone``. ``args`` are the keys of ``model.backbone.args``, checked against the builder's
    signature (an unknown key is a config error), so give every option a default: ``detkit list`` builds each
    backbone with no arguments (on the meta device) to count its parameters. The model is a complete classifier
    whose ``detection_parts()`` says how a detector cuts it (:class:`detkit.backbones.DetectionParts`) and whose
    ``defaults`` (:class:`detkit.backbones.BackboneDefaults`) the detector uses; ``feature_stages()`` (optional)
    lets a neck read its stages. ``info``: ``family=`` and ``paper=`` are shown by ``detkit list backbones``. A
    family registers its table of variants with :func:`detkit.backbones.register_variants`."""),
    PartKind("neck", "necks", """Necks (FPN), between the backbone's stages and the heads (``model.neck``):
    ``builder(settings, context: NeckContext) -> nn.Module`` with ``in_indices`` (the stages it reads,
    increasing), ``out_info`` (a :class:`~detkit.backbones.FeatureInfo` per map it returns, finest first) and
    ``roi_levels`` (how many maps, from the finest, the RoI extractor pools from); ``forward(list of the stages'
    outputs) -> list[Tensor]``. Refuse a backbone whose stages do not fit with a ``ConfigError``.""",
             ctx.NeckContext),
    PartKind("proposal_generator", "proposal_generators", """Proposal sources (RPN, selective search, ...):
    ``builder(settings, context: ProposalGeneratorContext) -> detkit.models.proposal_source.ProposalSource``:
    ``forward(images, features, targets | None, given | None, phase | None) -> (proposals list[Tensor[N_i, 4]],
    losses)``, boxes in resized-image pixels; ``propose(images)`` makes boxes from the original images (None: it
    needs features); ``dataset_proposals(dataset, ...)`` keeps boxes per dataset (None: it keeps none).
    Declarations: ``per_dataset=True`` for a source that keeps boxes per dataset and builds without a model
    (``detkit proposals``); ``learned=True`` for one whose proposals the network computes (an exported graph
    can hold it).""", ctx.ProposalGeneratorContext),
    PartKind("roi_extractor", "roi_extractors", """RoI feature extractors (RoI pooling, RoIAlign, SPP, warp):
    ``builder(settings, context: RoIExtractorContext) -> nn.Module`` mapping ``(features or a list of maps,
    proposals list[Tensor[N_i, 4]], image_sizes)`` to ``(sum N_i, C, S, S)`` and giving ``out_features(C)``, the
    length of one region's flattened output. Declarations: ``produces="vector"`` for an extractor whose output
    is a flat ``(sum N_i, D)`` vector (SPP; default "grid"); ``consumes="image"`` for one that cuts windows from
    the images and runs the trunk itself (R-CNN's warp; default "features").""", ctx.RoIExtractorContext),
    PartKind("box_head", "box_heads", """Box heads, the layers between the pooled regions and the box predictor
    (``model.box_head``; ``backbone`` is the backbone's own RoI head): ``builder(settings, context:
    BoxHeadContext) -> (module, out_features)``; the module maps ``(R, *pooled_shape)`` to
    ``(R, out_features)``.""", ctx.BoxHeadContext),
    PartKind("box_predictor", "box_predictors", """Box predictors, the classifier and box regressor on the box
    head's vectors (``model.box_predictor``): ``builder(settings, context: BoxPredictorContext) ->
    detkit.models.roi_heads.BoxPredictor`` mapping ``(vectors (R, in_features), pooled (R, pooled_features))``
    to ``(class_logits (R, K+1), box_deltas (R, 4(K+1)))``; its ``class_scores(class_logits)`` gives the
    test-time scores. A predictor that is not trained by SGD declares the schedule that fits it, e.g.
    ``register("svm", ..., schedule="svm_posthoc", finetune_predictor="softmax_box")``.""",
             ctx.BoxPredictorContext, legacy_hooks=("detkit_register_heads",), legacy_plurals=("heads",)),
    PartKind("detector", "detectors", """Detectors: ``builder(settings, context: DetectorContext) ->
    nn.Module`` whose forward follows :class:`detkit.models.detector.TwoStageDetector` (images, targets,
    proposals -> losses in training, detections per image otherwise). The registration declares the detector's
    shape: ``slots=[Slot(key, kind, default, choices), ...]`` (:class:`detkit.registry.kinds.Slot`), the part
    sections ``model.<key>`` it takes; the core binds and validates those sections and the builder builds each
    with ``context.build(key, <that kind's context>)``.""", ctx.DetectorContext),
    PartKind("dataset", "datasets", """Detection dataset formats: ``builder(**kwargs) ->
    detkit.data.DetectionDataset`` (``data.train: {name: ..., <its keyword arguments>}``). A builder that accepts
    ``build_dataset`` receives ``build_dataset(spec, key)``, which builds a nested dataset (``concat``).
    ``from_path=function(path) -> spec | None`` lets a command that is given a bare path (``detkit eval
    --data PATH``) recognise this format.""", schedules=False),
    PartKind("classification_dataset", "classification_datasets", """Classification dataset formats for
    ``detkit pretrain`` and ``detkit eval-cls``: ``builder(**kwargs, transform) ->
    detkit.classification.datasets.ClassificationDataset``. ``from_path=function(path) -> spec | None`` as for
    detection datasets.""", schedules=False),
    PartKind("schedule", "schedules", """Training schedules (``train.schedule: {name: ..., <its settings>}``):
    ``run(settings, context: ScheduleContext) -> {"checkpoint": path, "metrics": dict | None, "model":
    nn.Module}``. A schedule trains stages with ``detkit.training.train_stage`` and the helpers of
    ``detkit.training.stages``. One registered with ``default=True`` gives way to the schedule a chosen part
    declares (``register(..., schedule=NAME)``); ``single_process=True`` refuses ``torchrun``.""",
             ctx.ScheduleContext, schedules=False),
    PartKind("logger", "loggers", """Training loggers (``train.loggers: [{name: ..., <its settings>}, ...]``):
    ``builder(settings, context: LoggerContext) -> detkit.training.loggers.Logger`` (``log_scalars(step,
    values)``, ``log_images(step, images)``, ``log_config(config)``, ``close()``). Built by the main process
    only, at the start of a run; one resumed drops what it holds after ``context.start_iter``.""",
             ctx.LoggerContext, schedules=False),
)

#: kinds with a context that no detector slot holds: the detector itself, the training schedule, the loggers
NOT_SLOTTED = ("detector", "schedule", "logger")
#: hook name -> kind, the deprecated names included
BY_HOOK: dict[str, PartKind] = {h: k for k in KINDS for h in (k.hook, *k.legacy_hooks)}
