"""Data layer: COCO/VOC loaders, sanitisation, bad-input errors, images, augmentation, synthetic data."""
import json
import logging

import cv2
import numpy as np
import pytest

from detkit.data import COCODataset, DatasetError, ImageReadError, VOCDataset, build_transform, read_image
from detkit.data.synth import CLASSES, synthesize, synthesize_video


def write_png(path, h=40, w=60, channels=3, value=128):
    shape = (h, w) if channels == 1 else (h, w, channels)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))


@pytest.fixture
def coco_dir(tmp_path):
    (tmp_path / "images").mkdir()
    write_png(tmp_path / "images" / "a.png")
    write_png(tmp_path / "images" / "b.png")
    data = {
        "images": [{"id": 10, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 11, "file_name": "b.png", "height": 40, "width": 60}],
        "categories": [{"id": 12, "name": "cat"}, {"id": 3, "name": "ant"}, {"id": 7, "name": "bee"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 12, "bbox": [50, 30, 20, 20], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [70, 5, 10, 10], "iscrowd": 0},  # outside: dropped
            {"id": 4, "image_id": 10, "category_id": 3, "bbox": [1, 1, 0, 5], "iscrowd": 0},  # degenerate
            {"id": 5, "image_id": 10, "category_id": 3, "bbox": [0, 0, 30, 30], "iscrowd": 1},  # crowd
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path, data


def test_coco_contiguous_labels_and_sanitisation(coco_dir, caplog):
    root, _ = coco_dir
    with caplog.at_level(logging.WARNING):
        ds = COCODataset(str(root / "images"), str(root / "ann.json"), skip_empty=True)
    assert ds.class_names == ["ant", "bee", "cat"] and ds.cat_ids == [3, 7, 12]
    assert "clipped 1 boxes" in caplog.text and "dropped 2 degenerate" in caplog.text and "ann.json" in caplog.text
    image, target = ds[0]
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    assert target["labels"].tolist() == [2, 3]  # bee, cat; the crowd region is not a training target
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [50, 30, 60, 40]]
    assert ds.train_indices == [0]  # image b has no objects
    gt = ds.to_coco()
    assert {a["category_id"] for a in gt["annotations"]} == {3, 7, 12}
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1


@pytest.mark.parametrize("field,value,message", [
    ("category_id", 99, "annotation 1 refers to category id 99"),
    ("image_id", 5, "annotation 1 refers to image id 5"),
])
def test_coco_unknown_ids_are_named(coco_dir, field, value, message):
    root, data = coco_dir
    data["annotations"][0][field] = value
    (root / "bad.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as err:
        COCODataset(str(root / "images"), str(root / "bad.json"))
    assert "bad.json" in str(err.value)


def test_coco_empty_and_invalid_files(coco_dir):
    root, data = coco_dir
    (root / "empty.json").write_text(json.dumps({**data, "images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="no images"):
        COCODataset(str(root / "images"), str(root / "empty.json"))
    (root / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json: invalid JSON"):
        COCODataset(str(root / "images"), str(root / "broken.json"))
    with pytest.raises(DatasetError, match="not found"):
        COCODataset(str(root / "images"), str(root / "missing.json"))


def make_voc(root, objects_xml, classes_line="a"):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    write_png(root / "JPEGImages" / "0001.png")
    (root / "Annotations" / "0001.xml").write_text(
        f"<annotation><filename>0001.png</filename><size><width>60</width><height>40</height></size>"
        f"{objects_xml}</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("0001\n")


def voc_object(name, box, difficult=0):
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def test_voc_difficult_and_one_based_coordinates(tmp_path):
    make_voc(tmp_path, voc_object("dog", (1, 1, 10, 20)) + voc_object("cat", (5, 5, 30, 30), difficult=1))
    ds = VOCDataset(str(tmp_path), classes=["cat", "dog"])
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0, 0, 10, 20], [4, 4, 30, 30]]
    assert target["labels"].tolist() == [2, 1] and target["difficult"].tolist() == [False, True]
    assert [a["iscrowd"] for a in ds.to_coco()["annotations"]] == [0, 1]  # difficult ignored by the metric
    assert len(VOCDataset(str(tmp_path), classes=["cat", "dog"], use_difficult=False)[0][1]["labels"]) == 1


def test_voc_errors_name_the_file(tmp_path):
    make_voc(tmp_path, voc_object("unicorn", (1, 1, 10, 10)))
    with pytest.raises(DatasetError, match=r"0001.xml: object 0 has class 'unicorn'"):
        VOCDataset(str(tmp_path), classes=["cat"])
    make_voc(tmp_path, "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>")
    with pytest.raises(DatasetError, match=r"0001.xml: object 0 \(cat\) <bndbox> has no <ymax>"):
        VOCDataset(str(tmp_path), classes=["cat"])
    with pytest.raises(DatasetError, match="test.txt"):
        VOCDataset(str(tmp_path), split="test", classes=["cat"])


def test_read_image_conversions_and_errors(tmp_path):
    write_png(tmp_path / "gray.png", channels=1)
    write_png(tmp_path / "rgba.png", channels=4)
    assert read_image(tmp_path / "gray.png").shape == (40, 60, 3)
    assert read_image(tmp_path / "rgba.png").shape == (40, 60, 3)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        read_image(tmp_path / "corrupt.jpg")
    with pytest.raises(ImageReadError, match="missing.png: image file not found"):
        read_image(tmp_path / "missing.png")


def test_hflip_maps_boxes_and_is_seeded():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :10] = 255
    t = build_transform(train=True, hflip=1.0)
    out, boxes, labels, extra = t(image, np.array([[5.0, 2.0, 15.0, 12.0]]), np.array([3]),
                                  {"difficult": np.array([True])})
    np.testing.assert_allclose(boxes, [[45.0, 2.0, 55.0, 12.0]], atol=1e-4)  # x1' = W - x2
    assert labels.tolist() == [3] and extra["difficult"].tolist() == [True] and out[:, -1].min() == 255
    half = build_transform(train=True, hflip=0.5)
    draws = []
    for seed in (1, 2, 3, 1, 2, 3):
        half.set_seed(seed)
        draws.append(half(image, np.array([[5.0, 2.0, 15.0, 12.0]]), np.array([1]))[1][0, 0])
    assert draws[:3] == draws[3:]
    assert build_transform(train=False) is None


def test_synth_is_deterministic_and_loadable(tmp_path):
    a, b, c = (synthesize(str(tmp_path / n), "coco", 50, seed=s, image_size=(96, 128))
               for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert a == b and a["objects"] > 50
    for name in ("000000.png", "000037.png"):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert (tmp_path / "a" / "annotations.json").read_text() == (tmp_path / "b" / "annotations.json").read_text()
    assert (tmp_path / "a" / "images" / "000000.png").read_bytes() != (tmp_path / "c" / "images" / "000000.png").read_bytes()
    ds = COCODataset(str(tmp_path / "a" / "images"), str(tmp_path / "a" / "annotations.json"))
    labels = np.concatenate([ds.annotations(i)["labels"] for i in range(len(ds))])
    assert set(labels.tolist()) == set(range(1, len(CLASSES) + 1))  # every class present
    boxes = np.concatenate([ds.annotations(i)["boxes"] for i in range(len(ds))])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    synthesize(str(tmp_path / "v"), "voc", 5, seed=0, image_size=(96, 128))
    voc = VOCDataset(str(tmp_path / "v"), split="test", classes=list(CLASSES))
    assert len(voc) == 5


def test_synth_video_frame_count(tmp_path):
    path = tmp_path / "clip.mp4"
    synthesize_video(str(path), 7, seed=0, fps=10, size=(64, 96))
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 7 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left behind


def test_concat_07_plus_12(tmp_path, registries):
    from detkit.engine import build_dataset

    synthesize(str(tmp_path / "VOC2007"), "voc", 3, seed=0, image_size=(64, 96))
    synthesize(str(tmp_path / "VOC2012"), "voc", 2, seed=1, image_size=(64, 96))
    classes = list(CLASSES)
    spec = {"name": "concat", "datasets": [{"name": "voc", "root": str(tmp_path / "VOC2007"), "classes": classes},
                                           {"name": "voc", "root": str(tmp_path / "VOC2012"), "classes": classes}]}
    ds = build_dataset(spec, registries, "train")
    assert len(ds) == 5 and [ds.image_info(i)["id"] for i in range(5)] == [1, 2, 3, 4, 5]
    assert ds[4][1]["image_id"] == 5
    spec["datasets"][1]["classes"] = classes + ["unicorn"]
    with pytest.raises(DatasetError, match="dataset 1"):
        build_dataset(spec, registries, "train")


def test_augmentations_keep_boxes_consistent():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 10.0, 40.0, 50.0], [60.0, 20.0, 118.0, 78.0]])
    t = build_transform(train=True, hflip=0.5, scale=[0.7, 1.3], crop=1.0, color_jitter=1.0)
    for seed in range(20):
        t.set_seed(seed)
        out, b, labels, extra = t(image, boxes, np.array([1, 2]), {"difficult": np.array([False, True])})
        h, w = out.shape[:2]
        assert len(b) == len(labels) == len(extra["difficult"])
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        for lab, diff in zip(labels, extra["difficult"]):
            assert diff == (lab == 2)  # extras follow their boxes
    with pytest.raises(ValueError, match="data.augment.crop"):
        build_transform(train=True, crop=2.0)


def test_aspect_ratio_grouping_sampler():
    from detkit.engine import StreamBatchSampler

    groups = [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    sampler = StreamBatchSampler(list(range(10)), 2, seed=0, groups=groups)
    it = iter(sampler)
    for _ in range(12):
        batch = [i for i, _ in next(it)]
        assert len({groups[i] for i in batch}) == 1
    # Two processes take the two halves of the same grouped global batch.
    a = iter(StreamBatchSampler(list(range(10)), 1, 0, rank=0, world_size=2, groups=groups))
    b = iter(StreamBatchSampler(list(range(10)), 1, 0, rank=1, world_size=2, groups=groups))
    one = iter(StreamBatchSampler(list(range(10)), 2, 0, groups=groups))
    for _ in range(6):
        assert [x for x, _ in next(one)] == [next(a)[0][0], next(b)[0][0]]
