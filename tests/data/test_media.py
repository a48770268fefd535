"""Inference media: input kinds, video round trip, unreadable inputs, atomic outputs, drawing."""
import json
import logging
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from detkit.data import media
from detkit.data.media import MediaError, VideoSink, classify_input, list_images, open_video, write_image_atomic
from detkit.engine.files import write_json_atomic
from detkit.evaluation.drawing import color_for, draw_detections


def write_video(path, n=10, fps=8, size=(64, 48)):
    """Frame i is a flat grey of value 20 * i."""
    with VideoSink(str(path), fps, size) as sink:
        for i in range(n):
            sink.write(np.full((size[1], size[0], 3), 20 * i, np.uint8))


def test_classify_input(tmp_path):
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "clip.mp4").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hello")
    write_video(tmp_path / "real.avi", n=3)
    shutil.copy(tmp_path / "real.avi", tmp_path / "real.bin")
    assert classify_input("0") == "webcam"
    assert classify_input("12") == "webcam"
    assert classify_input(str(tmp_path)) == "folder"
    assert classify_input(str(tmp_path / "a.JPG")) == "image"
    assert classify_input(tmp_path / "clip.mp4") == "video"  # by extension; opening it is open_video's job
    assert classify_input(str(tmp_path / "real.bin")) == "video"  # unknown extension, but OpenCV opens it
    with pytest.raises(MediaError, match="notes.txt"):
        classify_input(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        classify_input(str(tmp_path / "nope.png"))


def test_list_images(tmp_path):
    for name in ["b.png", "a.jpg", "c.TIFF", "._a.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.TIFF"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="empty: no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_video_round_trip(tmp_path, ext):
    path = tmp_path / f"v{ext}"
    write_video(path, n=10, fps=8, size=(64, 48))
    with open_video(str(path)) as src:
        frames = list(src)
    assert src.fps == pytest.approx(8) and src.size == (64, 48) and src.frame_count == 10
    assert len(frames) == 10
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    # Lossy codecs, but a flat grey survives to within a few levels.
    assert [round(float(f.mean()) / 20) for f in frames] == list(range(10))
    assert sorted(os.listdir(tmp_path)) == [f"v{ext}"]  # no temporary file left behind


def test_colour_order_survives_the_round_trip(tmp_path):
    path = tmp_path / "red.avi"
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    with VideoSink(str(path), 5, (32, 32)) as sink:
        sink.write(red)
    with open_video(path) as src:
        (frame,) = list(src)
    assert frame[..., 0].mean() > 200 and frame[..., 2].mean() < 50  # RGB in, RGB out


def test_unreadable_inputs(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_text("hello")
    with pytest.raises(MediaError, match="x.mp4"):
        open_video(str(bad))
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        open_video(str(tmp_path / "gone.mp4"))
    with pytest.raises(MediaError, match="webcam 97"):
        open_video("97")  # no such camera on any test machine


def test_missing_fps_defaults_with_a_warning(tmp_path, monkeypatch, caplog):
    path = tmp_path / "v.avi"
    write_video(path, n=2)
    real = cv2.VideoCapture

    class NoFps:  # a capture whose container does not report a frame rate
        def __init__(self, *args):
            self._cap = real(*args)

        def get(self, prop):
            return 0.0 if prop == cv2.CAP_PROP_FPS else self._cap.get(prop)

        def __getattr__(self, name):
            return getattr(self._cap, name)

    monkeypatch.setattr(media.cv2, "VideoCapture", NoFps)
    with caplog.at_level(logging.WARNING, logger="detkit.data.media"):
        src = open_video(path)
    src.close()
    assert src.fps == media.DEFAULT_FPS == 25
    assert "v.avi: frame rate unknown" in caplog.text


def test_interrupted_video_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="interrupted"):
        with VideoSink(str(path), 8, (32, 32)) as sink:
            sink.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]
    with pytest.raises(MediaError, match="no frames"):
        with VideoSink(str(path), 8, (32, 32)):
            pass
    assert path.read_bytes() == b"previous result"
    with pytest.raises(ValueError, match="frame 0: size 16x32, expected 32x32"):
        with VideoSink(str(path), 8, (32, 32)) as sink:
            sink.write(np.zeros((32, 16, 3), np.uint8))
    assert path.read_bytes() == b"previous result"
    write_video(path, n=3, size=(32, 32))  # a successful run does replace it
    assert path.read_bytes() != b"previous result" and sorted(os.listdir(tmp_path)) == ["out.mp4"]
    with pytest.raises(MediaError, match="out.gif"):
        VideoSink(str(tmp_path / "out.gif"), 8, (32, 32))


def test_atomic_image_and_json(tmp_path):
    image = np.zeros((8, 12, 3), np.uint8)
    image[..., 0] = 200
    write_image_atomic(tmp_path / "sub" / "a.png", image)
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "sub" / "a.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(back, image)
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    # Same permissions as an ordinary open() would give (a mkstemp temp file would leave 0600).
    (tmp_path / "plain").write_text("x")
    assert os.stat(tmp_path / "r.json").st_mode == os.stat(tmp_path / "plain").st_mode
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"a": object()})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    with pytest.raises(MediaError, match="a.xyz"):
        write_image_atomic(tmp_path / "a.xyz", image)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        write_image_atomic(tmp_path / "b.png", image.astype(np.float32))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "plain", "r.json", "sub"]


def test_draw_detections_only_near_boxes():
    image = np.full((200, 200, 3), 100, np.uint8)
    x1, y1, x2, y2 = 100, 100, 150, 160
    boxes = torch.tensor([[x1, y1, x2, y2], [0, 0, 40, 40]], dtype=torch.float32)
    out = draw_detections(image, boxes, torch.tensor([0.87, 0.1]), torch.tensor([1, 2]), ["thing", "other"],
                          score_thr=0.5)
    assert (image == 100).all()  # input untouched
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != 100).any(axis=2)
    assert tuple(int(v) for v in out[130, x1]) == color_for(1)  # the outline, in its class colour
    assert not changed[y1 + 2:y2 - 1, x1 + 2:x2 - 1].any()  # box interior untouched
    tag_rows = changed[y1 - 20:y1]
    assert tag_rows.any() and not tag_rows[:, :x1].any()  # a tag just above the box, from its left edge
    outside = changed.copy()
    outside[y1 - 20:y2 + 2, x1 - 1:] = False
    assert not outside.any()  # nothing else drawn, in particular not the low-score box


def test_draw_detections_small_image_and_border_boxes():
    image = np.zeros((32, 32, 3), np.uint8)
    boxes = np.array([[0, 0, 32, 32], [-5, 20, 10, 40], [30, 30, 31.9, 31.9]])
    out = draw_detections(image, boxes, [0.9, 0.8, 0.7], [1, 2, 3], ["person", "bicycle", "car"])
    assert out.shape == (32, 32, 3)
    assert tuple(int(v) for v in out[16, 0]) == color_for(1)  # the box on the border is visible
    assert (out[:3, :] != 0).any()  # the tag for the top box sits inside the image, at the top
    assert len({color_for(k) for k in range(1, 21)}) == 20
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        draw_detections(image[..., 0], boxes, [0.9] * 3, [1] * 3, ["person"])
    with pytest.raises(ValueError, match="3 boxes, 2 scores"):
        draw_detections(image, boxes, [0.9] * 2, [1] * 3, ["person"])
