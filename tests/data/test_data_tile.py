"""``detkit data tile``: tiles of a COCO or VOC dataset at native resolution, boxes clipped and kept by
visibility, flags carried, loadable again, written atomically, and options checked before any work."""
import json
import os

import cv2
import numpy as np
import pytest

from detkit.cli import main
from detkit.data.loading import build_dataset
from detkit.data.synth import CLASSES
from detkit.data.tile import TileSpec, tile_dataset, window_boxes
from detkit.data.tile import tile_grid

H, W, SIZE, OVERLAP = 200, 300, 64, 0.25
CLASS_LIST = ",".join(CLASSES)


@pytest.fixture(scope="module")
def synth_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for fmt in ("coco", "voc"):
        assert main(["data", "synth", "--output", str(root / fmt), "--format", fmt, "--num-images", "3",
                     "--size", f"{H}x{W}", "--seed", "1"]) == 0
    return root


def _tile(*argv):
    return main(["data", "tile", "--size", str(SIZE), "--overlap", str(OVERLAP), "--no-progress", *argv])


def _crowd_coco(root, boxes, crowd):
    """A 64x128 image with the given boxes (xyxy) in a COCO file; ``crowd`` flags them."""
    os.makedirs(root / "images")
    cv2.imwrite(str(root / "images" / "wide.png"), np.full((64, 128, 3), 90, np.uint8))
    anns = [{"id": k + 1, "image_id": 7, "category_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1],
             "area": (x2 - x1) * (y2 - y1), "iscrowd": int(c)}
            for k, ((x1, y1, x2, y2), c) in enumerate(zip(boxes, crowd))]
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "wide.png", "height": 64, "width": 128}], "annotations": anns,
        "categories": [{"id": 3, "name": "thing"}, {"id": 9, "name": "other"}]}))
    return str(root / "annotations.json")


def test_window_boxes_keep_by_visible_fraction_relative_to_the_window():
    boxes = np.array([[50, 10, 70, 30], [10, 10, 20, 20], [58, 0, 80, 10]], np.float32)  # half, whole, 2/22 in
    clipped, keep = window_boxes(boxes, (0, 0, 60, 60), 0.5)
    assert keep.tolist() == [True, True, False]
    np.testing.assert_array_equal(clipped, [[50, 10, 60, 30], [10, 10, 20, 20]])
    assert window_boxes(boxes, (0, 0, 60, 60), 0.6)[1].tolist() == [False, True, False]
    _, keep = window_boxes(boxes, (0, 0, 60, 60), 0.6, always=np.array([False, False, True]))
    assert keep.tolist() == [False, True, True]  # a crowd region is kept wherever it overlaps
    clipped, keep = window_boxes(boxes, (40, 5, 104, 69), 1.0)  # relative to the window's corner
    assert keep.tolist() == [True, False, False] and clipped.tolist() == [[10, 5, 30, 25]]


@pytest.mark.parametrize("visibility, kept", [(0.4, True), (0.6, False)])
def test_a_box_half_outside_a_tile_is_kept_at_0_4_and_dropped_at_0_6(tmp_path, capsys, visibility, kept):
    ann = _crowd_coco(tmp_path / "src", [(48, 8, 80, 40), (8, 8, 24, 24), (100, 50, 127, 64)], [False, False, True])
    out = tmp_path / "out"
    assert main(["data", "tile", "--in", ann, "--output", str(out), "--size", "64", "--overlap", "0",
                 "--min-visibility", str(visibility), "--no-progress"]) == 0
    gt = json.loads((out / "annotations.json").read_text())
    assert gt["categories"] == [{"id": 3, "name": "thing"}, {"id": 9, "name": "other"}]
    by_tile = {img["file_name"]: [a for a in gt["annotations"] if a["image_id"] == img["id"]] for img in gt["images"]}
    assert sorted(by_tile) == ["wide_x0_y0.png", "wide_x64_y0.png"]
    left = {tuple(a["bbox"]): a["iscrowd"] for a in by_tile["wide_x0_y0.png"]}
    right = {tuple(a["bbox"]): a["iscrowd"] for a in by_tile["wide_x64_y0.png"]}
    assert left.pop((8.0, 8.0, 16.0, 16.0)) == 0 and right.pop((36.0, 50.0, 27.0, 14.0)) == 1  # crowd carried
    assert left == ({(48.0, 8.0, 16.0, 32.0): 0} if kept else {})
    assert right == ({(0.0, 8.0, 16.0, 32.0): 0} if kept else {})
    err = capsys.readouterr().err
    assert ("1 of the 3 objects are in no tile" in err) != kept


def test_coco_tiles_hold_exactly_the_visible_boxes_and_load_again(synth_sets, tmp_path, registries):
    src = build_dataset({"name": "coco", "images": str(synth_sets / "coco" / "images"),
                         "annotations": str(synth_sets / "coco" / "annotations.json")}, registries, "src")
    out = tmp_path / "tiles"
    assert _tile("--in", str(synth_sets / "coco" / "annotations.json"), "--output", str(out), "--keep-empty") == 0
    grid = tile_grid(H, W, SIZE, OVERLAP)
    tiles = build_dataset({"name": "coco", "images": str(out / "images"), "annotations": str(out / "annotations.json")},
                          registries, "tiles")
    assert len(tiles) == len(src) * len(grid) and tiles.class_names == list(CLASSES)
    gt = json.loads((out / "annotations.json").read_text())
    for index, img in enumerate(gt["images"]):
        x0, y0, x1, y1 = img["window"]
        source = src.annotations(img["source_id"] - 1)
        assert img["file_name"] == f"{img['source_file'][:-4]}_x{x0}_y{y0}.png" and [x0, y0, x1, y1] in grid.tolist()
        b = source["boxes"]
        inside = (np.clip(np.minimum(b[:, 2], x1) - np.maximum(b[:, 0], x0), 0, None)
                  * np.clip(np.minimum(b[:, 3], y1) - np.maximum(b[:, 1], y0), 0, None))
        expected = inside >= 0.5 * (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        ann = tiles.annotations(index)
        assert len(ann["boxes"]) == expected.sum()
        assert (ann["boxes"] >= 0).all() and (ann["boxes"][:, 2:] <= SIZE).all()
        np.testing.assert_array_equal(ann["labels"], source["labels"][expected])
        image, _ = tiles[index]
        assert image.shape == (y1 - y0, x1 - x0, 3)


def test_empty_tiles_are_left_out_by_default_and_a_fraction_is_kept(synth_sets, tmp_path):
    ann = str(synth_sets / "coco" / "annotations.json")
    counts = {}
    for name, extra in (("none", []), ("half", ["--keep-empty", "0.5"]), ("all", ["--keep-empty"])):
        assert _tile("--in", ann, "--output", str(tmp_path / name), *extra) == 0
        gt = json.loads((tmp_path / name / "annotations.json").read_text())
        with_boxes = {a["image_id"] for a in gt["annotations"]}
        counts[name] = (len(gt["images"]), len(gt["images"]) - len(with_boxes))
    total = 3 * len(tile_grid(H, W, SIZE, OVERLAP))
    assert counts["none"][1] == 0 and counts["all"][0] == total
    empty = counts["all"][1]
    assert counts["none"][0] == total - empty and 0.25 * empty < counts["half"][1] < 0.75 * empty


def test_voc_tiles_carry_the_split_and_round_trip_in_both_formats(synth_sets, tmp_path, registries):
    assert _tile("--in", str(synth_sets / "voc"), "--classes", CLASS_LIST, "--split", "val", "--output",
                 str(tmp_path / "voc")) == 0
    assert sorted(os.listdir(tmp_path / "voc" / "ImageSets" / "Main")) == ["val.txt"]
    voc = build_dataset({"name": "voc", "root": str(tmp_path / "voc"), "split": "val", "classes": list(CLASSES)},
                        registries, "tiles")
    assert len(voc) > 0 and sum(len(voc.annotations(i)["boxes"]) for i in range(len(voc))) > 0
    image, target = voc[0]
    assert image.shape[:2] == (SIZE, SIZE) and (target["boxes"] <= SIZE).all()
    assert _tile("--in", str(synth_sets / "voc"), "--classes", CLASS_LIST, "--split", "val", "--format", "coco",
                 "--output", str(tmp_path / "coco")) == 0
    coco = build_dataset({"name": "coco", "images": str(tmp_path / "coco" / "images"),
                          "annotations": str(tmp_path / "coco" / "annotations.json")}, registries, "tiles")
    assert len(coco) == len(voc)
    for i in range(len(voc)):  # the source boxes are whole pixels: both layouts hold the same boxes
        np.testing.assert_array_equal(coco.annotations(i)["boxes"], voc.annotations(i)["boxes"])


@pytest.mark.parametrize("argv, message", [
    (["--size", "16"], "argument --size: '16': expected an integer >= 32"),
    (["--overlap", "1"], "argument --overlap: '1': expected a number in [0, 1)"),
    (["--overlap", "-0.1"], "argument --overlap: '-0.1'"),
    (["--min-visibility", "0"], "argument --min-visibility: '0': expected a number in (0, 1]"),
    (["--min-visibility", "1.5"], "argument --min-visibility: '1.5'"),
    (["--keep-empty", "2"], "argument --keep-empty: '2': expected a number in [0, 1]"),
])
def test_bad_options_exit_2_naming_option_value_and_expectation(synth_sets, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:  # argparse's usage error: the options are checked before anything
        _tile("--in", str(synth_sets / "coco" / "annotations.json"), "--output", str(out), *argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err and not out.exists()


def test_missing_input_exits_2_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert _tile("--in", str(tmp_path / "nope.json"), "--output", str(out)) == 2
    assert f"--in {tmp_path / 'nope.json'}: no such file or folder" in capsys.readouterr().err
    os.makedirs(tmp_path / "plain")
    assert _tile("--in", str(tmp_path / "plain"), "--output", str(out)) == 2
    assert "a folder no dataset format recognises" in capsys.readouterr().err and not out.exists()


def test_non_empty_out_is_refused_unless_overwrite(synth_sets, tmp_path, capsys):
    ann = str(synth_sets / "coco" / "annotations.json")
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    assert _tile("--in", ann, "--output", str(out)) == 2
    assert "--output" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    assert _tile("--in", ann, "--output", str(out), "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["annotations.json", "images"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left beside it
    assert _tile("--in", ann, "--output", str(synth_sets / "coco"), "--overwrite") == 2  # would delete its sources
    assert "holds the source image" in capsys.readouterr().err


def test_an_interrupted_run_leaves_no_dataset(synth_sets, tmp_path, monkeypatch, registries):
    from detkit.data import tile

    written = []

    def fail_third(path, image):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)

    monkeypatch.setattr(tile, "_write_png", fail_third)
    dataset = build_dataset({"name": "coco", "images": str(synth_sets / "coco" / "images"),
                             "annotations": str(synth_sets / "coco" / "annotations.json")}, registries, "src")
    with pytest.raises(KeyboardInterrupt):
        tile_dataset(dataset, str(tmp_path / "out"), TileSpec(SIZE, OVERLAP, keep_empty=1.0), progress=False)
    assert len(written) == 2 and os.listdir(tmp_path) == []


def test_a_tiling_past_the_window_limit_is_refused_saying_how_many(synth_sets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "tile", "--in", str(synth_sets / "coco" / "annotations.json"), "--output", str(out),
                 "--size", "32", "--overlap", "0.99", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "windows, more than the 10,000 one image may have: use a larger --size or a smaller --overlap" in err
    assert not out.exists()
