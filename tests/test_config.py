"""Config loading: base chains, validation messages, typed overrides, dumps."""
import pytest
import yaml

from detkit.config import Config, ConfigError, apply_overrides, dump, from_dict, load_config


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.model.rpn.fg_iou_thresh == 0.7 and cfg.model.rpn.bg_iou_thresh == 0.3
    assert cfg.model.rpn.batch_size_per_image == 256 and cfg.model.rpn.positive_fraction == 0.5
    assert (cfg.model.rpn.pre_nms_top_n_train, cfg.model.rpn.post_nms_top_n_train) == (12000, 2000)
    assert (cfg.model.rpn.pre_nms_top_n_test, cfg.model.rpn.post_nms_top_n_test) == (6000, 300)
    assert cfg.model.rpn.nms_thresh == 0.7
    assert cfg.model.roi_head.batch_size_per_image == 128 and cfg.model.roi_head.positive_fraction == 0.25
    assert (cfg.model.roi_head.bg_iou_thresh_lo, cfg.model.roi_head.bg_iou_thresh_hi) == (0.1, 0.5)
    assert cfg.model.roi_head.score_thresh == 0.05 and cfg.model.roi_head.detections_per_img == 100
    assert (cfg.model.transform.min_size, cfg.model.transform.max_size) == (600, 1000)
    assert cfg.model.anchors.sizes == [128, 256, 512] and cfg.model.anchors.aspect_ratios == [0.5, 1, 2]
    assert cfg.train.lr == 0.001 and cfg.train.momentum == 0.9 and cfg.train.weight_decay == 0.0005


def test_base_chain_merges_plainly(tmp_path):
    write(tmp_path, "base.yaml", {"model": {"rpn": {"nms_thresh": 0.6, "min_size": 8}}, "train": {"lr": 0.1}})
    write(tmp_path, "mid.yaml", {"base": "base.yaml", "model": {"rpn": {"min_size": 2}}})
    child = write(tmp_path, "child.yaml", {"base": "mid.yaml", "train": {"max_iters": 5}})
    cfg = load_config(child)
    assert cfg.model.rpn.nms_thresh == 0.6 and cfg.model.rpn.min_size == 2.0
    assert cfg.train.lr == 0.1 and cfg.train.max_iters == 5


def test_circular_base_is_reported(tmp_path):
    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_unknown_key_names_full_path_and_closest(tmp_path):
    path = write(tmp_path, "c.yaml", {"model": {"roi_head": {"nms_treshold": 0.3}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.roi_head.nms_treshold" in msg and "model.roi_head.nms_thresh" in msg and str(path) in msg


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, "c.yaml", {"train": {"max_iters": "many"}})
    with pytest.raises(ConfigError, match=r"train\.max_iters: expected an integer, got 'many'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.anchors\.sizes\[1\]: expected a number"):
        from_dict({"model": {"anchors": {"sizes": [32, "big"]}}})
    with pytest.raises(ConfigError, match="expected true/false"):
        from_dict({"train": {"eval_at_end": "yes please"}})


def test_overrides_are_typed_by_schema(tmp_path):
    path = write(tmp_path, "c.yaml", {"train": {"lr": 0.1}})
    cfg = load_config(path, ["train.lr=1", "model.anchors.sizes=[8, 16]", "model.backbone.name=123",
                             "train.clip_grad_norm=null", "model.transform.min_size=[400, 500]"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.anchors.sizes == [8.0, 16.0]
    assert cfg.model.backbone.name == "123"
    assert cfg.train.clip_grad_norm is None
    assert cfg.model.transform.min_size == [400, 500]
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_dump_roundtrips():
    cfg = load_cfg = from_dict({"model": {"backbone": {"name": "vgg16"}}, "train": {"steps": [10, 20]}})
    again = from_dict(yaml.safe_load(dump(cfg)))
    assert again == load_cfg


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

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert paths
    for path in paths:
        m = load_config(path).model
        assert m.backbone.name in registries.backbones and m.detector in registries.detectors, path
        assert m.proposal_generator in registries.proposal_generators, path
        assert m.roi_extractor.name in registries.roi_extractors and m.roi_head.name in registries.heads, path


def test_component_with_another_name_replaces_instead_of_merging(tmp_path):
    write(tmp_path, "base.yaml", {"data": {"train": {"name": "voc", "root": "VOC2007", "split": "trainval"}}})
    child = write(tmp_path, "c.yaml", {"base": "base.yaml", "data": {"train": {"name": "concat", "datasets": []}}})
    assert load_config(child).data.train == {"name": "concat", "datasets": []}
    same = write(tmp_path, "s.yaml", {"base": "base.yaml", "data": {"train": {"name": "voc", "split": "test"}}})
    assert load_config(same).data.train == {"name": "voc", "root": "VOC2007", "split": "test"}
