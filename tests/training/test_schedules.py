"""Training schedules are registered parts: found through the plugin hook, chosen by ``train.schedule`` or by
the schedule a model part declares, and added by a third-party plugin exactly as the built-in ones are."""
import types

import pytest

import detkit_core
from detkit.config import ConfigError, from_dict
from detkit.hookspecs import hookimpl
from detkit.plugins import PluginWarning, get_plugin_manager, get_registries
from detkit.training import declared_schedules, resolve_schedule, train

SVM = {"model": {"box_predictor": {"name": "svm"}}}


def _schedule(cfg: dict, registries) -> str:
    return resolve_schedule(from_dict(cfg), registries)[0].name


def test_core_schedules_and_the_schedule_a_part_declares(registries):
    assert {"end_to_end", "four_step", "svm_posthoc"} <= set(registries.schedules)
    assert _schedule({}, registries) == "end_to_end"
    assert declared_schedules(from_dict(SVM).model, registries) == {"svm_posthoc": ["model.box_predictor.name='svm'"]}
    assert _schedule(SVM, registries) == "svm_posthoc"
    # An old config's explicit end_to_end means what it meant: the default, which gives way to the head's.
    assert _schedule({**SVM, "train": {"schedule": "end_to_end"}}, registries) == "svm_posthoc"
    # Any other schedule named in the config wins.
    assert _schedule({"train": {"schedule": "four_step"}}, registries) == "four_step"
    assert _schedule({**SVM, "train": {"schedule": "four_step"}}, registries) == "four_step"


def test_unknown_schedule_names_the_key_and_the_closest_name(registries):
    with pytest.raises(ConfigError, match=r"train.schedule='four_stp'.*did you mean 'four_step'"):
        _schedule({"train": {"schedule": "four_stp"}}, registries)


def test_duplicate_schedule_names_both_plugins_and_skips_the_third_party_one():
    dup = types.ModuleType("dup_schedules")

    @hookimpl
    def detkit_register_schedules(register):
        register("four_step", lambda cfg, registries, resume=None, progress=True: {})

    dup.detkit_register_schedules = detkit_register_schedules
    with pytest.warns(PluginWarning, match=r"'dup_schedules' failed.*schedule 'four_step', which built-in plugin "
                                           r"'core' provides"):
        registries = get_registries(get_plugin_manager(plugins=[dup]))
    assert registries.schedules.get("four_step").plugin == "core"


def test_staged_schedules_refuse_torchrun(registries, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"model.box_predictor.name='svm'.*without torchrun"):
        train(from_dict(SVM), registries)
    with pytest.raises(ConfigError, match=r"train.schedule='four_step'.*without torchrun"):
        train(from_dict({"train": {"schedule": "four_step"}}), registries)


def _recipe_plugin(calls: list, declare_on: str = "heads"):
    """A third-party plugin: a schedule ``distill``, and a head (or proposal source) that declares it."""
    plugin = types.ModuleType("recipe_plugin")

    def distill(cfg, registries, resume=None, progress=True):
        calls.append((cfg.model.box_predictor.name, resume, progress))
        return {"checkpoint": None, "metrics": None, "model": None}

    @hookimpl
    def detkit_register_schedules(register):
        register("distill", distill)

    @hookimpl
    def detkit_register_heads(register):
        register("student", lambda in_features, num_classes, cfg=None: None, schedule="distill")

    @hookimpl
    def detkit_register_proposal_generators(register):
        register("learned_ss", lambda cfg, in_channels, stride: None, schedule="svm_posthoc")

    plugin.detkit_register_schedules = detkit_register_schedules
    plugin.detkit_register_heads = detkit_register_heads
    plugin.detkit_register_proposal_generators = detkit_register_proposal_generators
    return plugin


def test_third_party_schedule_runs_when_a_part_declares_it_or_the_config_names_it():
    calls = []
    registries = get_registries(get_plugin_manager(plugins=[_recipe_plugin(calls)]))
    assert registries.schedules.get("distill").plugin == "recipe_plugin"
    train(from_dict({"model": {"box_predictor": {"name": "student"}}}), registries, resume=True, progress=False)
    train(from_dict({"train": {"schedule": "distill"}}), registries)
    assert calls == [("student", True, False), ("softmax_box", None, True)]


def test_parts_that_declare_different_schedules_are_an_error():
    registries = get_registries(get_plugin_manager(plugins=[_recipe_plugin([])]))
    cfg = {"model": {"box_predictor": {"name": "student"}, "proposal_generator": "learned_ss"}}
    with pytest.raises(ConfigError, match=r"model.proposal_generator.name='learned_ss' needs 'svm_posthoc'.*"
                                          r"model.box_predictor.name='student' needs 'distill'"):
        _schedule(cfg, registries)


def test_concat_builds_its_parts_from_the_callers_registries(tmp_path):
    """A nested dataset format known only to the caller's plugin manager (no fresh one is made)."""
    from detkit.data.coco import COCODataset
    from detkit.data.loading import build_dataset
    from detkit.data.synth import synthesize

    plugin = types.ModuleType("private_format")

    @hookimpl
    def detkit_register_datasets(register):
        register("private_coco", lambda images, annotations, transform=None, skip_empty=False:
                 COCODataset(images=images, annotations=annotations, transform=transform, skip_empty=skip_empty))

    plugin.detkit_register_datasets = detkit_register_datasets
    registries = get_registries(get_plugin_manager(autoload=False, plugins=[detkit_core, plugin]))
    for k in (0, 1):
        synthesize(str(tmp_path / str(k)), "coco", 2, seed=k, image_size=(48, 64))
    parts = [{"name": "private_coco", "images": str(tmp_path / str(k) / "images"),
              "annotations": str(tmp_path / str(k) / "annotations.json")} for k in (0, 1)]
    assert len(build_dataset({"name": "concat", "datasets": parts}, registries, "train")) == 4
    with pytest.raises(ConfigError, match="data.train.build_dataset: set by detkit"):
        build_dataset({"name": "concat", "datasets": parts, "build_dataset": None}, registries, "train")
