"""Large synthetic scenes (``detkit data synth --scene``): the layout scales with the area, objects stay 24-64 px,
output is deterministic and loadable, memory stays bounded, and bad arguments are named."""
import json
import tracemalloc

import numpy as np
import pytest

from detkit.cli import main
from detkit.data import COCODataset, VOCDataset
from detkit.data.synth import CLASSES, SCENE_OBJECT_PX, render, scene_variant


def _scene(h, w, seed=0, index=0):
    return render(np.random.default_rng([seed, index]), np.random.default_rng([seed, index, 1]), h, w,
                  scene_variant(h, w))


def test_layout_keeps_the_default_density_per_area_and_object_sizes_in_pixels():
    v = scene_variant(4000, 4000)
    assert np.allclose(np.array(v.object_scale) * 4000, SCENE_OBJECT_PX) and SCENE_OBJECT_PX == (24.0, 64.0)
    windows = 4000 * 4000 / (240 * 320)
    assert v.objects == (round(2.5 * windows), round(4.5 * windows))  # 3.5 per 240x320 on average, as default
    assert 500 < v.objects[0] and v.objects[1] < 1000 and v.empty == 0.0
    small = scene_variant(600, 800)  # the same sizes in pixels, the counts in proportion to the area
    assert np.allclose(np.array(small.object_scale) * 600, SCENE_OBJECT_PX)
    assert small.objects == (round(2.5 * 6.25), round(4.5 * 6.25))


def test_scene_has_many_small_objects_of_every_class_inside_the_image():
    h, w = 600, 800
    img, boxes, labels = _scene(h, w)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    lo, hi = scene_variant(h, w).objects
    assert 0.7 * lo <= len(boxes) < hi  # a few are hidden by others or by clutter, as in the default data
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()
    side = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < w) & (boxes[:, 3] < h)  # not cut by the border
    assert side[inside].min() >= 12 and side.max() <= 100 and 30 < np.median(side) < 60


def test_scene_memory_is_bounded_by_the_image_not_by_float_copies_of_it():
    """A 2000x2000 scene holds its image (12 MB) and the object owner map (16 MB); a float64 noise image alone
    would be 96 MB, and a full-image mask per occluder 4 MB each (hundreds of occluders)."""
    tracemalloc.start()
    try:
        _scene(2000, 2000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_cli_scene_is_deterministic_and_loads_in_both_formats(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["data", "synth", "--output", str(tmp_path / name), "--scene", "300x400", "--num-images", "2",
                     "--seed", "3"]) == 0
    assert "variant scene" in capsys.readouterr().out
    for rel in ("annotations.json", "images/000000.png", "images/000001.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    gt = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert gt["info"]["variant"] == "scene"
    assert {(i["height"], i["width"]) for i in gt["images"]} == {(300, 400)}
    ds = COCODataset(str(tmp_path / "a" / "images"), str(tmp_path / "a" / "annotations.json"))
    assert len(ds) == 2 and all(len(ds.annotations(i)["boxes"]) >= 3 for i in range(2))
    assert main(["data", "synth", "--output", str(tmp_path / "voc"), "--scene", "300x400", "--num-images", "2",
                 "--seed", "3", "--format", "voc"]) == 0
    voc = VOCDataset(str(tmp_path / "voc"), classes=list(CLASSES))
    for i in range(2):  # the same scenes in either layout
        np.testing.assert_array_equal(voc.annotations(i)["boxes"], ds.annotations(i)["boxes"])


@pytest.mark.parametrize("argv, message", [
    (["--scene", "40x400"], "argument --scene: '40x400': expected HEIGHTxWIDTH with each at least 64, e.g. 4000x4000"),
    (["--scene", "big"], "argument --scene: 'big': expected HEIGHTxWIDTH with each at least 64, e.g. 4000x4000"),
    (["--scene", "300x400", "--variant", "small"], "--scene draws its own layout"),
    (["--scene", "300x400", "--num-images", "0"], "argument --num-images: '0': expected an integer >= 1"),
])
def test_cli_bad_scene_arguments_exit_2_naming_them(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:
        code = main(["data", "synth", "--output", str(out), *argv])
    except SystemExit as exc:  # argparse's usage error (a number out of its range)
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_cli_scene_and_size_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--output", str(tmp_path / "x"), "--scene", "300x400", "--size", "96x128"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
