"""``detkit data convert``: COCO, VOC and YOLO into one another, boxes kept (COCO -> YOLO -> COCO within 1e-3 px,
VOC's 1-based whole pixels), flags carried where the target has them, images linked or copied, and the output
refused, replaced or left whole as ``data synth`` and ``data tile`` do."""
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import yaml

from detkit.cli import main
from detkit.data.convert import convert_dataset, output_names
from detkit.data.voc import annotation_xml as voc_annotation
from detkit.data.loading import build_dataset
from detkit.data.synth import CLASSES

CLASS_LIST = ",".join(CLASSES)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic COCO set (4 images of 64x80), its boxes moved to fractional pixels, category ids made
    non-contiguous (10, 20, ...), and one crowd region added; and the same as VOC."""
    root = tmp_path_factory.mktemp("convert")
    assert main(["data", "synth", "--output", str(root / "coco"), "--num-images", "4", "--size", "64x80"]) == 0
    assert main(["data", "synth", "--output", str(root / "voc"), "--format", "voc", "--num-images", "4",
                 "--size", "64x80"]) == 0
    path = root / "coco" / "annotations.json"
    coco = json.loads(path.read_text())
    rng = np.random.default_rng(0)
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(0, 0.9, 2)
        ann["bbox"] = [x + dx, y + dy, w - dx - 0.123, h - dy - 0.377]
        ann["category_id"] *= 10
    for cat in coco["categories"]:
        cat["id"] *= 10
    coco["annotations"].append({"id": 999, "image_id": 1, "category_id": 10, "bbox": [1.5, 2.5, 20, 30],
                                "area": 600, "iscrowd": 1})
    path.write_text(json.dumps(coco))
    return root


def _convert(src, to, out, *argv):
    return main(["data", "convert", str(src), "--to", to, "--output", str(out), *argv])


def _coco(root, registries, name="annotations.json"):
    return build_dataset({"name": "coco", "images": str(root / "images"), "annotations": str(root / name)},
                         registries, "t")


def test_coco_to_yolo_to_coco_keeps_every_box_within_a_thousandth_of_a_pixel(synth, tmp_path, registries, capsys):
    assert _convert(synth / "coco" / "annotations.json", "yolo", tmp_path / "yolo") == 0
    assert "1 crowd regions or difficult objects left out" in capsys.readouterr().err
    assert _convert(tmp_path / "yolo" / "data.yaml", "coco", tmp_path / "back") == 0
    src, back = _coco(synth / "coco", registries), _coco(tmp_path / "back", registries)
    assert back.class_names == src.class_names == list(CLASSES) and back.cat_ids == [1, 2, 3, 4, 5]
    assert src.cat_ids == [10, 20, 30, 40, 50]  # YOLO keeps the order and names of the classes, not the ids
    assert len(back) == len(src) == 4
    for k in range(4):
        a, b = src.annotations(k), back.annotations(k)
        crowd = a["iscrowd"]
        assert crowd.sum() == (1 if k == 0 else 0) and not b["iscrowd"].any()
        assert np.abs(a["boxes"][~crowd] - b["boxes"]).max() < 1e-3
        assert (a["boxes"][~crowd] % 1 != 0).any()  # the boxes are fractional: a rounding would show
        np.testing.assert_array_equal(a["labels"][~crowd], b["labels"])
        assert back.image_info(k)["file_name"].endswith(os.path.basename(src.image_info(k)["file_name"]))
        assert (back.image_info(k)["height"], back.image_info(k)["width"]) == (64, 80)


def test_voc_boxes_are_written_one_based_and_read_back_exactly(synth, tmp_path, registries):
    xml, written, moved = voc_annotation("a.png", 64, 80, ["thing"], np.array([[0, 0, 80, 64], [10, 20, 30.4, 40]]),
                                         np.array([1, 1]), np.array([False, True]))
    boxes = [[int(b.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")] for b in ET.fromstring(xml).iter("bndbox")]
    assert boxes == [[1, 1, 80, 64], [11, 21, 30, 40]] and written == 2 and moved == 1
    assert [o.findtext("difficult") for o in ET.fromstring(xml).iter("object")] == ["0", "1"]
    # VOC -> COCO -> VOC: the devkit's own files survive unchanged, box for box
    assert _convert(synth / "voc", "coco", tmp_path / "coco", "--classes", CLASS_LIST) == 0
    assert _convert(tmp_path / "coco" / "annotations.json", "voc", tmp_path / "voc") == 0
    spec = {"name": "voc", "split": "trainval", "classes": list(CLASSES)}
    src = build_dataset({**spec, "root": str(synth / "voc")}, registries, "a")
    back = build_dataset({**spec, "root": str(tmp_path / "voc")}, registries, "b")
    for k in range(len(src)):
        np.testing.assert_array_equal(src.annotations(k)["boxes"], back.annotations(k)["boxes"])
        np.testing.assert_array_equal(src.annotations(k)["labels"], back.annotations(k)["labels"])
    for name in os.listdir(synth / "voc" / "Annotations"):
        def objects(path):
            return [[o.findtext("name"), *(o.find("bndbox").findtext(t) for t in ("xmin", "ymin", "xmax", "ymax"))]
                    for o in ET.parse(path).getroot().iter("object")]
        assert objects(synth / "voc" / "Annotations" / name) == objects(tmp_path / "voc" / "Annotations" / name)


def test_crowd_becomes_voc_difficult_and_voc_to_yolo_round_trips(synth, tmp_path, registries, capsys):
    assert _convert(synth / "coco" / "annotations.json", "voc", tmp_path / "voc", "--split", "val") == 0
    out = capsys.readouterr()
    assert f"read it with classes: [{', '.join(CLASSES)}]" in out.out and "boxes moved by up to half a pixel" in out.err
    assert os.path.isfile(tmp_path / "voc" / "ImageSets" / "Main" / "val.txt")
    first = ET.parse(tmp_path / "voc" / "Annotations" / "000000.xml").getroot()
    assert [o.findtext("difficult") for o in first.iter("object")].count("1") == 1
    voc = build_dataset({"name": "voc", "root": str(tmp_path / "voc"), "split": "val", "classes": list(CLASSES)},
                        registries, "v")
    assert voc.annotations(0)["difficult"].sum() == 1
    assert _convert(tmp_path / "voc", "yolo", tmp_path / "yolo", "--split", "val", "--classes", CLASS_LIST) == 0
    spec = yaml.safe_load((tmp_path / "yolo" / "data.yaml").read_text())
    assert spec["val"] == "images/val" and "train" not in spec
    yolo = build_dataset({"name": "yolo", "data": str(tmp_path / "yolo" / "data.yaml"), "split": "val"}, registries,
                         "y")
    for k in range(len(voc)):
        keep = ~voc.annotations(k)["difficult"]
        np.testing.assert_allclose(yolo.annotations(k)["boxes"], voc.annotations(k)["boxes"][keep], atol=1e-3)


def test_images_are_linked_by_default_and_copied_with_copy(synth, tmp_path, capsys):
    source = synth / "coco" / "images" / "000000.png"
    assert _convert(synth / "coco" / "annotations.json", "coco", tmp_path / "linked") == 0
    assert "(4 linked)" in capsys.readouterr().out
    assert os.path.samefile(source, tmp_path / "linked" / "images" / "000000.png")
    assert _convert(synth / "coco" / "annotations.json", "coco", tmp_path / "copied", "--copy") == 0
    copied = tmp_path / "copied" / "images" / "000000.png"
    assert "(4 copied)" in capsys.readouterr().out
    assert not os.path.samefile(source, copied) and copied.read_bytes() == source.read_bytes()


def test_images_of_one_stem_get_distinct_names(synth, tmp_path, registries):
    coco = json.loads((synth / "coco" / "annotations.json").read_text())
    os.makedirs(tmp_path / "src" / "images" / "b")
    for image in coco["images"][:2]:
        os.link(synth / "coco" / "images" / image["file_name"], tmp_path / "src" / "images" / image["file_name"])
    os.link(synth / "coco" / "images" / "000001.png", tmp_path / "src" / "images" / "b" / "000000.jpg")
    coco["images"] = coco["images"][:2] + [{**coco["images"][1], "id": 7, "file_name": "b/000000.jpg"}]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in (1, 2) and not a["iscrowd"]]
    (tmp_path / "src" / "annotations.json").write_text(json.dumps(coco))
    dataset = _coco(tmp_path / "src", registries)
    assert output_names(dataset) == ["000000.png", "000001.png", "000000-7.jpg"]
    done = convert_dataset(dataset, str(tmp_path / "yolo"), "yolo")
    assert done["images"] == 3 and done["boxes"] == len(coco["annotations"])
    assert sorted(os.listdir(tmp_path / "yolo" / "labels" / "train")) == ["000000-7.txt", "000000.txt", "000001.txt"]


def test_a_non_empty_out_is_refused_unless_overwrite_and_the_source_is_never_deleted(synth, tmp_path, capsys):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    assert _convert(synth / "coco" / "annotations.json", "yolo", out) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "the folder is not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert _convert(synth / "coco" / "annotations.json", "yolo", out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["data.yaml", "images", "labels"]
    assert _convert(out / "data.yaml", "coco", out, "--overwrite") == 2
    assert "which the conversion reads; --overwrite would delete it" in capsys.readouterr().err
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # nothing staged is left


def test_a_failed_conversion_leaves_no_output_and_no_staging(synth, tmp_path, monkeypatch, registries):
    import detkit.data.convert as convert

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "label_text", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.convert_dataset(_coco(synth / "coco", registries), str(tmp_path / "out"), "yolo")
    assert os.listdir(tmp_path) == []


def test_bad_options_exit_2_naming_them(synth, tmp_path, capsys):
    argv = ["data", "convert", str(synth / "coco" / "annotations.json"), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--to", "xml"])
    assert exc.value.code == 2 and "argument --to: invalid choice: 'xml'" in capsys.readouterr().err
    assert main([*argv, "--to", "voc", "--split", "../x"]) == 2
    assert "--split '../x': expected a split name" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_an_unreadable_source_exits_2_naming_the_file(synth, tmp_path, capsys):
    root = tmp_path / "yolo"
    assert _convert(synth / "coco" / "annotations.json", "yolo", root) == 0
    capsys.readouterr()
    (root / "labels" / "train" / "000002.txt").write_text("0 0.5 0.5 0.1\n")
    assert _convert(root / "data.yaml", "coco", tmp_path / "c") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{root / 'labels' / 'train' / '000002.txt'}: line 1: 4 fields" in err
    assert not os.path.exists(tmp_path / "c")
    os.makedirs(tmp_path / "empty")
    empty = str(tmp_path / "empty")
    assert _convert(synth / "coco" / "annotations.json", "yolo", tmp_path / "y2", "--images", empty) == 2
    assert "SRC: 4 of 4 image files are missing or empty" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "y2")
