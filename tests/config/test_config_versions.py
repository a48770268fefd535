"""Config layouts have a version; a file of an earlier one is upgraded one version at a time, with a warning
that names the key that replaces each moved one, and a file from a newer release is refused."""
from __future__ import annotations

import pytest
import yaml

from detkit.config import CONFIG_VERSION, ClassifierConfig, ConfigDeprecationWarning, ConfigError, dump, from_dict

from test_config import with_stored_cache_dir


def test_version_2_four_step_iters_become_the_schedules_own_setting(registries):
    old = {"train": {"schedule": "four_step", "four_step_iters": [3, 3, 2, 2]}}
    with pytest.warns(ConfigDeprecationWarning, match=r"train.four_step_iters -> train.schedule.iters"):
        cfg = registries.bind(from_dict(old, "old.yaml"))
    assert (cfg.version, cfg.train.schedule.name, cfg.train.schedule.settings.iters) == (CONFIG_VERSION, "four_step",
                                                                                         [3, 3, 2, 2])
    # written back in today's layout, it loads without a warning and binds to the same settings
    again = yaml.safe_load(dump(cfg))
    assert again["version"] == CONFIG_VERSION and "four_step_iters" not in again["train"]
    assert registries.bind(from_dict(again)) == cfg
    # for another schedule the key configured nothing and goes
    with pytest.warns(ConfigDeprecationWarning, match="train.four_step_iters dropped"):
        cfg = registries.bind(from_dict({"train": {"four_step_iters": [1, 1, 1, 1]}}))
    assert cfg.train.schedule.name == "end_to_end"


def test_a_file_that_says_it_is_current_is_not_upgraded():
    with pytest.raises(ConfigError, match=r"unknown key 'train.four_step_iters'"):
        from_dict({"version": CONFIG_VERSION, "train": {"four_step_iters": [1, 1, 1, 1]}})


@pytest.mark.parametrize("version", [CONFIG_VERSION + 1, "3", True])
def test_a_version_this_release_does_not_read_is_refused(version):
    with pytest.raises(ConfigError, match=rf"c.yaml: version: {version!r} is no config layout this release reads"):
        from_dict({"version": version}, "c.yaml")


def test_pretraining_configs_of_version_2_drop_the_detection_schedule_keys():
    stored = {"train": {"schedule": "end_to_end", "four_step_iters": [80000, 40000, 80000, 40000], "lr": 0.1}}
    cfg = from_dict(stored, "ckpt", schema=ClassifierConfig)
    assert cfg.train.lr == 0.1 and not hasattr(cfg.train, "schedule")
    with pytest.raises(ConfigError, match=r"train.schedule='four_step': pretraining is one run of SGD"):
        from_dict({"train": {"schedule": "four_step"}}, "c.yaml", schema=ClassifierConfig)


def test_lr_schedule_is_now_lr_policy_in_both_schemas(registries):
    for schema, source in ((None, "det.yaml"), (ClassifierConfig, "cls.yaml")):
        with pytest.warns(ConfigDeprecationWarning, match=rf"{source}: deprecated config key: train.lr_schedule -> "
                                                          r"train.lr_policy"):
            cfg = from_dict({"train": {"lr_schedule": "cosine"}}, source, **({"schema": schema} if schema else {}))
        assert cfg.train.lr_policy == "cosine"


@pytest.mark.parametrize("name", ["faster_rcnn_4step_tiny_synth", "rcnn_tiny_synth", "faster_rcnn_tiny_fpn_synth",
                                  "pretrain_lenet5_digits"])
def test_configs_stored_in_the_version_2_layout_resolve_to_todays(name, registries):
    """tests/fixtures/*_v2.yaml are what the release before version 3 printed and stored in checkpoints for the
    shipped configs; upgraded, they resolve to exactly the config today's file gives."""
    import os

    from detkit.config import load_config, to_dict

    here = os.path.join(os.path.dirname(__file__), "..")
    schema = {"schema": ClassifierConfig} if name.startswith("pretrain_") else {}
    with open(os.path.join(here, "fixtures", f"{name}_v2.yaml"), encoding="utf-8") as f:
        stored = yaml.safe_load(f)
    with pytest.warns(ConfigDeprecationWarning):
        before = from_dict(stored, source=name, **schema)
    today = load_config(os.path.join(here, "..", "configs", f"{name}.yaml"), **schema)
    if not schema:
        before, today = registries.bind(before), registries.bind(today)
    assert to_dict(before) == with_stored_cache_dir(to_dict(today))
