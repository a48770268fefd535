"""The YOLO-txt reader (``{name: yolo, data: data.yaml, split: train}``): Ultralytics' layout read into detkit's
pixels, every malformed label line refused with its file and line, ``--data data.yaml`` recognised, and a
detector trained from it through ``detkit train``."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import yaml

from detkit.cli import main
from detkit.cli.common import _data_spec
from detkit.data.dataset import DatasetError
from detkit.data.loading import build_dataset, dataset_from_path
from detkit.data.synth import CLASSES
from detkit.data.yolo import YOLODataset, label_path
from e2e_utils import write_config


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic COCO set of 4 images (64x80) and the same converted to YOLO."""
    root = tmp_path_factory.mktemp("yolo")
    assert main(["data", "synth", "--output", str(root / "coco"), "--num-images", "4", "--size", "64x80"]) == 0
    assert main(["data", "convert", str(root / "coco" / "annotations.json"), "--to", "yolo",
                 "--output", str(root / "yolo")]) == 0
    return root


def _copy(synth, tmp_path):
    """A private copy of the YOLO set (the tests edit it)."""
    return shutil.copytree(synth / "yolo", tmp_path / "yolo")


def _coco(synth, registries):
    return build_dataset({"name": "coco", "images": str(synth / "coco" / "images"),
                          "annotations": str(synth / "coco" / "annotations.json")}, registries, "coco")


def test_the_converted_layout_is_ultralytics(synth):
    spec = yaml.safe_load((synth / "yolo" / "data.yaml").read_text())
    assert spec["train"] == "images/train" and spec["names"] == dict(enumerate(CLASSES)) and "path" not in spec
    assert sorted(os.listdir(synth / "yolo" / "labels" / "train")) == [f"{i:06d}.txt" for i in range(4)]
    line = (synth / "yolo" / "labels" / "train" / "000000.txt").read_text().splitlines()[0].split()
    assert len(line) == 5 and 0 <= int(line[0]) < len(CLASSES) and all(0 < float(v) <= 1 for v in line[1:])


def test_yolo_reads_back_the_coco_boxes_in_pixels_with_labels_1_to_k(synth, registries):
    coco = _coco(synth, registries)
    data = build_dataset({"name": "yolo", "data": str(synth / "yolo" / "data.yaml"), "split": "train"}, registries,
                         "train")
    assert isinstance(data, YOLODataset) and len(data) == len(coco) == 4
    assert data.class_names == list(CLASSES) and data.cat_ids == [1, 2, 3, 4, 5]
    for k in range(4):
        assert data.image_info(k)["height"] == 64 and data.image_info(k)["width"] == 80  # from the header
        a, b = data.annotations(k), coco.annotations(k)
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
        np.testing.assert_array_equal(a["labels"], b["labels"])
    image, target = data[0]
    assert image.shape == (64, 80, 3) and target["boxes"].shape[1] == 4


def test_names_as_a_list_path_relative_to_the_yaml_and_a_list_of_folders(synth, tmp_path, registries):
    root = _copy(synth, tmp_path)
    os.makedirs(root / "images" / "extra")
    os.makedirs(root / "labels" / "extra")
    shutil.move(root / "images" / "train" / "000003.png", root / "images" / "extra" / "000003.png")
    shutil.move(root / "labels" / "train" / "000003.txt", root / "labels" / "extra" / "000003.txt")
    os.makedirs(tmp_path / "cfg")
    (tmp_path / "cfg" / "mine.yml").write_text(yaml.safe_dump(
        {"path": "../yolo", "train": ["images/train", "images/extra"], "names": list(CLASSES)}))
    data = build_dataset({"name": "yolo", "data": str(tmp_path / "cfg" / "mine.yml")}, registries, "train")
    ref = YOLODataset(str(synth / "yolo" / "data.yaml"))
    assert len(data) == 4 and data.class_names == list(CLASSES)
    assert data.image_info(3)["file_name"].endswith(os.path.join("images", "extra", "000003.png"))
    for k in range(4):
        np.testing.assert_array_equal(data.annotations(k)["boxes"], ref.annotations(k)["boxes"])


def test_a_txt_image_list_and_an_image_without_labels_which_has_no_objects(synth, tmp_path):
    root = _copy(synth, tmp_path)
    os.remove(root / "labels" / "train" / "000001.txt")
    (root / "train.txt").write_text("./images/train/000001.png\nimages/train/000002.png\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": list(CLASSES)}))
    data = YOLODataset(str(root / "data.yaml"))
    assert len(data) == 2 and len(data.annotations(0)["boxes"]) == 0 and len(data.annotations(1)["boxes"]) > 0


def test_label_path_replaces_the_last_images_folder():
    assert label_path(os.path.join("a", "images", "x", "images", "train", "b.c.jpg")) == \
        os.path.join("a", "images", "x", "labels", "train", "b.c.txt")
    assert label_path(os.path.join("flat", "b.png")) == os.path.join("flat", "b.txt")


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.1", "4 fields ('0 0.5 0.5 0.1'); expected 5: class cx cy w h, the four normalised to [0, 1]"),
    ("0 0.5 0.5 0.1 0.1 0.2 0.3", "7 fields"),
    ("5 0.5 0.5 0.1 0.1", "class 5 is out of range; expected 0..4 (the 5 names of the data.yaml)"),
    ("-1 0.5 0.5 0.1 0.1", "class -1 is out of range; expected 0..4"),
    ("cat 0.5 0.5 0.1 0.1", "class 'cat' is not an integer; expected a class index 0..4"),
    ("1.5 0.5 0.5 0.1 0.1", "class '1.5' is not an integer"),
    ("0 nan 0.5 0.1 0.1", "cx is 'nan'; expected a finite number in [0, 1]"),
    ("0 0.5 inf 0.1 0.1", "cy is 'inf'; expected a finite number in [0, 1]"),
    ("0 0.5 0.5 0.1 x", "h is 'x'; expected a number in [0, 1]"),
    ("0 40 0.5 0.1 0.1", "cx is 40, outside [0, 1]; expected coordinates normalised by the image's width"),
    ("0 0.5 -0.1 0.1 0.1", "cy is -0.1, outside [0, 1]"),
    ("0 0.5 0.5 0 0.1", "w is 0; expected a positive width in (0, 1]"),
    ("0 0.5 0.5 0.1 -0.2", "h is -0.2; expected a positive height in (0, 1]"),
    ("0 0.5 0.5 1.2 0.1", "w is 1.2, outside [0, 1]"),
])
def test_a_malformed_label_line_is_refused_naming_file_line_and_expectation(synth, tmp_path, line, message):
    root = _copy(synth, tmp_path)
    label = root / "labels" / "train" / "000002.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\n" + line + "\n")
    with pytest.raises(DatasetError) as err:
        YOLODataset(str(root / "data.yaml"))
    assert f"{label}: line 2: " in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ({"train": "images/train", "names": {0: "a", 2: "b"}}, "'names' has 2 entries but no index 1"),
    ({"train": "images/train", "names": ["a", "b", "a"]}, "'names' lists ['a'] more than once"),
    ({"train": "images/train", "names": []}, "'names' must be a non-empty list"),
    ({"train": "images/train", "names": ["a", "b"], "nc": 3}, "'nc' is 3 but 'names' has 2 entries"),
    ({"val": "images/train", "test": None, "names": ["a"]}, "no 'train' split (it has val); choose one of those"),
    ({"train": "images/nowhere", "names": ["a"]}, "'train' names 'images/nowhere', which is neither a folder"),
    ({"train": "labels/train", "names": ["a"]}, "the 'train' split (labels/train) holds no images"),
    ({"path": "missing", "train": "images/train", "names": ["a"]}, "'path' is 'missing', which is no folder"),
    (["not", "a", "mapping"], "expected a mapping with 'names'"),
])
def test_a_bad_data_yaml_is_refused_naming_the_key(synth, tmp_path, spec, message):
    root = _copy(synth, tmp_path)
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DatasetError, match="data.yaml: ") as err:
        YOLODataset(str(root / "data.yaml"))
    assert message in str(err.value)


def test_an_unreadable_image_a_missing_list_entry_and_a_missing_yaml_are_named(synth, tmp_path):
    root = _copy(synth, tmp_path)
    (root / "images" / "train" / "000001.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="000001.png: empty image file"):
        YOLODataset(str(root / "data.yaml"))
    (root / "images" / "train" / "000001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="000001.png: cannot read the image size from its header"):
        YOLODataset(str(root / "data.yaml"))
    (root / "list.txt").write_text("images/train/000000.png\nimages/train/gone.png\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "list.txt", "names": ["a"]}))
    with pytest.raises(DatasetError, match=r"list.txt: line 2: image 'images/train/gone.png' not found"):
        YOLODataset(str(root / "data.yaml"))
    with pytest.raises(DatasetError, match="YOLO data file not found: .*nope.yaml"):
        YOLODataset(str(root / "nope.yaml"))


def test_repeated_lines_clipped_boxes_and_orphan_labels_are_counted_in_the_log(synth, tmp_path, caplog):
    root = _copy(synth, tmp_path)
    (root / "labels" / "train" / "000000.txt").write_text("1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n")
    (root / "labels" / "train" / "renamed.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with caplog.at_level(logging.WARNING):
        data = YOLODataset(str(root / "data.yaml"))
    text = caplog.text
    assert "1 repeated label lines kept once" in text and "clipped 1 box" in text
    assert "1 of the 5 label files belong to no image of the split" in text and "renamed.txt" in text
    np.testing.assert_allclose(data.annotations(0)["boxes"], [[32, 25.6, 48, 38.4], [68, 25.6, 80, 38.4]], atol=1e-4)


def test_a_data_yaml_path_is_a_dataset_wherever_a_coco_json_is(synth, registries):
    path = str(synth / "yolo" / "data.yaml")
    assert dataset_from_path(path, registries.datasets, {}) == {"name": "yolo", "data": path, "split": "train"}
    args = type("Args", (), {"split": "val", "images": None, "classes": None})()
    assert _data_spec(path, args) == {"name": "yolo", "data": path, "split": "val"}
    assert dataset_from_path(str(synth / "coco" / "annotations.json"), registries.datasets, {})["name"] == "coco"


def test_detkit_train_runs_two_iterations_from_a_yolo_dataset(synth, tmp_path, capsys):
    cfg_path = write_config(tmp_path / "cfg.yaml", synth, tmp_path / "run", max_iters=2, steps=[1],
                            checkpoint_period=0, log_period=1, eval_at_end=False)
    cfg = yaml.safe_load(cfg_path.read_text())
    data = {"name": "yolo", "data": str(synth / "yolo" / "data.yaml"), "split": "train"}
    cfg["data"]["train"], cfg["data"]["test"] = data, data
    cfg["model"]["transform"] = {"min_size": 64, "max_size": 80}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path), "--no-progress"]) == 0
    assert os.path.isfile(tmp_path / "run" / "final.pth")
    saved = json.loads(json.dumps(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())))
    assert saved["model"]["class_names"] == list(CLASSES)


def test_a_bad_label_through_the_cli_is_one_line_and_exit_2(synth, tmp_path, capsys):
    root = _copy(synth, tmp_path)
    (root / "labels" / "train" / "000001.txt").write_text("9 0.5 0.5 0.2 0.2\n")
    assert main(["data", "check", str(root / "data.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    label = root / "labels" / "train" / "000001.txt"
    assert err.count("\n") == 0 and f"{label}: line 1: class 9 is out of range" in err
