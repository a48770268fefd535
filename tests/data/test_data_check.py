"""``detkit data check``: the summary of a COCO, VOC or YOLO dataset (images, boxes per class, images without
objects, box sizes against the anchors, problems), as text and JSON; exit 0 when it reads, 2 naming the file
when it does not."""
import json
import shutil

import numpy as np
import pytest

from detkit.cli import main
from detkit.data.check import AnchorScale, bucket_labels, summarize
from detkit.data.loading import build_dataset
from detkit.data.synth import CLASSES
from e2e_utils import write_config

CLASS_LIST = ",".join(CLASSES)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    for fmt in ("coco", "voc"):
        assert main(["data", "synth", "--output", str(root / fmt), "--format", fmt, "--num-images", "4",
                     "--size", "64x80"]) == 0
    assert main(["data", "convert", str(root / "coco" / "annotations.json"), "--to", "yolo",
                 "--output", str(root / "yolo")]) == 0
    return root


def _check(tmp_path, *argv):
    out = tmp_path / "summary.json"
    code = main(["data", "check", *argv, "--json", str(out)])
    return code, (json.loads(out.read_text()) if code == 0 else None)


@pytest.mark.parametrize("form", ["coco", "voc", "yolo", "mapping"])
def test_every_form_is_summarised_with_the_same_counts(sets, tmp_path, capsys, form):
    coco = json.loads((sets / "coco" / "annotations.json").read_text())
    argv = {"coco": [str(sets / "coco" / "annotations.json")],
            "voc": [str(sets / "voc"), "--classes", CLASS_LIST],
            "yolo": [str(sets / "yolo" / "data.yaml")],
            "mapping": [f"{{name: coco, images: {sets / 'coco' / 'images'}, "
                        f"annotations: {sets / 'coco' / 'annotations.json'}}}"]}[form]
    code, summary = _check(tmp_path, *argv)
    assert code == 0
    assert summary["format"] == ("coco" if form == "mapping" else form)
    assert summary["images"] == 4 and summary["boxes"] == len(coco["annotations"])
    per_class = np.bincount([a["category_id"] - 1 for a in coco["annotations"]], minlength=len(CLASSES))
    assert [c["boxes"] for c in summary["classes"]] == per_class.tolist()
    assert [c["name"] for c in summary["classes"]] == list(CLASSES)
    assert sum(summary["box_sizes"]["image"]) == summary["boxes"] == sum(summary["anchors"]["at_input"])
    assert summary["box_sizes"]["buckets"] == ["<16", "16-32", "32-64", "64-128", "128-256", "256-512", ">=512"]
    assert summary["anchors"]["sizes"] == [128.0, 256.0, 512.0]  # the RPN's defaults
    text = capsys.readouterr().out
    assert "images: 4, of which 0 without objects" in text and "anchors 128, 256, 512 px" in text
    assert "shorter side 600, longer at most 1000" in text
    assert [p["kind"] for p in summary["problems"]] == (["class_without_boxes"] if 0 in per_class else [])


def test_box_sizes_are_bucketed_in_image_pixels_and_scaled_to_the_input():
    class Data:  # one 100x200 image with boxes of sqrt(area) 10, 20 and 300 px
        class_names, cat_ids, source = ["a", "b"], [1, 2], "mem"
        boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 10], [0, 0, 100, 900]], np.float32)

        def __len__(self):
            return 1

        def image_info(self, index):
            return {"id": 1, "file_name": "/nonexistent.png", "height": 1000, "width": 200}

        def annotations(self, index):
            return {"boxes": self.boxes, "labels": np.array([1, 2, 2]), "iscrowd": np.zeros(3, bool),
                    "difficult": np.array([False, True, False])}

        def missing_image_files(self):
            return [(1, "/nonexistent.png", "not found")]

    anchors = AnchorScale((32.0, 64.0), "test", lambda h, w: 2.0, "twice")
    summary = summarize(Data(), anchors, ["read warning"])
    assert summary["box_sizes"]["image"] == [1, 1, 0, 0, 0, 1, 0] and summary["difficult"] == 1
    assert summary["anchors"]["at_input"] == [0, 1, 1, 0, 0, 0, 1]
    assert summary["anchors"]["per_bucket"] == [[], [], [32.0], [64.0], [], [], []]
    assert summary["anchors"]["below_half_smallest"] == 0 and summary["anchors"]["above_twice_largest"] == 1
    assert [c["boxes"] for c in summary["classes"]] == [1, 2]
    assert [p["kind"] for p in summary["problems"]] == ["reader", "missing_image"]
    assert bucket_labels((8, 64)) == ["<8", "8-64", ">=64"]


def test_the_anchors_and_input_size_of_a_config_are_used(sets, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", sets, tmp_path / "run")  # anchors 16-128, input 120x160
    code, summary = _check(tmp_path, str(sets / "yolo" / "data.yaml"), "--config", str(cfg),
                           "--set", "model.transform.min_size=64", "--set", "model.transform.max_size=80")
    assert code == 0
    assert summary["anchors"]["sizes"] == [16.0, 32.0, 64.0, 128.0]
    assert summary["anchors"]["at_input"] == summary["box_sizes"]["image"]  # 64x80 images at 64x80: scale 1
    assert f"model.proposal_generator.anchors.sizes of {cfg}" in summary["anchors"]["source"]
    assert "shorter side 64, longer at most 80" in capsys.readouterr().out


def test_problems_missing_images_degenerate_boxes_duplicates_and_sizes_are_listed(sets, tmp_path, capsys):
    data = shutil.copytree(sets / "coco", tmp_path / "coco")
    coco = json.loads((data / "annotations.json").read_text())
    (data / "images" / "000001.png").unlink()
    shutil.copy(data / "images" / "000002.png", data / "images" / "copy.png")
    coco["images"] += [{"id": 10, "file_name": "copy.png", "height": 64, "width": 80},
                       {"id": 11, "file_name": "000000.png", "height": 64, "width": 80},
                       {"id": 12, "file_name": "000003.png", "height": 32, "width": 80}]
    coco["annotations"] += [{"id": 100, "image_id": 10, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0,
                             "iscrowd": 0}]
    (data / "annotations.json").write_text(json.dumps(coco))
    code, summary = _check(tmp_path, str(data / "annotations.json"))
    assert code == 0
    problems = {p["kind"]: p for p in summary["problems"]}
    assert "dropped 1 degenerate box" in problems["reader"]["message"]
    missing = problems["missing_image"]
    assert missing["count"] == 1 and "000001.png (not found)" in missing["examples"][0]
    assert problems["listed_twice"]["count"] == 2  # 000000.png and 000003.png
    assert problems["listed_twice"]["examples"][0] == (f"image id 1 ({data / 'images' / '000000.png'}) = image id 11 "
                                                       f"({data / 'images' / '000000.png'})")
    stored = problems["duplicate_image"]["examples"]
    assert "image id 3" in stored[0] and "copy.png" in stored[0]
    assert problems["size_mismatch"]["examples"] == [f"image id 12: {data / 'images' / '000003.png'} is 80x64 (WxH), "
                                                     f"the annotations say 80x32"]
    assert summary["images"] == 7 and summary["images_without_objects"] == 3
    text = capsys.readouterr().out
    assert f"problems: {len(problems)}" in text
    assert "image files missing or empty (training refuses to start): 1" in text


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "annotations.json").write_text("{not json"), "annotations.json: invalid JSON"),
    (lambda d: (d / "annotations.json").unlink(), "no such file or folder"),
])
def test_an_unreadable_dataset_exits_2_with_one_line_naming_the_file(sets, tmp_path, capsys, damage, message):
    data = shutil.copytree(sets / "coco", tmp_path / "coco")
    damage(data)
    assert main(["data", "check", str(data / "annotations.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and str(data / "annotations.json") in err


def test_a_folder_no_format_recognises_and_a_bad_config_exit_2(sets, tmp_path, capsys):
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "a folder no dataset format recognises" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model: {nonsense: 1}\n")
    assert main(["data", "check", str(sets / "yolo" / "data.yaml"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "model.nonsense" in capsys.readouterr().err


def test_the_yolo_split_is_chosen_with_split(sets, tmp_path, capsys):
    assert main(["data", "check", str(sets / "yolo" / "data.yaml"), "--split", "val"]) == 2
    assert "no 'val' split (it has train)" in capsys.readouterr().err


def test_check_reads_the_dataset_named_by_a_mapping_of_another_registry_entry(sets, registries):
    data = build_dataset({"name": "yolo", "data": str(sets / "yolo" / "data.yaml")}, registries, "t")
    assert summarize(data)["anchors"] is None
