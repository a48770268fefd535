"""Inference inputs and outputs: images, folders, videos, webcams; atomic writes.

Every output file is written to a temporary name in its directory and renamed
into place only when complete, so an interrupted run never leaves a half-written
file and never clobbers a previous result.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class MediaError(ValueError):
    """An input that cannot be read as what it claims to be; the message names it."""


def classify_input(spec: str) -> str:
    """``"image"``, ``"folder"``, ``"video"`` or ``"webcam"`` (an integer such as ``0``)."""
    if str(spec).isdigit():
        return "webcam"
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise FileNotFoundError(f"input not found: {spec}")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return "image"
    return "video"


def list_images(folder: str | os.PathLike) -> list[Path]:
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise MediaError(f"{folder}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


class VideoSource:
    """RGB frames of a video file or webcam, with its ``fps``, ``frame_count`` (0 if unknown) and ``size`` (w, h)."""

    def __init__(self, spec: str):
        self.spec = spec
        is_cam = str(spec).isdigit()
        self.capture = cv2.VideoCapture(int(spec) if is_cam else str(spec))
        if not self.capture.isOpened():
            raise MediaError(f"{'webcam ' if is_cam else ''}{spec}: cannot be opened as a video")
        ok, frame = self.capture.read()
        if not ok or frame is None:
            self.capture.release()
            raise MediaError(f"{spec}: no decodable video frame (corrupt or unsupported video)")
        self._first = frame
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        if not fps or not np.isfinite(fps) or fps <= 0:
            log.warning("%s: frame rate unknown, assuming 25 fps", spec)
            fps = 25.0
        self.fps = float(fps)
        self.frame_count = 0 if is_cam else max(0, int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT)))
        self.size = (frame.shape[1], frame.shape[0])

    def __iter__(self):
        if self._first is not None:
            frame, self._first = self._first, None
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        while True:
            ok, frame = self.capture.read()
            if not ok or frame is None:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.capture.release()


def open_video(spec: str) -> VideoSource:
    return VideoSource(spec)


def _temp_beside(path: str, suffix: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    return tmp


class VideoSink:
    """Writes RGB frames to ``path``; the file appears only when the ``with`` block ends without error."""

    def __init__(self, path: str, fps: float, size: tuple[int, int]):
        self.path = path
        self.size = (int(size[0]), int(size[1]))
        ext = os.path.splitext(path)[1].lower() or ".mp4"
        self.tmp = _temp_beside(path, ext)
        self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*FOURCC.get(ext, "mp4v")), float(fps),
                                      self.size)
        if not self.writer.isOpened():
            os.remove(self.tmp)
            raise MediaError(f"{path}: OpenCV cannot write a {ext} video here")

    def write(self, frame_rgb: np.ndarray) -> None:
        if (frame_rgb.shape[1], frame_rgb.shape[0]) != self.size:
            frame_rgb = cv2.resize(frame_rgb, self.size)
        self.writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))

    def __enter__(self) -> "VideoSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.writer.release()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_image_atomic(path: str, image_rgb: np.ndarray) -> None:
    ext = os.path.splitext(path)[1].lower() or ".png"
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise MediaError(f"{path}: cannot encode an image as {ext}")
    tmp = _temp_beside(path, ext)
    try:
        buf.tofile(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    tmp = _temp_beside(path, ".json")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
