"""The built-in synthetic dataset and video: determinism, loadability in both layouts, content, the variants,
the video."""
import hashlib
import json
import re

import cv2
import numpy as np
import pytest

from detkit.data import COCODataset, VOCDataset
from detkit.cli import main
from detkit.data.synth import CLASSES, COLOURS, VARIANTS, render, synthesize, synthesize_video

SIZE = (96, 128)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (synthesize(str(tmp_path / n), "coco", 12, seed=s, image_size=SIZE)
               for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert a == b and a["images"] == 12
    for i in range(12):
        name = f"{i:06d}.png"
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert (tmp_path / "a" / "annotations.json").read_bytes() == (tmp_path / "b" / "annotations.json").read_bytes()
    assert (tmp_path / "a" / "images" / "000000.png").read_bytes() != \
        (tmp_path / "c" / "images" / "000000.png").read_bytes()
    assert (tmp_path / "a" / "annotations.json").read_bytes() != (tmp_path / "c" / "annotations.json").read_bytes()


def test_coco_layout_loads_with_every_class_and_boxes_inside(tmp_path):
    summary = synthesize(str(tmp_path), "coco", 50, seed=0, image_size=SIZE)
    ds = COCODataset(str(tmp_path / "images"), str(tmp_path / "annotations.json"))
    assert len(ds) == 50 and ds.class_names == list(CLASSES) and ds.cat_ids == [1, 2, 3, 4, 5]
    labels = np.concatenate([ds.annotations(i)["labels"] for i in range(len(ds))])
    assert set(labels.tolist()) == {1, 2, 3, 4, 5}
    assert summary["objects"] == len(labels) and sum(summary["per_class"].values()) == len(labels)
    boxes = np.concatenate([ds.annotations(i)["boxes"] for i in range(len(ds))])
    h, w = SIZE
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()
    counts = [len(ds.annotations(i)["labels"]) for i in range(len(ds))]
    assert max(counts) <= 6 and np.mean(counts) > 1.5
    gt = json.loads((tmp_path / "annotations.json").read_text())
    assert {img["file_name"] for img in gt["images"]} == {p.name for p in (tmp_path / "images").iterdir()}


def test_voc_layout_loads_and_matches_coco_boxes(tmp_path):
    synthesize(str(tmp_path / "coco"), "coco", 6, seed=4, image_size=SIZE)
    synthesize(str(tmp_path / "voc"), "voc", 6, seed=4, image_size=SIZE)
    coco = COCODataset(str(tmp_path / "coco" / "images"), str(tmp_path / "coco" / "annotations.json"))
    voc = VOCDataset(str(tmp_path / "voc"), classes=list(CLASSES))
    assert len(voc) == 6 and len(VOCDataset(str(tmp_path / "voc"), split="test", classes=list(CLASSES))) == 6
    train = (tmp_path / "voc" / "ImageSets" / "Main" / "train.txt").read_text().split()
    val = (tmp_path / "voc" / "ImageSets" / "Main" / "val.txt").read_text().split()
    assert val == ["000004"] and sorted(train + val) == [f"{i:06d}" for i in range(6)]
    for i in range(6):  # the 1-based VOC coordinates round-trip to the same boxes
        np.testing.assert_array_equal(voc.annotations(i)["boxes"], coco.annotations(i)["boxes"])
        np.testing.assert_array_equal(voc.annotations(i)["labels"], coco.annotations(i)["labels"])
    image, target = voc[0]
    assert image.shape == (*SIZE, 3) and target["boxes"].dtype.is_floating_point


def test_images_without_objects_exist_and_objects_vary_in_size():
    sizes, empty = [], 0
    for i in range(120):
        _, boxes, labels = render(np.random.default_rng([7, i]), np.random.default_rng([7, i, 1]), 120, 160)
        empty += len(boxes) == 0
        sizes.extend(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).tolist())
        assert labels.min(initial=0) >= 0 and labels.max(initial=0) < len(CLASSES)
    assert 1 <= empty <= 20  # about 5%
    assert min(sizes) < 20 and max(sizes) > 50  # 8%..50% of the 120 px side


def test_colour_alone_does_not_give_the_class():
    """Vote each object's class by the nearest class colour of the pixels in its box: with every object in its
    own class's colour the vote is wrong for about 7% (occluders in the box); 15% wear another class's colour."""
    palette = np.array(COLOURS, np.float32)
    wrong = total = 0
    for i in range(80):
        image, boxes, labels = render(np.random.default_rng([11, i]), np.random.default_rng([11, i, 1]), 120, 160)
        for (x1, y1, x2, y2), label in zip(boxes.astype(int), labels):
            pixels = image[y1:y2, x1:x2].reshape(-1, 1, 3).astype(np.float32)
            dist = np.linalg.norm(pixels - palette[None], axis=2)
            near = dist.min(1) < 70
            if near.any():
                total += 1
                wrong += np.bincount(dist[near].argmin(1), minlength=len(CLASSES)).argmax() != label
    assert total > 150 and 0.12 < wrong / total < 0.4


def test_each_image_is_rendered_and_written_once(tmp_path, monkeypatch):
    """What keeps synthesis cheap (its speed is measured by tools/benchmark.py, not here): one render and one
    PNG encoding per image at the default 240x320, and the annotations written once, at the end."""
    from detkit.data import synth

    calls = []

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("render", "_write_png", "write_text_atomic"):
        monkeypatch.setattr(synth, name, counted(name, getattr(synth, name)))
    summary = synthesize(str(tmp_path), "coco", 30, seed=0)
    assert calls == ["render", "_write_png"] * 30 + ["write_text_atomic"] and summary["images"] == 30
    gt = json.loads((tmp_path / "annotations.json").read_text())
    assert {(img["height"], img["width"]) for img in gt["images"]} == {(240, 320)}
    assert len(list((tmp_path / "images").iterdir())) == 30


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="format 'yolo'"):
        synthesize(str(tmp_path), "yolo", 2, seed=0)
    with pytest.raises(ValueError, match="num_images=0"):
        synthesize(str(tmp_path), "coco", 0, seed=0)
    with pytest.raises(ValueError, match="variant 'tiny': expected one of 'default', 'small'"):
        synthesize(str(tmp_path), "coco", 2, seed=0, variant="tiny")


def test_default_variant_is_unchanged(tmp_path):
    """Golden runs and every test above depend on the default images: digests recorded before there were
    variants (pixels rather than PNG bytes, which depend on the PNG encoder's version)."""
    digest = hashlib.sha256()
    for i in range(4):
        image, boxes, labels = render(np.random.default_rng([0, i]), np.random.default_rng([0, i, 1]), *SIZE)
        digest.update(image.tobytes() + boxes.tobytes() + labels.tobytes())
    assert digest.hexdigest() == "f1d195ecb2bbcf9f06d2d791efde31fb5626fdf757389ad761cfa6ac3df4934e"
    synthesize(str(tmp_path / "a"), "coco", 4, seed=0, image_size=SIZE)
    synthesize(str(tmp_path / "b"), "coco", 4, seed=0, image_size=SIZE, variant="default")
    gt = (tmp_path / "a" / "annotations.json").read_bytes()
    assert hashlib.sha256(gt).hexdigest() == "13b1ca5a6318d2bb34d2a2d647047ca535ad0dc06ebd0f99fd2a4b13680e26e3"
    assert (tmp_path / "b" / "annotations.json").read_bytes() == gt and "info" not in json.loads(gt)
    for i in range(4):
        name = f"{i:06d}.png"
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_small_variant_is_deterministic_and_records_itself(tmp_path):
    a, b = (synthesize(str(tmp_path / n), "coco", 3, seed=2, image_size=SIZE, variant="small") for n in "ab")
    assert a == b and a["variant"] == "small"
    for name in ["annotations.json"] + [f"images/{i:06d}.png" for i in range(3)]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "annotations.json").read_text())["info"]["variant"] == "small"
    synthesize(str(tmp_path / "default"), "coco", 3, seed=2, image_size=SIZE)
    assert (tmp_path / "a" / "images" / "000000.png").read_bytes() != \
        (tmp_path / "default" / "images" / "000000.png").read_bytes()


def test_small_variant_objects_are_mostly_small_and_many(tmp_path):
    """At 240x320 nearly every object is COCO-small (box area < 32^2), with about 25 per image; the default
    variant has about 3, mostly medium or large."""
    synthesize(str(tmp_path), "coco", 6, seed=0, variant="small")
    ds = COCODataset(str(tmp_path / "images"), str(tmp_path / "annotations.json"))
    boxes = [ds.annotations(i)["boxes"] for i in range(len(ds))]
    areas = np.concatenate([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes])
    assert np.mean(areas < 32 ** 2) >= 0.8 and np.mean([len(b) for b in boxes]) >= 15
    labels = np.concatenate([ds.annotations(i)["labels"] for i in range(len(ds))])
    assert set(labels.tolist()) == {1, 2, 3, 4, 5}
    all_boxes = np.concatenate(boxes)
    assert (all_boxes[:, :2] >= 0).all() and (all_boxes[:, 2] <= 320).all() and (all_boxes[:, 3] <= 240).all()


def test_cli_accepts_every_variant_and_names_them_for_an_unknown_one(tmp_path, capsys):
    """The CLI lists the variants itself (importing them would import torch): it must list exactly these."""
    for name in VARIANTS:
        assert main(["data", "synth", "--output", str(tmp_path / name), "--variant", name, "--num-images", "2",
                     "--size", "96x128"]) == 0
        assert f"variant {name}" in capsys.readouterr().out
    assert json.loads((tmp_path / "small" / "annotations.json").read_text())["info"]["variant"] == "small"
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--output", str(tmp_path / "x"), "--variant", "tiny"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "invalid choice: 'tiny'" in message
    assert re.findall(r"[\w-]+", message.split("choose from")[1]) == list(VARIANTS)
    assert not (tmp_path / "x").exists()


def test_video_has_the_requested_frames_and_no_temp_file(tmp_path):
    path = tmp_path / "clip.mp4"
    synthesize_video(str(path), 7, seed=0, fps=10, size=(64, 96))
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 7 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10)
    assert frames[0].shape == (64, 96, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 0.5  # the objects move
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp file left behind


def test_synth_into_an_earlier_dataset_is_refused_unless_overwritten(tmp_path, capsys):
    """Writing into an earlier dataset replaced annotations.json and left its images beside it (a mixed set):
    refused; --overwrite replaces the dataset folder whole, and never a folder holding anything else."""
    from detkit.cli import main

    out = tmp_path / "train"
    assert main(["data", "synth", "--output", str(out), "--num-images", "3", "--size", "64x64"]) == 0
    assert main(["data", "synth", "--output", str(out), "--num-images", "2", "--size", "64x64", "--seed", "1"]) == 2
    assert "the folder is not empty (annotations.json, images)" in capsys.readouterr().err
    assert len(list((out / "images").iterdir())) == 3
    assert main(["data", "synth", "--output", str(out), "--num-images", "2", "--size", "64x64", "--seed", "1",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 2
    assert not list(tmp_path.glob(".train.new*"))
    (out / "notes.txt").write_text("mine")
    assert main(["data", "synth", "--output", str(out), "--num-images", "2", "--size", "64x64", "--overwrite"]) == 2
    assert "also holds notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
