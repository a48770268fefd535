"""Config loading: base chains, validation messages, typed overrides, dumps, parts' own settings, keys of
the earlier layout."""
import warnings

import pytest
import yaml

from detkit.config import (Config, ConfigDeprecationWarning, ConfigError, PartConfig, apply_overrides, bind_parts,
                           dump, from_dict, load_config, parse_override, to_dict)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_the_papers(registries):
    cfg = bind_parts(Config(), registries)
    rpn = cfg.model.proposal_generator.settings
    assert cfg.model.proposal_generator.name == "rpn"
    assert rpn.fg_iou_thresh == 0.7 and rpn.bg_iou_thresh == 0.3
    assert rpn.batch_size_per_image == 256 and rpn.positive_fraction == 0.5
    assert (rpn.pre_nms_top_n_train, rpn.post_nms_top_n_train) == (12000, 2000)
    assert (rpn.pre_nms_top_n_test, rpn.post_nms_top_n_test) == (6000, 300)
    assert rpn.nms_thresh == 0.7
    assert cfg.model.roi_heads.batch_size_per_image == 128 and cfg.model.roi_heads.positive_fraction == 0.25
    assert (cfg.model.roi_heads.bg_iou_thresh_lo, cfg.model.roi_heads.bg_iou_thresh_hi) == (0.1, 0.5)
    assert cfg.model.roi_heads.score_thresh == 0.05 and cfg.model.roi_heads.detections_per_img == 100
    assert (cfg.model.transform.min_size, cfg.model.transform.max_size) == (600, 1000)
    assert rpn.anchors.sizes == [128, 256, 512] and rpn.anchors.aspect_ratios == [0.5, 1, 2]
    assert (cfg.model.roi_extractor.name, cfg.model.box_predictor.name) == ("roi_pool", "softmax_box")
    assert cfg.train.lr == 0.001 and cfg.train.momentum == 0.9 and cfg.train.weight_decay == 0.0005


def test_base_chain_merges_plainly(tmp_path, registries):
    write(tmp_path, "base.yaml", {"model": {"proposal_generator": {"name": "rpn", "nms_thresh": 0.6, "min_size": 8}},
                                  "train": {"lr": 0.1}})
    write(tmp_path, "mid.yaml", {"base": "base.yaml", "model": {"proposal_generator": {"min_size": 2}}})
    child = write(tmp_path, "child.yaml", {"base": "mid.yaml", "train": {"max_iters": 5},
                                           "model": {"proposal_generator": "rpn"}})  # the name alone keeps the rest
    cfg = load_config(child, registries=registries)
    rpn = cfg.model.proposal_generator.settings
    assert rpn.nms_thresh == 0.6 and rpn.min_size == 2.0
    assert cfg.train.lr == 0.1 and cfg.train.max_iters == 5


def test_circular_base_is_reported(tmp_path):
    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_names_full_path_and_closest(tmp_path, registries):
    path = write(tmp_path, "c.yaml", {"model": {"roi_heads": {"nms_treshold": 0.3}}})
    with pytest.raises(ConfigError) as err:
        load_config(path, registries=registries)
    msg = str(err.value)
    assert "model.roi_heads.nms_treshold" in msg and "model.roi_heads.nms_thresh" in msg and str(path) in msg
    # A part's own keys: checked against the settings its part was registered with.
    path = write(tmp_path, "p.yaml", {"model": {"roi_extractor": {"name": "roi_align", "sampling_ratoi": 2}}})
    with pytest.raises(ConfigError) as err:
        load_config(path, registries=registries)
    msg = str(err.value)
    assert "model.roi_extractor.sampling_ratoi" in msg and "model.roi_extractor.sampling_ratio" in msg
    assert str(path) in msg
    # a key of another part (the RPN's) is not selective search's
    with pytest.raises(ConfigError, match=r"unknown key 'model\.proposal_generator\.nms_thresh'"):
        bind_parts(from_dict({"model": {"proposal_generator": {"name": "selective_search", "nms_thresh": 1}}}),
                   registries)
    with pytest.raises(ConfigError, match=r"model\.proposal_generator\.name: unknown proposal_generator 'rnp'.*'rpn'"):
        bind_parts(from_dict({"model": {"proposal_generator": "rnp"}}), registries)


def test_wrong_type_names_expected_type(tmp_path, registries):
    path = write(tmp_path, "c.yaml", {"train": {"max_iters": "many"}})
    with pytest.raises(ConfigError, match=r"train\.max_iters: expected an integer, got 'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.proposal_generator\.anchors\.sizes\[1\]: expected a number"):
        bind_parts(from_dict({"model": {"proposal_generator": {"anchors": {"sizes": [32, "big"]}}}}), registries)
    with pytest.raises(ConfigError, match="expected true/false"):
        from_dict({"train": {"eval_at_end": "yes please"}})


def test_overrides_are_typed_by_schema(tmp_path, registries):
    path = write(tmp_path, "c.yaml", {"train": {"lr": 0.1}, "model": {"proposal_generator": "rpn"}})
    cfg = load_config(path, ["train.lr=1", "model.proposal_generator.anchors.sizes=[8, 16]",
                             "train.clip_grad_norm=null", "model.transform.min_size=[400, 500]"], registries)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.proposal_generator.name == "rpn"
    assert cfg.model.proposal_generator.settings.anchors.sizes == [8.0, 16.0]
    assert load_config(path, ["model.backbone.name=123"]).model.backbone.name == "123"  # a name, not a number
    with pytest.raises(Exception, match="unknown backbone '123'"):  # bound to the registries: a name they lack
        load_config(path, ["model.backbone.name=123"], registries)
    assert cfg.train.clip_grad_norm is None
    assert cfg.model.transform.min_size == [400, 500]
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_dump_roundtrips(registries):
    cfg = load_cfg = from_dict({"model": {"backbone": {"name": "vgg16"}}, "train": {"steps": [10, 20]}})
    again = from_dict(yaml.safe_load(dump(cfg)))
    assert again == load_cfg
    bound = bind_parts(from_dict({"model": {"roi_extractor": {"name": "spp", "levels": [2, 1]}}}), registries)
    text = yaml.safe_load(dump(bound))
    assert text["model"]["roi_extractor"] == {"name": "spp", "levels": [2, 1]}
    assert text["model"]["proposal_generator"]["anchors"]["sizes"] == [128.0, 256.0, 512.0]  # resolved defaults
    assert bind_parts(from_dict(text), registries) == bound


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "bad.yaml", "model: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listy = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_shipped_configs_validate(registries):
    """Every config loads and names only registered parts (test_configs_build.py builds and runs each one)."""
    import glob
    import os

    paths = sorted(p for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml"))
                   if not os.path.basename(p).startswith("pretrain_"))  # classifier configs: test_pretrain.py
    assert paths
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigDeprecationWarning)  # shipped configs use today's keys
            m = load_config(path, registries=registries).model
        assert m.backbone.name in registries.backbones and m.detector.name in registries.detectors, path


def test_component_with_another_name_replaces_instead_of_merging(tmp_path):
    write(tmp_path, "base.yaml", {"data": {"train": {"name": "voc", "root": "VOC2007", "split": "trainval"}}})
    child = write(tmp_path, "c.yaml", {"base": "base.yaml", "data": {"train": {"name": "concat", "datasets": []}}})
    assert load_config(child).data.train == {"name": "concat", "datasets": []}
    same = write(tmp_path, "s.yaml", {"base": "base.yaml", "data": {"train": {"name": "voc", "split": "test"}}})
    assert load_config(same).data.train == {"name": "voc", "root": "VOC2007", "split": "test"}


def test_a_part_given_by_name_alone_keeps_or_replaces_settings(tmp_path, registries):
    write(tmp_path, "base.yaml", {"model": {"roi_extractor": {"name": "roi_align", "sampling_ratio": 2}}})
    same = write(tmp_path, "same.yaml", {"base": "base.yaml", "model": {"roi_extractor": "roi_align"}})
    assert load_config(same, registries=registries).model.roi_extractor.settings.sampling_ratio == 2
    other = write(tmp_path, "other.yaml", {"base": "base.yaml", "model": {"roi_extractor": "roi_pool"}})
    replaced = load_config(other, registries=registries).model.roi_extractor
    assert replaced.name == "roi_pool" and replaced.settings.output_size is None  # roi_align's keys not carried
    # --set on a part given by name puts the key beside the name
    cfg = load_config(other, ["model.roi_extractor.output_size=5"], registries)
    assert cfg.model.roi_extractor.name == "roi_pool" and cfg.model.roi_extractor.settings.output_size == 5


def test_config_files_of_the_earlier_layout_still_load(tmp_path, registries):
    """``roi_head`` (the predictor's name beside the RoI heads' settings), ``rpn``, ``anchors``,
    ``selective_search`` and ``svm`` sections load into today's layout, with a warning naming the new key."""
    old = {"model": {"proposal_generator": "selective_search",
                     "selective_search": {"mode": "fast", "top_k": 500, "cache_dir": "cache"},
                     "rpn": {"min_size": 4}, "anchors": {"sizes": [16, 32]},
                     "roi_head": {"name": "svm", "batch_size_per_image": 64, "score_thresh": -1.0},
                     "svm": {"retrain_limit": 20000}}}
    path = write(tmp_path, "old.yaml", old)
    with pytest.warns(ConfigDeprecationWarning) as caught:
        cfg = load_config(path, ["model.roi_head.nms_thresh=0.4"], registries)
    messages = " ".join(str(w.message) for w in caught)
    assert "model.roi_head.{name} -> model.box_predictor.{name}" in messages and str(path) in messages
    assert "model.roi_head.* -> model.roi_heads.*" in messages
    assert "model.selective_search.* -> model.proposal_generator.*" in messages
    assert "model.rpn dropped" in messages and "model.anchors dropped" in messages
    m = cfg.model
    assert (m.proposal_generator.name, m.proposal_generator.settings.top_k) == ("selective_search", 500)
    assert m.proposal_generator.settings.cache_dir == "cache"
    assert (m.box_predictor.name, m.box_predictor.settings.retrain_limit) == ("svm", 20000)
    assert (m.roi_heads.batch_size_per_image, m.roi_heads.score_thresh, m.roi_heads.nms_thresh) == (64, -1.0, 0.4)

    faster = write(tmp_path, "faster.yaml", {"model": {"rpn": {"min_size": 4}, "anchors": {"sizes": [16, 32]},
                                                       "roi_head": {"dropout": 0.5}}})
    with pytest.warns(ConfigDeprecationWarning) as caught:
        m = load_config(faster, registries=registries).model
    assert "model.anchors.* -> model.proposal_generator.anchors.*" in " ".join(str(w.message) for w in caught)
    assert m.proposal_generator.settings.anchors.sizes == [16.0, 32.0] and m.proposal_generator.settings.min_size == 4
    assert (m.box_predictor.name, m.box_predictor.settings.dropout) == ("softmax_box", 0.5)


def test_a_third_party_part_gets_config_keys_like_a_built_in(registries):
    """A plugin's RoI extractor registered with its own settings class: validated, resolved, printed."""
    from dataclasses import dataclass

    from detkit.hookspecs import hookimpl
    from detkit.plugins import get_plugin_manager, get_registries

    @dataclass
    class CornerSettings:
        bins: int = 3

    class Plugin:
        @hookimpl
        def detkit_register_roi_extractors(self, register):
            register("corner_pool", lambda settings, **_: settings, settings=CornerSettings)

    reg = get_registries(get_plugin_manager(plugins=[Plugin()]))
    cfg = bind_parts(from_dict({"model": {"roi_extractor": {"name": "corner_pool", "bins": 5}}}), reg)
    assert cfg.model.roi_extractor.settings == CornerSettings(bins=5)
    assert yaml.safe_load(dump(cfg))["model"]["roi_extractor"] == {"name": "corner_pool", "bins": 5}
    with pytest.raises(ConfigError, match=r"unknown key 'model\.roi_extractor\.binz'; did you mean 'model\.roi_extractor\.bins'"):
        bind_parts(from_dict({"model": {"roi_extractor": {"name": "corner_pool", "binz": 5}}}), reg)
    with pytest.raises(ConfigError, match=r"model\.roi_extractor\.bins: expected an integer"):
        bind_parts(from_dict({"model": {"roi_extractor": {"name": "corner_pool", "bins": "five"}}}), reg)


@pytest.mark.parametrize("name", ["faster_rcnn_tiny_synth", "spp_net_tiny_synth", "rcnn_tiny_synth"])
def test_configs_saved_by_the_earlier_layout_resolve_to_todays(name, registries):
    """tests/fixtures/*_before_parts.yaml are what `detkit config show` printed (and checkpoints stored) for the
    shipped configs before parts owned their settings: every section in full. They resolve to exactly the
    config today's file gives."""
    import os

    here = os.path.dirname(__file__)
    with open(os.path.join(here, "..", "fixtures", f"{name}_before_parts.yaml"), encoding="utf-8") as f:
        old = yaml.safe_load(f)
    with pytest.warns(ConfigDeprecationWarning):
        before = bind_parts(from_dict(old, source=name), registries)
    today = load_config(os.path.join(here, "..", "..", "configs", f"{name}.yaml"), registries=registries)
    assert to_dict(before) == with_stored_cache_dir(to_dict(today))


def with_stored_cache_dir(data: dict) -> dict:
    """``data`` with selective search's ``cache_dir`` as configs stored it before it defaulted to the cache root
    (None): ``work_dirs/proposals``, which a stored config keeps, so its cache is found where it was made."""
    part = data["model"].get("proposal_generator") or {}
    if part.get("name") == "selective_search" and part.get("cache_dir") is None:
        part["cache_dir"] = "work_dirs/proposals"
    return data


BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else '1'] * 9)}]\n"
               for p, a in zip(["", *"abcdefgh"], "abcdefghi"))  # 9**9 values in 300 bytes


def test_yaml_bombs_oversized_and_undecodable_configs_are_refused_at_once(tmp_path, capsys):
    """A "billion laughs" text of 300 bytes hung config loading (6.5 GB and growing), a 55 MB file took five
    minutes, a non-UTF-8 file gave a traceback: each is refused naming the file, at once."""
    from detkit.cli import main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 400
    with pytest.raises(ConfigError, match=r"bomb.yaml: its aliases expand to more than 100000 values"):
        load_config(str(bomb))
    looped = tmp_path / "looped.yaml"
    looped.write_text("model: &m {backbone: *m}\n")
    with pytest.raises(ConfigError, match="looped.yaml: an alias refers to the collection that holds it"):
        load_config(str(looped))
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"big.yaml: 1.1 MiB; a config file is at most 1 MiB"):
        load_config(str(big))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: {backbone: {name: tiny}}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text"):
        load_config(str(latin))
    flow = "{" + ", ".join(line for line in BOMB.splitlines()) + "}"  # the same bomb on one line
    with pytest.raises(ConfigError, match="--set train.lr: its aliases expand"):
        parse_override("train.lr=" + flow)
    # aliases within the bound, merge keys included, still load
    ok = tmp_path / "ok.yaml"
    ok.write_text("version: 3\nmodel:\n  backbone: &b {name: tiny}\ntrain: &t {max_iters: 5}\n"
                  "data: {batch_size: 1}\n")
    assert load_config(str(ok)).train.max_iters == 5
    assert main(["config", "show", str(bomb)]) == 2
    assert "its aliases expand" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.seed=1e30", "train.seed=1000000000000000019884624838656: expected an integer in [0, "),
    ("model.transform.min_size=[]", "model.transform.min_size=[]: expected at least one value"),
    ("model.proposal_generator.anchors.sizes=[]", "model.proposal_generator.anchors.sizes=[]: expected at least one"),
    ("model.backbone.args.widht=3", "unknown key 'model.backbone.args.widht'; did you mean 'model.backbone.args.widths'"),
])
def test_config_show_checks_what_train_would_trip_on(override, message, capsys):
    """These passed `detkit config show` and crashed `detkit train` with tracebacks: both refuse them alike."""
    import os

    from detkit.cli import main

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "faster_rcnn_tiny_synth.yaml")
    for command in (["config", "show"], ["train"]):
        assert main([*command, config, "--set", override]) == 2
        assert message in capsys.readouterr().err
