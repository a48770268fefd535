"""The one table of part kinds, typed build contexts, detectors that declare their shape, and a third-party
kind of part: each written the way the docs (hookspecs, docs/architecture.md) tell a plugin author to."""
from __future__ import annotations

import dataclasses
import types
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from detkit import hookspecs
from detkit.config import ConfigError, from_dict, ranged
from detkit.hookspecs import hookimpl
from detkit.models.assembly import build_detector, build_two_stage
from detkit.plugins import get_plugin_manager, get_registries
from detkit.registry.contexts import BoxHeadContext, BuildContext
from detkit.registry.kinds import KINDS, PartKind, Slot

TINY = {"name": "tiny", "args": {"widths": [8, 8, 16, 16, 16], "hidden": 32}}


def test_every_kind_has_its_hook_registry_and_documentation(registries):
    for kind in KINDS:
        spec = getattr(hookspecs, kind.hook)
        assert spec.__doc__ and kind.plural.replace("_", " ") in spec.__doc__
        assert kind.plural in registries.kinds and registries.kind(kind.key) is registries.kind(kind.plural)
    assert len({k.key for k in KINDS}) == len(KINDS) == len({k.plural for k in KINDS})


def test_a_context_checks_its_fields_against_their_types():
    head = nn.Linear(4, 4)
    ok = BoxHeadContext(pooled_shape=(16, 7, 7), backbone_head=head, head_in_channels=16, head_channels=4)
    assert ok.fields()["head_channels"] == 4
    with pytest.raises(TypeError, match=r"BoxHeadContext.pooled_shape: expected tuple\[int, \.\.\.\], got \[16, 7, 7\]"):
        BoxHeadContext(pooled_shape=[16, 7, 7], backbone_head=head, head_in_channels=16, head_channels=4)
    with pytest.raises(TypeError, match="BoxHeadContext.head_channels: expected int, got '4'"):
        BoxHeadContext(pooled_shape=(16,), backbone_head=head, head_in_channels=16, head_channels="4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.head_channels = 5


def test_the_old_hook_name_and_registry_name_still_work_with_a_warning():
    plugin = types.SimpleNamespace(__name__="old_style")

    @hookimpl
    def detkit_register_heads(register):
        register("old_predictor", lambda settings, in_features, num_classes, **_: None)

    plugin.detkit_register_heads = detkit_register_heads
    with pytest.warns(DeprecationWarning, match="detkit_register_heads is deprecated: implement "
                                                "detkit_register_box_predictors"):
        registries = get_registries(get_plugin_manager(plugins=[plugin]))
    assert "old_predictor" in registries.box_predictors
    with pytest.warns(DeprecationWarning, match="'heads' registry is now called 'box_predictors'"):
        assert "old_predictor" in registries.heads


# ----------------------------------------------------------------------------- a third-party detector and kind


@dataclass(frozen=True)
class CalibratorContext(BuildContext):
    """What a score calibrator is told: the number of classes it calibrates (without the background)."""

    num_classes: int


@dataclass
class TemperatureSettings:
    t: float = ranged(1.0, gt=0)


class Temperature(nn.Module):
    def __init__(self, settings: TemperatureSettings, context: CalibratorContext):
        super().__init__()
        self.t, self.num_classes = settings.t, context.num_classes


@dataclass
class CalibratedSettings:
    calibrate_at_test: bool = True


def _calibrated(settings: CalibratedSettings, context):
    detector = build_two_stage(settings, context)  # the lineage's assembly, reused as a library
    detector.calibrator = context.build("calibrator", CalibratorContext(num_classes=context.num_classes))
    detector.calibrate_at_test = settings.calibrate_at_test
    return detector


class CalibrationPlugin:
    """A plugin package's module: a new kind of part, one part of it, and a detector with a slot for it."""

    __name__ = "calibration"

    @hookimpl
    def detkit_register_part_kinds(self, register):
        register(PartKind("score_calibrator", "score_calibrators", "Score calibrators: builder(settings, "
                          "context: CalibratorContext) -> nn.Module.", CalibratorContext))

    @hookimpl
    def detkit_register_score_calibrators(self, register):
        register("temperature", Temperature, settings=TemperatureSettings, paper="Guo et al. 2017")

    @hookimpl
    def detkit_register_detectors(self, register):
        two_stage = get_registries().detectors.get("faster_rcnn").info["slots"]  # the two-stage shape
        register("calibrated_rcnn", _calibrated, settings=CalibratedSettings,
                 slots=[*two_stage, Slot("calibrator", "score_calibrator", "temperature")])


def test_a_third_party_kind_and_detector_need_no_edit_of_the_core():
    registries = get_registries(get_plugin_manager(plugins=[CalibrationPlugin()]))
    assert registries.load_errors == {}
    assert "temperature" in registries.score_calibrators and "score_calibrators" in registries.kinds
    cfg = from_dict({"model": {"detector": {"name": "calibrated_rcnn", "calibrate_at_test": False},
                               "backbone": TINY, "transform": {"min_size": 64, "max_size": 96},
                               "calibrator": {"name": "temperature", "t": 2.5}}})
    model = build_detector(cfg.model, registries, num_classes=3)
    assert isinstance(model.calibrator, Temperature) and (model.calibrator.t, model.calibrator.num_classes) == (2.5, 3)
    assert model.calibrate_at_test is False
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8)])
    assert det["boxes"].shape[1] == 4
    # its sections are checked like the built-in ones: keys, types, ranges
    bad = from_dict({"model": {"detector": "calibrated_rcnn", "calibrator": {"name": "temperature", "tt": 2}}})
    with pytest.raises(ConfigError, match=r"unknown key 'model.calibrator.tt'; did you mean 'model.calibrator.t'"):
        registries.bind(bad)
    bad = from_dict({"model": {"detector": "calibrated_rcnn", "calibrator": {"name": "temperature", "t": 0}}})
    with pytest.raises(ConfigError, match=r"model.calibrator.t=0.0: expected a number > 0"):
        registries.bind(bad)
    # a slot another detector does not declare is an unknown key for that detector
    with pytest.raises(ConfigError, match=r"unknown key 'model.calibrator' for detector 'faster_rcnn'"):
        registries.bind(from_dict({"model": {"calibrator": {"name": "temperature"}}}))


def test_declared_kinds_and_slots_are_checked_as_a_whole():
    class TakenWord:
        __name__ = "taken"

        @hookimpl
        def detkit_register_part_kinds(self, register):
            register(PartKind("box_head", "box_heads", "again", None))

    class BadSlot:
        __name__ = "badslot"

        @hookimpl
        def detkit_register_detectors(self, register):
            register("odd", _calibrated, slots=[Slot("calibrator", "no_such_kind")])

    class ScheduledDataset:
        __name__ = "scheduled"

        @hookimpl
        def detkit_register_datasets(self, register):
            register("mine", lambda **_: None, schedule="svm_posthoc")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        registries = get_registries(get_plugin_manager(plugins=[TakenWord(), BadSlot(), ScheduledDataset()]))
    errors = registries.load_errors
    assert "'box_head' is already a kind of part" in errors["taken"]
    assert "slot 'calibrator' holds kind 'no_such_kind', which is no model part kind" in errors["badslot"]
    assert "a dataset declares no training schedule" in errors["scheduled"]


def test_a_builder_written_for_keyword_arguments_still_builds_with_a_warning(registries):
    class OldExtractor:
        __name__ = "old_extractor"

        @hookimpl
        def detkit_register_roi_extractors(self, register):
            from detkit.ops import RoIPoolExtractor

            register("old_pool", lambda settings, output_size, strides, **_: RoIPoolExtractor(output_size, strides))

    registries = get_registries(get_plugin_manager(plugins=[OldExtractor()]))
    cfg = from_dict({"model": {"backbone": TINY, "roi_extractor": "old_pool"}})
    with pytest.warns(DeprecationWarning, match=r"roi_extractor 'old_pool' of plugin 'old_extractor': a builder "
                                                r"taking keyword arguments is deprecated"):
        model = build_detector(cfg.model, registries, num_classes=2)
    assert type(model.roi_heads.roi_extractor).__name__ == "RoIPoolExtractor"


CALIBRATION_MODULE = '''
from dataclasses import dataclass

from detkit.hookspecs import hookimpl
from detkit.registry.contexts import BuildContext
from detkit.registry.kinds import PartKind


@dataclass(frozen=True)
class CalibratorContext(BuildContext):
    num_classes: int


@dataclass
class TemperatureSettings:
    t: float = 1.0


@hookimpl
def detkit_register_part_kinds(register):
    register(PartKind("score_calibrator", "score_calibrators", "Score calibrators.", CalibratorContext))


@hookimpl
def detkit_register_score_calibrators(register):
    register("temperature", lambda settings, context: None, settings=TemperatureSettings, paper="Guo et al. 2017")
'''


def test_detkit_list_shows_a_plugins_kind_and_takes_the_earlier_name_of_a_kind(tmp_path, monkeypatch, capsys):
    from detkit.cli import main

    (tmp_path / "calibration_plugin.py").write_text(CALIBRATION_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DETKIT_PLUGINS", "calibration_plugin")  # found as a third-party plugin is

    assert main(["list", "score_calibrators"]) == 0
    out = capsys.readouterr().out
    assert "score_calibrators (1):" in out and "temperature" in out and "keys=[t]" in out
    assert main(["list", "heads"]) == 0
    run = capsys.readouterr()
    assert run.out.startswith("box_predictors (") and "softmax_box " in run.out  # as many as the installed plugins give
    assert "the 'heads' registry is now called 'box_predictors'" in run.err
    assert main(["list", "box_heds"]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'box_heds'" in err and "score_calibrators" in err
