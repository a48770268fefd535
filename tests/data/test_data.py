"""Data layer: COCO/VOC loaders, sanitisation, bad-input errors, images, augmentation (synthetic data: test_synth)."""
import json
import logging
import os
import re

import cv2
import numpy as np
import pytest
import torch

from detkit.data import COCODataset, DatasetError, ImageReadError, VOCDataset, build_transform, collate, read_image
from detkit.data.synth import CLASSES, synthesize


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
    assert "ann.json: clipped 1 box, dropped 2 degenerate boxes" in caplog.text
    image, target = ds[0]
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    assert target["labels"].tolist() == [2, 3]  # bee, cat; the crowd region is not a training target
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [50, 30, 60, 40]]
    assert ds.train_indices == [0]  # image b has no objects
    gt = ds.to_coco()
    assert [(a["category_id"], a["bbox"], a["iscrowd"]) for a in gt["annotations"]] == [
        (7, [5, 5, 10, 10], 0), (12, [50, 30, 10, 10], 0), (3, [0, 0, 30, 30], 1)]  # labels map back via cat_ids
    assert [c["id"] for c in gt["categories"]] == [3, 7, 12] and [i["id"] for i in gt["images"]] == [10, 11]
    assert [a["area"] for a in gt["annotations"]] == [100, 100, 900]  # box areas where the file states none
    assert ds.image_info(1) == {"id": 11, "file_name": str(root / "images" / "b.png"), "height": 40, "width": 60}


def test_coco_area_and_float_sizes_are_kept(coco_dir):
    root, data = coco_dir
    data["annotations"][0]["area"] = 61.5  # a segment's area, smaller than its box's: it decides APs/APm/APl
    data["images"][0].update(height=40.0, width=60.0)
    (root / "area.json").write_text(json.dumps(data))
    ds = COCODataset(str(root / "images"), str(root / "area.json"))
    assert ds.image_info(0)["height"] == 40 and [a["area"] for a in ds.to_coco()["annotations"]][:2] == [61.5, 100]


def test_non_finite_boxes_are_refused_naming_the_annotation(coco_dir):
    """JSON has no NaN or Infinity, but Python's json (and other readers) take them: a file with them is malformed,
    and it is refused naming the annotation rather than read with the box dropped."""
    root, data = coco_dir
    for k, bbox in enumerate(([float("nan"), 1, 5, 5], [1, 1, float("inf"), 5])):
        data["annotations"] = [{"id": 8, "image_id": 10, "category_id": 3, "bbox": bbox},
                               {"id": 9, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5]}]
        (root / f"nan{k}.json").write_text(json.dumps(data))  # Python's json writes and reads NaN/Infinity
        with pytest.raises(DatasetError, match=rf"nan{k}.json: annotation 8: 'bbox' must be finite numbers"):
            COCODataset(str(root / "images"), str(root / f"nan{k}.json"))


def test_two_categories_of_one_name_are_refused_naming_both_ids(coco_dir):
    """Two categories named alike would leave the model one class name for two labels (one class vanished from
    the per-class results, and its AP went to the other): refused, naming both ids."""
    root, data = coco_dir
    data["categories"][2]["name"] = "cat"  # id 7 named like id 12
    (root / "twice.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="twice.json: categories 12 and 7 are both named 'cat'"):
        COCODataset(str(root / "images"), str(root / "twice.json"))


def test_image_size_differing_from_the_annotation_warns_once(coco_dir, caplog):
    root, data = coco_dir
    write_png(root / "images" / "a.png", h=30, w=50)  # the file says 40x60
    ds = COCODataset(str(root / "images"), str(root / "ann.json"))
    with caplog.at_level(logging.WARNING):
        image, target = ds[0]
        ds[0]
    assert image.shape == (30, 50, 3) and target["orig_size"] == (30, 50)
    assert target["boxes"].tolist() == [[5, 5, 15, 15]]  # (50, 30, 60, 40) has no area inside 50x30
    assert caplog.text.count("a.png: image is 50x30") == 1


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
    with pytest.raises(DatasetError, match="annotation file not found: .*missing.json"):
        COCODataset(str(root / "images"), str(root / "missing.json"))
    with pytest.raises(DatasetError, match="images directory not found: .*nowhere"):
        COCODataset(str(root / "nowhere"), str(root / "ann.json"))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotation 2: 'bbox' must be \[x, y, width, height\]"),
    (lambda d: d["images"].append(dict(d["images"][0])), "image id 10 appears twice"),
    (lambda d: d["images"][1].pop("height"), "image 11 .images.1.. has no 'height'"),
    (lambda d: d["categories"].append({"id": 3, "name": "again"}), "category id 3 appears twice"),
    (lambda d: d["images"][0].update(width=60.5), "image 10 has width=60.5, expected a positive integer"),
    (lambda d: d["images"][0].update(height=0), "image 10 has height=0, expected a positive integer"),
])
def test_coco_bad_entries_are_named(coco_dir, edit, message):
    root, data = coco_dir
    edit(data)
    (root / "bad.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="bad.json: .*" + message):
        COCODataset(str(root / "images"), str(root / "bad.json"))


def make_voc(root, objects_xml, width=60):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    write_png(root / "JPEGImages" / "0001.png")
    (root / "Annotations" / "0001.xml").write_text(
        f"<annotation><filename>0001.png</filename><size><width>{width}</width><height>40</height></size>"
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
    assert ds.cat_ids == [1, 2] and ds.image_info(0)["id"] == 1
    assert len(VOCDataset(str(tmp_path), classes=["cat", "dog"], use_difficult=False)[0][1]["labels"]) == 1


def test_voc_errors_name_the_file(tmp_path):
    make_voc(tmp_path, voc_object("unicorn", (1, 1, 10, 10)))
    with pytest.raises(DatasetError, match=r"0001.xml: object 0 has class 'unicorn'"):
        VOCDataset(str(tmp_path), classes=["cat"])
    make_voc(tmp_path, "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>")
    with pytest.raises(DatasetError, match=r"0001.xml: object 0 \(cat\) <bndbox> has no <ymax>"):
        VOCDataset(str(tmp_path), classes=["cat"])
    make_voc(tmp_path, voc_object("cat", (1, "one", 10, 10)))
    with pytest.raises(DatasetError, match=r"0001.xml: object 0 \(cat\) <bndbox> <ymin> is 'one'"):
        VOCDataset(str(tmp_path), classes=["cat"])
    make_voc(tmp_path, voc_object("cat", (1, 1, 10, 10)), width=0)
    with pytest.raises(DatasetError, match=r"0001.xml: <size> is 0x40 \(WxH\), expected a positive"):
        VOCDataset(str(tmp_path), classes=["cat"])
    with pytest.raises(DatasetError, match="split file not found: .*test.txt"):
        VOCDataset(str(tmp_path), split="test", classes=["cat"])
    (tmp_path / "ImageSets" / "Main" / "empty.txt").write_text("\n")
    with pytest.raises(DatasetError, match="empty.txt: the split lists no images"):
        VOCDataset(str(tmp_path), split="empty", classes=["cat"])
    (tmp_path / "ImageSets" / "Main" / "gone.txt").write_text("0002\n")
    with pytest.raises(DatasetError, match="gone.txt: image '0002': annotation .*0002.xml not found"):
        VOCDataset(str(tmp_path), split="gone", classes=["cat"])


def test_read_image_conversions_and_errors(tmp_path):
    write_png(tmp_path / "gray.png", channels=1, value=77)
    bgra = np.zeros((40, 60, 4), np.uint8)
    bgra[..., 2], bgra[..., 3] = 200, 10  # red, nearly transparent
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((40, 60, 3), 65535, np.uint16))
    gray, rgba, deep = (read_image(tmp_path / n) for n in ("gray.png", "rgba.png", "deep.png"))
    assert gray.shape == rgba.shape == deep.shape == (40, 60, 3)
    assert gray.dtype == rgba.dtype == deep.dtype == np.uint8
    assert (gray == 77).all() and rgba[0, 0].tolist() == [200, 0, 0] and (deep == 255).all()  # alpha dropped
    (tmp_path / "bilder").mkdir()
    write_png(tmp_path / "bilder" / "größe 画像.png")  # non-ASCII path
    assert read_image(tmp_path / "bilder" / "größe 画像.png").shape == (40, 60, 3)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png: empty file"):
        read_image(tmp_path / "empty.png")
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

    def draws():
        out = []
        for seed in range(24):
            half.set_seed(seed)
            out.append(float(half(image, np.array([[5.0, 2.0, 15.0, 12.0]]), np.array([1]))[1][0, 0]))
        return out

    first = draws()
    assert first == draws() and set(first) == {5.0, 45.0}  # reproducible per seed, and both outcomes occur

    def sequence(seed):  # a pipeline built with a seed repeats its whole sequence of draws
        t = build_transform(train=True, hflip=0.5, seed=seed)
        return [float(t(image, np.array([[5.0, 2.0, 15.0, 12.0]]), np.array([1]))[1][0, 0]) for _ in range(24)]

    assert sequence(3) == sequence(3) and set(sequence(3)) == {5.0, 45.0} and sequence(3) != sequence(4)
    for identity in (build_transform(train=False), build_transform(train=True, hflip=0.0)):
        out, boxes, labels, extra = identity(image, [[5, 2, 15, 12]], [3], {"difficult": [True]})
        assert out is image and boxes.tolist() == [[5, 2, 15, 12]] and boxes.dtype == np.float32
        assert labels.tolist() == [3] and extra["difficult"].tolist() == [True]
    empty = t(image, np.zeros((0, 4)), np.zeros(0, np.int64), {"difficult": np.zeros(0, bool)})
    assert empty[1].shape == (0, 4) and len(empty[2]) == len(empty[3]["difficult"]) == 0


def test_dataset_applies_the_transform_and_collate_keeps_lists(tmp_path):
    make_voc(tmp_path, voc_object("dog", (1, 1, 10, 20)) + voc_object("cat", (41, 5, 60, 30), difficult=1))
    ds = VOCDataset(str(tmp_path), classes=["cat", "dog"], transform=build_transform(train=True, hflip=1.0))
    ds.transform.set_seed(0)
    image, target = ds[0]
    np.testing.assert_allclose(target["boxes"], [[50, 0, 60, 20], [0, 4, 20, 30]], atol=1e-4)  # x1' = W - x2
    assert target["labels"].tolist() == [2, 1] and target["difficult"].tolist() == [False, True]
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    images, targets = collate([ds[0], ds[0]])
    assert len(images) == len(targets) == 2 and images[0].shape == (40, 60, 3)


def test_concat_07_plus_12(tmp_path, registries):
    from detkit.data.loading import build_dataset

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
    from detkit.data.loading import StreamBatchSampler

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


@pytest.mark.parametrize("file_name, message", [
    ("../secret.png", "image 10 has file_name '../secret.png', which lies outside the images directory"),
    ("/etc/passwd", "image 10 has file_name '/etc/passwd', which lies outside the images directory"),
    ("sub/../../a.png", "image 10 has file_name 'sub/../../a.png', which lies outside"),
    (7, "image 10 has file_name=7, expected a path relative to the images directory"),
    (None, "image 10 has file_name=None, expected a path"),
    ("", "image 10 has file_name='', expected a path"),
])
def test_file_names_outside_the_images_directory_or_not_paths_are_refused(coco_dir, file_name, message):
    root, data = coco_dir
    data["images"][0]["file_name"] = file_name
    (root / "out.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=re.escape(message)):
        COCODataset(str(root / "images"), str(root / "out.json"))


def test_a_dataset_may_allow_images_outside_its_directory(coco_dir):
    root, data = coco_dir
    write_png(root / "elsewhere.png")
    data["images"][0]["file_name"] = "../elsewhere.png"
    (root / "out.json").write_text(json.dumps(data))
    ds = COCODataset(str(root / "images"), str(root / "out.json"), allow_outside_images=True)
    assert ds.image_info(0)["file_name"] == str(root / "elsewhere.png") and ds[0][0].shape == (40, 60, 3)
    data["images"][0]["file_name"] = "sub/../a.png"  # inside, however spelt
    (root / "in.json").write_text(json.dumps(data))
    assert COCODataset(str(root / "images"), str(root / "in.json")).image_info(0)["file_name"] == str(
        root / "images" / "a.png")


def test_an_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    """A 1.2 MB 20000x20000 PNG took 62 s and 11 GB in infer: its header is read first and the image refused
    past the decoded-pixel limit (DETKIT_MAX_IMAGE_PIXELS, default 100 MP), saying what to do."""
    from detkit.data import images as images_module

    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), np.zeros((300, 400), np.uint8))
    assert read_image(path).shape == (300, 400, 3)
    monkeypatch.setenv("DETKIT_MAX_IMAGE_PIXELS", "100000")  # 0.1 MP: this 0.12 MP image is over it
    calls = []
    monkeypatch.setattr(images_module.cv2, "imdecode", lambda *a: calls.append(a))
    with pytest.raises(ImageReadError, match=r"wide.png: 400x300 pixels \(0 MP\), more than the 0.1 MP one image "
                                             r"may decode to; .*DETKIT_MAX_IMAGE_PIXELS and detect it with --tile"):
        read_image(path)
    assert calls == []  # refused from the header
    monkeypatch.setenv("DETKIT_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ImageReadError, match="DETKIT_MAX_IMAGE_PIXELS='lots': expected a positive integer"):
        read_image(path)


def test_a_fifo_or_device_is_refused_instead_of_blocking(tmp_path):
    from detkit.data.media import MediaError, classify_input

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="pipe.png: not a regular file"):
        read_image(fifo)
    with pytest.raises(MediaError, match="pipe.png: not a regular file"):
        classify_input(str(fifo))
    with pytest.raises(ImageReadError, match="/dev/zero: not a regular file"):
        read_image("/dev/zero")
