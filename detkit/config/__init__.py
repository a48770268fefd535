"""Configuration: YAML files validated into typed dataclasses.

A config file is plain data. It may name a ``base:`` file (a path relative to itself) whose contents it
is merged over: mappings merge key by key, anything else replaces (and so does a mapping whose ``name``
names another component). The merged data is validated against :class:`Config`: an unknown key fails
with its full path and the closest valid key, a wrong type names the expected type, and a number outside
the range its field declares (:func:`ranged`) names the value and the range. A number may be written in
any spelling Python's ``float()`` reads (``1e-3``, which YAML 1.1 leaves a string). ``--set a.b=value``
overrides are parsed as YAML scalars and typed by the schema; a bad value one gave is blamed on it.
Defaults are the settings of the Faster R-CNN paper (Ren et al., 2015, Sec. 3.1.3 and 3.3) and Fast
R-CNN (Girshick, 2015, Sec. 2.3).

Parts are chosen by registered name and own their settings: a section ``{name: ..., <keys>}``
(:class:`PartConfig`) is checked by :func:`bind_parts` against the settings dataclass its part was registered
with; the detector ``model.detector`` names declares which sections ``model.<key>`` it takes (its slots), so
the model's sections are checked when the config is bound to the plugin registries (``load_config(path,
overrides, registries)``; loading without them leaves them unchecked until the model is built). The
backbone's builder arguments (``model.backbone.args``) and the datasets' own keys (``data.train``) are checked
against the registered builder's signature when they are built. A file of an earlier layout is upgraded
(:func:`upgrade`, one version at a time) with a warning that names the key replacing each moved one.

The package: ``core`` (the error, ranged fields, part sections), ``schema`` (the dataclasses),
``upgrades`` (earlier layouts), ``loading`` (files, overrides, validation, writing back). Import from
``detkit.config``.
"""
from __future__ import annotations

from detkit.config.core import (ConfigError, NoSettings, PartConfig, Range, as_part, deep_merge,  # noqa: F401
                                ranged)
from detkit.config.schema import (CONFIG_VERSION, BackboneConfig, ClassifierAugmentConfig,  # noqa: F401
                                  ClassifierBackboneConfig, ClassifierConfig, ClassifierDataConfig,
                                  ClassifierEvalConfig, ClassifierModelConfig, Config, DataConfig, AugmentConfig,
                                  EvalConfig, ModelConfig, TileSettings, TrainConfig, TrainerConfig, TransformConfig)
from detkit.config.upgrades import (ConfigDeprecationWarning, drop_shared_legacy_keys,  # noqa: F401
                                    migrate_legacy, upgrade)
from detkit.config.loading import (Origin, apply_overrides, bind_parts, build_dataclass,  # noqa: F401
                                   check_kwargs, closest_hint, dump, from_dict, load_config, load_yaml,
                                   origin_of, parse_override, part_section, read_yaml_file, safe_load_yaml,
                                   to_dict)
