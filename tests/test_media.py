"""Inference media: input kinds, video round trip, atomic outputs, drawing."""
import os

import numpy as np
import pytest

from detkit.media import MediaError, VideoSink, classify_input, list_images, open_video, write_json_atomic
from detkit.visualize import draw_detections


def test_classify_input(tmp_path):
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "clip.mp4").write_bytes(b"x")
    assert classify_input("0") == "webcam"
    assert classify_input(str(tmp_path)) == "folder"
    assert classify_input(str(tmp_path / "a.JPG")) == "image"
    assert classify_input(str(tmp_path / "clip.mp4")) == "video"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        classify_input(str(tmp_path / "nope.png"))
    with pytest.raises(MediaError, match="no images"):
        list_images(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)


def test_video_round_trip_and_bad_video(tmp_path):
    path = tmp_path / "v.mp4"
    with VideoSink(str(path), 8, (64, 48)) as sink:
        for i in range(10):
            sink.write(np.full((48, 64, 3), i * 20, np.uint8))
    src = open_video(str(path))
    frames = list(src)
    src.close()
    assert len(frames) == 10 and src.fps == pytest.approx(8) and src.size == (64, 48)
    assert frames[0].shape == (48, 64, 3)
    bad = tmp_path / "x.mp4"
    bad.write_text("hello")
    with pytest.raises(MediaError, match="x.mp4"):
        open_video(str(bad))


def test_interrupted_outputs_leave_previous_files_intact(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with VideoSink(str(path), 8, (32, 32)) as sink:
            sink.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]
    write_json_atomic(str(tmp_path / "r.json"), {"a": 1})
    assert (tmp_path / "r.json").read_text() == '{"a": 1}'


def test_draw_detections_only_near_boxes():
    image = np.full((64, 64, 3), 100, np.uint8)
    out = draw_detections(image, [[30, 30, 60, 60], [0, 0, 5, 5]], [0.9, 0.1], [1, 7], ["thing"], score_thr=0.5)
    assert (image == 100).all()  # input untouched
    changed = np.argwhere((out != 100).any(axis=2))
    assert len(changed) > 0
    assert changed[:, 0].min() >= 10 and changed[:, 1].min() >= 10  # the low-score box is not drawn
