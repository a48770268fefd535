"""The synthetic classification dataset: ImageFolder layout, determinism and prefix stability, that the folder
names the class drawn, the crop's layout rules, and the safety of the output directory."""
import json

import cv2
import numpy as np
import pytest

from detkit.data import synth_cls
from detkit.data.synth import CLASSES, COLOURS
from detkit.data.synth_cls import MIN_VISIBLE, SUMMARY, render_crop, synthesize_classification

PALETTE = np.array(COLOURS, np.float32)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _centre_colour_vote(img):
    """The class whose colour most pixels of the central half of the crop are close to."""
    s = img.shape[0]
    pixels = img[s // 4:3 * s // 4, s // 4:3 * s // 4].reshape(-1, 1, 3).astype(np.float32)
    dist = np.linalg.norm(pixels - PALETTE[None], axis=2)
    near = dist.min(1) < 70
    return int(np.bincount(dist.argmin(1)[near], minlength=len(CLASSES)).argmax())


def test_layout_counts_and_summary(tmp_path):
    out = tmp_path / "cls"
    summary = synthesize_classification(str(out), per_class=3, val_per_class=2, seed=1, size=32)
    assert summary == {"classes": list(CLASSES), "size": 32, "seed": 1, "per_class": {"train": 3, "val": 2},
                       "images": {"train": 15, "val": 10}}
    assert json.loads((out / SUMMARY).read_text()) == summary
    expected = [f"{split}/{c}/{i:05d}.png" for split, n in (("train", 3), ("val", 2)) for c in CLASSES
                for i in range(n)]
    assert _files(out) == sorted(expected + [SUMMARY])
    assert _read_rgb(out / "val" / "star" / "00001.png").shape == (32, 32, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["cls"]  # the staging directory is gone


def test_no_val_split_without_val_images(tmp_path):
    synthesize_classification(str(tmp_path / "cls"), per_class=1, val_per_class=0, size=16)
    assert not (tmp_path / "cls" / "val").exists() and len(_files(tmp_path / "cls" / "train")) == 5


def test_same_arguments_same_bytes_and_prefix_stable(tmp_path):
    a = tmp_path / "a"
    synthesize_classification(str(a), per_class=3, val_per_class=1, seed=5, size=40)
    b = tmp_path / "b"
    synthesize_classification(str(b), per_class=3, val_per_class=1, seed=5, size=40)
    assert _files(a) == _files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    c = tmp_path / "c"  # more images per class and no val: the first train images stay the same
    synthesize_classification(str(c), per_class=5, val_per_class=0, seed=5, size=40)
    for f in _files(a / "train"):
        assert (a / "train" / f).read_bytes() == (c / "train" / f).read_bytes()


def test_other_seed_differs(tmp_path):
    for seed in (0, 1):
        synthesize_classification(str(tmp_path / str(seed)), per_class=2, val_per_class=1, seed=seed, size=32)
    for f in _files(tmp_path / "0"):
        if f.endswith(".png"):
            assert (tmp_path / "0" / f).read_bytes() != (tmp_path / "1" / f).read_bytes(), f


def test_folder_names_the_class_drawn(tmp_path):
    """Vote each image's class by the colour at its centre: right for most images of every class (15% wear
    another class's colour), which a shuffle of images between class folders would break."""
    synthesize_classification(str(tmp_path), per_class=20, val_per_class=0, seed=3, size=48)
    hits = np.zeros(len(CLASSES))
    for c, name in enumerate(CLASSES):
        hits[c] = np.mean([_centre_colour_vote(_read_rgb(p)) == c
                           for p in sorted((tmp_path / "train" / name).iterdir())])
    assert hits.min() >= 0.6 and hits.mean() >= 0.75, hits


def test_crop_layout_visibility_and_colour_swaps():
    size, n = 64, 40
    swapped = 0
    for c in range(len(CLASSES)):
        for i in range(n):
            img, shape, visible = render_crop(np.random.default_rng([9, 0, c, i]),
                                              np.random.default_rng([9, 0, c, i, 1]), c, size)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            assert not (visible & ~shape).any() and visible.sum() >= MIN_VISIBLE * shape.sum()
            ys, xs = np.nonzero(shape)
            # the box centre: jitter up to 15% of the side, plus what rotation and a cut at the border move it
            for lo, hi in ((xs.min(), xs.max() + 1), (ys.min(), ys.max() + 1)):
                assert abs((lo + hi) / 2 - size / 2) < 0.25 * size
            long = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert 0.3 * size <= long <= size
            dist = np.linalg.norm(img[visible].astype(np.float32)[:, None] - PALETTE[None], axis=2)
            swapped += np.bincount(dist.argmin(1), minlength=len(CLASSES)).argmax() != c
    assert 0.05 <= swapped / (n * len(CLASSES)) <= 0.3  # about 15%: colour alone does not give the class


def test_refuses_a_foreign_directory_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not mine")
    with pytest.raises(ValueError, match="photos.*not empty"):
        synthesize_classification(str(foreign), per_class=1, val_per_class=1, size=16)
    assert _files(foreign) == ["holiday.jpg"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file.*not a directory"):
        synthesize_classification(str(tmp_path / "a_file"), per_class=1, size=16)

    empty = tmp_path / "empty"
    empty.mkdir()
    synthesize_classification(str(empty), per_class=1, val_per_class=1, size=16)
    own = tmp_path / "own"
    synthesize_classification(str(own), per_class=3, val_per_class=2, size=16)
    (own / "NOTES.txt").write_text("kept")
    summary = synthesize_classification(str(own), per_class=2, val_per_class=0, size=16)
    assert json.loads((own / SUMMARY).read_text()) == summary
    assert _files(own) == sorted(["NOTES.txt", SUMMARY] + [f"train/{c}/{i:05d}.png" for c in CLASSES
                                                          for i in range(2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "own", "photos"]


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    own = tmp_path / "own"
    synthesize_classification(str(own), per_class=1, val_per_class=1, size=16)
    before = {f: (own / f).read_bytes() for f in _files(own)}
    written = []

    def fail_on_seventh(path, image):
        written.append(path)
        if len(written) == 7:
            raise KeyboardInterrupt
        cv2.imwrite(path, image)

    monkeypatch.setattr(synth_cls, "_write_png", fail_on_seventh)
    for target in (own, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            synthesize_classification(str(target), per_class=4, val_per_class=1, size=16)
        written.clear()
    assert {f: (own / f).read_bytes() for f in _files(own)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["own"]


@pytest.mark.parametrize("kwargs, message", [
    ({"per_class": 0}, "per_class=0: expected an integer >= 1"),
    ({"val_per_class": -1}, "val_per_class=-1: expected an integer >= 0"),
    ({"size": 15}, "size=15: expected an integer >= 16"),
    ({"seed": -2}, "seed=-2: expected an integer >= 0"),
    ({"per_class": 2.5}, "per_class=2.5: expected an integer"),
    ({"size": True}, "size=True: expected an integer"),
])
def test_argument_validation(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize_classification(str(tmp_path / "out"), **kwargs)
    assert not list(tmp_path.iterdir())
