"""Tiled inference (detkit.models.tiling): the window grid, merging across window borders, each merge mode, the
whole-image pass, a real detector through TiledDetector, and `detkit infer --tile` / `detkit eval --set
eval.tile.size=...` end to end."""
import json

import cv2
import numpy as np
import pytest
import torch

from detkit.cli import main
from detkit.config import ConfigError, TileSettings, bind_parts, from_dict, to_dict
from detkit.data.tile import tile_grid
from detkit.engine.checkpoint import save_checkpoint
from detkit.models.tiling import MERGE_MODES, TiledDetector, check_tile_settings, merge_detections, tiled

CLASSES = ["circle", "square", "triangle", "star", "cross"]
TINY_MODEL = {
    "backbone": {"name": "tiny", "args": {"widths": [8, 16, 32, 48, 48], "hidden": 64}},
    "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128]}, "pre_nms_top_n_test": 100,
                           "post_nms_top_n_test": 30},
    "transform": {"min_size": 120, "max_size": 160},
}


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("height, width, size, overlap", [
    (100, 100, 100, 0.2),  # exactly one window
    (50, 70, 100, 0.2),  # smaller than one window: the image itself
    (300, 300, 100, 0.0),  # an exact multiple, no overlap: 3 x 3 windows side by side
    (300, 200, 100, 0.5),  # an exact multiple at half overlap
    (1000, 777, 256, 0.2),
    (257, 512, 256, 0.3),  # one pixel more than a window
])
def test_tile_grid_covers_the_image_with_the_requested_overlap(height, width, size, overlap):
    windows = tile_grid(height, width, size, overlap)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in windows.tolist():
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == (min(size, width), min(size, height))  # all windows one size
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for axis, length in ((0, width), (1, height)):
        starts = windows[:, axis].unique()
        assert starts[0] == 0 and starts[-1] + min(size, length) == length
        shared = min(size, length) - starts.diff()  # pixels two neighbours share
        assert (shared >= overlap * size - 1e-6).all() if length > size else len(starts) == 1
    if (height, width, size, overlap) == (300, 300, 100, 0.0):
        assert windows[:, 0].unique().tolist() == [0, 100, 200] and len(windows) == 9


def test_bad_settings_name_the_key_the_value_and_the_range():
    with pytest.raises(ConfigError, match=r"^eval\.tile\.merge='union': expected one of nms, larger, ios$"):
        check_tile_settings(TileSettings(size=64, merge="union"))
    with pytest.raises(ConfigError, match=r"^--overlap 1\.0: expected a number in \[0, 1\)$"):
        check_tile_settings(TileSettings(size=64, overlap=1.0), names={"overlap": "--overlap"})
    with pytest.raises(ConfigError, match=r"^eval\.tile\.size=-1: expected an integer >= 0$"):
        tiled(lambda images: [], TileSettings(size=-1))
    detector = object()
    assert tiled(detector, TileSettings()) is detector  # size 0: tiling is off


# ----------------------------------------------------------------------------- merging across windows


def painted_detector(crops):
    """A detector that finds painted objects exactly: channel 0 holds an object's id (1, 2, ...), channel 1 its
    score x 255, channel 2 its label; the box is the bounding box of the id's pixels inside the window (so an
    object cut by the window's edge comes out as the visible part of it)."""
    out = []
    for crop in crops:
        boxes, scores, labels = [], [], []
        for obj in crop[0].unique().tolist():
            if obj == 0:
                continue
            ys, xs = (crop[0] == obj).nonzero(as_tuple=True)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            scores.append(float(crop[1, ys[0], xs[0]]) / 255)
            labels.append(int(crop[2, ys[0], xs[0]]))
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.int64)})
    return out


def paint(height, width, objects):
    """A (3, H, W) uint8 image of the ``objects`` ``[(x0, y0, x1, y1, score, label)]`` for :func:`painted_detector`."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for k, (x0, y0, x1, y1, score, label) in enumerate(objects, start=1):
        image[:, y0:y1, x0:x1] = torch.tensor([k, round(score * 255), label], dtype=torch.uint8).view(3, 1, 1)
    return image


# 100 x 100 windows at overlap 0.4 on 200 x 300: starts 0, 50, 100, 150, 200 across and 0, 50, 100 down, so
# every window edge inside the image cuts something below.
OBJECTS = [
    (90, 20, 120, 45, 0.9, 1),  # across x = 100 (and inside windows starting at 50 and 100)
    (140, 85, 165, 110, 0.8, 2),  # across x = 150 and y = 100: a corner of four windows
    (5, 140, 30, 170, 0.7, 3),  # near the image border only: never cut by an inner edge
    (240, 95, 280, 140, 0.6, 1),  # across y = 100, x = 250
]


@pytest.mark.parametrize("merge", MERGE_MODES)
def test_objects_cut_by_window_edges_are_found_once_and_whole(merge):
    image = paint(200, 300, OBJECTS)
    settings = TileSettings(size=100, overlap=0.4, merge=merge, batch=3)
    windows = tile_grid(200, 300, 100, 0.4)
    raw = painted_detector([image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows.tolist()])
    assert sum(len(d["boxes"]) for d in raw) > 3 * len(OBJECTS)  # each object seen, whole or cut, several times
    det = TiledDetector(painted_detector, settings, progress=False).detect(image)
    expected = sorted(OBJECTS, key=lambda o: -o[4])  # most confident first
    assert det["boxes"].tolist() == [list(map(float, o[:4])) for o in expected]  # shifted back, not doubled
    assert det["scores"].tolist() == pytest.approx([round(o[4] * 255) / 255 for o in expected])
    assert det["labels"].tolist() == [o[5] for o in expected]


def test_an_hwc_array_gives_what_its_chw_tensor_gives_and_windows_are_views_in_batches():
    image = paint(200, 300, OBJECTS)
    seen = []

    def spy(crops):
        assert all(c.untyped_storage().data_ptr() == image.untyped_storage().data_ptr() for c in crops)  # no copies
        seen.append(len(crops))
        return painted_detector(crops)

    array = image.permute(1, 2, 0).contiguous()  # (H, W, 3), a copy the views must then point into
    image = array.permute(2, 0, 1)
    tiled_spy = TiledDetector(spy, TileSettings(size=100, overlap=0.4, batch=4), progress=False)
    from_array = tiled_spy.detect(array.numpy())
    assert seen == [4, 4, 4, 3]  # 15 windows, 4 per forward pass
    from_tensor = tiled_spy([image])[0]
    assert all(torch.equal(from_array[k], from_tensor[k]) for k in from_tensor) and len(from_tensor["boxes"]) == 4


def detections(*rows):
    """``{"boxes", "scores", "labels"}`` of rows ``(x0, y0, x1, y1, score, label)``."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": t[:, :4], "scores": t[:, 4], "labels": t[:, 5].long()}


@pytest.mark.parametrize("merge, expected", [
    ("nms", [[70, 10, 100, 40, 0.9]]),  # the more confident of the two
    ("larger", [[80, 10, 115, 40, 0.8]]),  # the larger of the two
    ("ios", [[70, 10, 115, 40, 0.9]]),  # their union, with the higher score
])
def test_each_merge_mode_on_an_object_cut_in_both_windows(merge, expected):
    """An object (70-115) wider than the overlap (80-100): each window sees a cut piece of it, so no window
    sees it whole and only the merge rule joins the pieces; other classes and pairs within a window stay."""
    windows = torch.tensor([[0, 0, 100, 100], [80, 0, 180, 100]])
    left = detections((70, 10, 100, 40, 0.9, 1), (72, 12, 98, 38, 0.5, 2),  # another class
                      (20, 50, 60, 90, 0.7, 1), (25, 55, 62, 92, 0.6, 1))  # a pair in one window: the detector's
    right = detections((80, 10, 115, 40, 0.8, 1))
    settings = TileSettings(size=100, overlap=0.2, merge=merge, iou_thresh=0.4)
    det = merge_detections([left, right], windows, (100, 180), settings)
    rows = torch.cat([det["boxes"], det["scores"][:, None], det["labels"][:, None].float()], 1)
    others = [[20, 50, 60, 90, 0.7, 1], [25, 55, 62, 92, 0.6, 1], [72, 12, 98, 38, 0.5, 2]]
    expected = sorted([e + [1] for e in expected] + others, key=lambda r: -r[4])
    assert rows.shape == (4, 6) and torch.allclose(rows, torch.tensor(expected))


def test_the_whole_image_pass_keeps_an_object_larger_than_a_window():
    objects = [(40, 40, 200, 160, 0.9, 4), (250, 20, 270, 40, 0.8, 1)]  # 160 x 120: cut by every window
    image = paint(200, 300, objects)
    settings = TileSettings(size=100, overlap=0.4, full_image=True)
    det = TiledDetector(painted_detector, settings, progress=False, full_image_side=150).detect(image)
    assert det["boxes"].tolist() == [list(map(float, o[:4])) for o in objects]  # the pieces were dropped
    pieces = TiledDetector(painted_detector, TileSettings(size=100, overlap=0.4), progress=False).detect(image)
    assert (pieces["labels"] == 4).sum() > 1  # without the whole-image pass: only pieces, several


def test_a_progress_bar_counts_the_windows_of_a_large_image(capsys, monkeypatch):
    image = paint(200, 300, OBJECTS)
    TiledDetector(painted_detector, TileSettings(size=100, overlap=0.4), progress=False).detect(image)
    assert "windows" not in capsys.readouterr().err
    TiledDetector(painted_detector, TileSettings(size=100, overlap=0.4)).detect(image)
    assert "windows" not in capsys.readouterr().err  # stderr is no terminal here: no bar, no carriage returns
    monkeypatch.setattr("detkit.engine.progress.on_terminal", lambda: True)
    TiledDetector(painted_detector, TileSettings(size=100, overlap=0.4)).detect(image)
    assert "windows:   0%|          | 0/15" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real detector


@pytest.fixture(scope="module")
def tiny(registries):
    from detkit.models.assembly import build_detector

    cfg = bind_parts(from_dict({"model": {**TINY_MODEL, "num_classes": 5, "class_names": CLASSES}}), registries)
    torch.manual_seed(0)
    return build_detector(cfg.model, registries, 5, CLASSES).eval(), cfg


def test_an_image_inside_one_window_gives_plain_inference_exactly(tiny):
    model, _ = tiny
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model([image])[0]
    det = TiledDetector(model, TileSettings(size=200), progress=False)([image])[0]
    assert len(plain["boxes"]) > 0
    assert all(torch.equal(det[k], plain[k]) for k in plain)


def test_window_detections_are_shifted_into_the_image(tiny):
    """Two windows side by side (no overlap, so nothing is merged): what the detector finds in each crop,
    shifted by the window's origin."""
    model, _ = tiny
    image = torch.randint(0, 256, (3, 120, 320), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        left, right = model([image[:, :, :160], image[:, :, 160:]])
    right["boxes"] = right["boxes"] + torch.tensor([160.0, 0, 160, 0])
    det = TiledDetector(model, TileSettings(size=160, overlap=0.0), progress=False)([image])[0]
    expected = torch.cat([torch.cat([d["boxes"], d["scores"][:, None]], 1) for d in (left, right)])
    got = torch.cat([det["boxes"], det["scores"][:, None]], 1)
    assert (det["boxes"][:, 0] >= 160).any() and len(got) == len(expected)
    assert torch.allclose(torch.tensor(sorted(got.tolist())), torch.tensor(sorted(expected.tolist())))


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    _, cfg = tiny
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(str(path), model_state=tiny[0].state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=CLASSES, cat_ids=[1, 2, 3, 4, 5])
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(root), "--num-images", "2", "--seed", "0", "--size", "120x200"]) == 0
    return root


def test_infer_with_tiles_writes_detections_in_image_coordinates(checkpoint, data_dir, tmp_path, monkeypatch):
    import detkit.models.tiling

    calls = []
    monkeypatch.setattr(detkit.models.tiling.TiledDetector, "_detect_windows",
                        lambda self, image, windows, original=detkit.models.tiling.TiledDetector._detect_windows:
                        calls.append(len(windows)) or original(self, image, windows))
    image = sorted((data_dir / "images").iterdir())[0]
    out = tmp_path / "out"
    assert main(["infer", str(checkpoint), str(image), "--output", str(out), "--tile", "64", "--overlap", "0.25",
                 "--tile-merge", "ios", "--tile-batch", "3", "--score-thr", "0", "--no-progress"]) == 0
    assert calls == [len(tile_grid(120, 200, 64, 0.25))]
    results = json.loads((out / "results.json").read_text())
    boxes = np.array([r["bbox"] for r in results])
    assert len(boxes) and (boxes[:, 0] + boxes[:, 2] <= 200 + 1e-3).all() and (boxes[:, 0] > 64).any()
    assert cv2.imread(str(out / (image.stem + "_det" + image.suffix))).shape == (120, 200, 3)


def test_eval_with_tiles_from_the_config_key(checkpoint, data_dir, tmp_path, monkeypatch, capsys):
    import detkit.models.tiling

    seen = []
    monkeypatch.setattr(detkit.models.tiling.TiledDetector, "detect",
                        lambda self, image, original=detkit.models.tiling.TiledDetector.detect:
                        seen.append((self.settings.size, tuple(image.shape))) or original(self, image))
    out = tmp_path / "eval"
    assert main(["eval", str(checkpoint), "--data", str(data_dir / "annotations.json"), "--output", str(out),
                 "--set", "eval.tile.size=64", "--set", "eval.tile.merge=larger", "--no-progress"]) == 0
    assert seen == [(64, (3, 120, 200))] * 2
    assert {"AP", "AP50"} <= set(json.loads((out / "metrics.json").read_text()))


@pytest.mark.parametrize("args, message", [
    (["--tile", "-5"], "argument --tile: '-5': expected an integer >= 0"),
    (["--tile", "64", "--overlap", "1.5"], "argument --overlap: '1.5': expected a number in [0, 1)"),
    (["--tile", "64", "--overlap", "-0.1"], "argument --overlap: '-0.1': expected a number in [0, 1)"),
    (["--tile", "64", "--tile-batch", "0"], "argument --tile-batch: '0': expected an integer >= 1"),
])
def test_bad_tile_options_exit_2_before_the_model_is_built(args, message, tmp_path, monkeypatch, capsys):
    def build(*_):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr("detkit.models.loading.model_from_checkpoint", build)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as exc:  # argparse's usage error: the ranges are the options' own
        main(["infer", str(tmp_path / "model.pth"), str(image), "--output", str(tmp_path / "o"), *args])
    assert exc.value.code == 2 and f"detkit infer: error: {message}" in capsys.readouterr().err


def test_a_bad_merge_mode_exits_2(checkpoint, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["infer", str(checkpoint), str(data_dir), "--tile", "64", "--tile-merge", "union"])
    assert exit_.value.code == 2 and "--tile-merge: invalid choice: 'union'" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--data", str(data_dir / "annotations.json"), "--output",
                 str(tmp_path / "e"), "--set", "eval.tile.size=64", "--set", "eval.tile.merge=union"]) == 2
    assert "eval.tile.merge='union': expected one of nms, larger, ios" in capsys.readouterr().err
    assert main(["eval", str(checkpoint), "--data", str(data_dir / "annotations.json"), "--output",
                 str(tmp_path / "e"), "--set", "eval.tile.overlap=1"]) == 2
    assert "eval.tile.overlap=1.0: expected a number in [0, 1)" in capsys.readouterr().err


def test_tilings_past_the_window_limit_or_below_the_smallest_window_are_refused_by_count(tmp_path):
    """--tile 1 or --overlap 0.999 cut one image into unbounded numbers of windows (13 GB and growing): the
    count is computed first and a tiling past the limit is refused saying how many it would be."""
    from detkit.data.tile import MAX_WINDOWS, TooManyWindows, window_count

    assert window_count(20000, 20000, 64, 0.999) == 19937 ** 2 > MAX_WINDOWS  # stride 1 px: every offset
    assert window_count(400, 600, 100, 0.4) == len(tile_grid(400, 600, 100, 0.4))
    with pytest.raises(TooManyWindows, match="makes 397,483,969 windows, more than the 10,000"):
        tile_grid(20000, 20000, 64, 0.999)
    detector = TiledDetector(lambda images: [], TileSettings(size=64, overlap=0.999), progress=False)
    with pytest.raises(ConfigError, match=r"tiled inference: a 3000x2000 image .* makes [\d,]+ windows"):
        detector.detect(np.zeros((2000, 3000, 3), np.uint8))
    with pytest.raises(ConfigError, match="--tile 16: expected 0 .no tiling. or a window side of at least 32 px"):
        check_tile_settings(TileSettings(size=16), names={"size": "--tile"})
