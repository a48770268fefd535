"""Inference inputs and outputs: images, folders, video files and webcams in; images, videos, JSON out.

This is the I/O edge of ``detkit infer``: it decides what kind of input a
command-line spec names, yields RGB frames from videos and webcams through
OpenCV (whose own log lines are silenced: detkit reports what went wrong, naming
the file), checks before any work that an output folder can be written and an
input file read, and writes pictures and videos atomically (:mod:`detkit.engine.files`), so an
interrupted run never leaves a half-written file and never clobbers an earlier result. It sits in the data
layer because training, proposals and evaluation read and write images too. (No paper section: this is
plumbing around the detector.)
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# FFmpeg (inside OpenCV) prints its own complaints about a bad video ("moov atom not found") unless told
# not to, when OpenCV first opens a video; detkit reports every failure itself, naming the file.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

import cv2  # noqa: E402  (after the environment it reads)
import numpy as np  # noqa: E402

from detkit.engine.files import PendingFile, write_bytes_atomic  # noqa: E402

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
# Codecs OpenCV's bundled FFmpeg can write without extra libraries.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}
DEFAULT_FPS = 25.0


class MediaError(ValueError):
    """An input or output that cannot be read or written as what it claims to be; the message names it."""


@contextmanager
def quiet_opencv() -> Iterator[None]:
    """OpenCV's own log lines ("[ WARN:0@0.1] global cap.cpp ...") silenced while the block runs: around a
    bad video they would interleave with detkit's message, which names the file and the problem."""
    previous = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


def check_output_dir(path: str | os.PathLike, what: str) -> None:
    """Fail now, before any work, when ``path`` cannot be (or become) a folder this process writes into: a
    file there or on the way to it, or a folder without write permission (tried with a temporary file, which
    is gone at once). No folder is created: the command creates it when it writes.

    Raises:
        MediaError: naming ``what`` (``--output``, ``train.work_dir``), the path and the reason.
    """
    path = os.path.abspath(os.fspath(path))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        kind = "a link to a missing target" if os.path.islink(existing) and not os.path.exists(existing) else "a file"
        where = f"it is {kind}" if existing == path else f"{existing} is {kind}"
        raise MediaError(f"{what} {path}: cannot write outputs there: {where}, not a folder (give a folder path)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise MediaError(f"{what} {path}: cannot write outputs there: {existing} is not writable "
                         f"({exc.strerror or exc}); give a folder you can write to") from None


def check_input_file(path: str | os.PathLike, what: str) -> None:
    """Fail now when ``path`` is not a regular file this process can read (missing, a folder, a dangling
    link, no permission); reading what is in it is the reader's job.

    Raises:
        MediaError: naming ``what`` (``model.backbone.weights``), the path and the reason.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MediaError(f"{what}: {path} is a folder; expected a file")
    if not os.path.isfile(path):
        dangling = os.path.islink(path)
        reason = f"a link to {os.readlink(path)}, which does not exist" if dangling else "no such file"
        raise MediaError(f"{what}: {path}: {reason}")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise MediaError(f"{what}: {path}: cannot be read ({exc.strerror or exc})") from None


def _is_webcam(spec: str) -> bool:
    return str(spec).strip().isdigit()


def classify_input(spec: str | os.PathLike) -> str:
    """What an inference input names: ``"image"``, ``"folder"``, ``"video"`` or ``"webcam"``.

    A non-negative integer string (``"0"``) is a webcam index; an existing directory is a folder; a file
    with an image extension (jpg, jpeg, png, bmp, tif, tiff, webp) is an image; one with a video extension
    (mp4, avi, mov, mkv, webm, m4v, mpg, mpeg) is a video. Any other file is a video if OpenCV can open it.

    Raises:
        FileNotFoundError: the path does not exist.
        MediaError: a path that is not a regular file (a FIFO, a device), or a file of unknown type that OpenCV
            cannot open as a video.
    """
    if _is_webcam(spec):
        return "webcam"
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise FileNotFoundError(f"input not found: {spec}")
    if not path.is_file():  # a FIFO or a device: reading it would block or never end
        raise MediaError(f"{spec}: not a regular file, a folder or a webcam index (a FIFO or device?)")
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    with quiet_opencv():
        capture = cv2.VideoCapture(str(path))
        try:
            if capture.isOpened():
                return "video"
        finally:
            capture.release()
    raise MediaError(f"{spec}: not an image ({', '.join(IMAGE_EXTENSIONS)}), a video or a folder, and OpenCV "
                     f"cannot open it as a video")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files such as ``._x.jpg`` skipped).
    A symbolic link with an image name whose target is missing is listed too, so that reading it reports it
    as the unreadable file it is rather than its being skipped in silence.

    Raises:
        FileNotFoundError / NotADirectoryError: ``folder`` is missing or not a directory.
        MediaError: it holds no image files.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    paths = sorted(p for p in folder.iterdir()
                   if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise MediaError(f"{folder}: no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


class VideoSource:
    """RGB frames of a video file or webcam.

    Attributes:
        fps: frames per second (``DEFAULT_FPS`` with a warning when the container does not say).
        frame_count: frames in the file as the container reports it; 0 when unknown (webcams, streams).
        size: ``(width, height)`` of every frame.

    Iterating yields ``(H, W, 3) uint8`` RGB arrays until the video ends. Use as a context manager or
    call ``close()``.
    """

    def __init__(self, spec: str | os.PathLike):
        self.spec = str(spec)
        is_cam = _is_webcam(self.spec)
        what = f"webcam {self.spec}" if is_cam else self.spec
        if not is_cam and not Path(self.spec).is_file():
            raise FileNotFoundError(f"video not found: {self.spec}")
        with quiet_opencv():
            self.capture = cv2.VideoCapture(int(self.spec) if is_cam else self.spec)
        if not self.capture.isOpened():
            self.capture.release()
            raise MediaError(f"{what}: cannot be opened as a video")
        # Decode the first frame now so a corrupt file fails here, with its name, not mid-run.
        with quiet_opencv():
            ok, frame = self.capture.read()
        if not ok or frame is None:
            self.capture.release()
            raise MediaError(f"{what}: no decodable video frame (corrupt or unsupported video)")
        self._first: np.ndarray | None = frame
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        if not fps or not np.isfinite(fps) or fps <= 0:
            log.warning("%s: frame rate unknown, assuming %g fps", what, DEFAULT_FPS)
            fps = DEFAULT_FPS
        self.fps = float(fps)
        count = self.capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = 0 if is_cam or not np.isfinite(count) else max(0, int(count))
        self.size = (int(frame.shape[1]), int(frame.shape[0]))

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            frame, self._first = self._first, None
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        while True:
            with quiet_opencv():
                ok, frame = self.capture.read()
            if not ok or frame is None:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_video(spec: str | os.PathLike) -> VideoSource:
    """Open a video file or webcam index (``"0"``); see ``VideoSource``. Raises MediaError naming ``spec``."""
    return VideoSource(spec)


def _check_rgb(image: np.ndarray, what: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{what}: expected an (H, W, 3) uint8 RGB array, got {desc}")


class VideoSink:
    """Writes RGB frames of one ``size`` to a video at ``path``, atomically.

    The codec follows the extension (mp4/m4v/mov -> 'mp4v', avi/mkv -> 'MJPG'). Frames go to a temporary
    file beside ``path``, which replaces ``path`` only when the ``with`` block (or ``close()``) ends without
    error; on an exception the temporary file is removed and an existing ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]):
        self.path = str(path)
        self.size = (int(size[0]), int(size[1]))
        if self.size[0] <= 0 or self.size[1] <= 0:
            raise ValueError(f"{self.path}: video size {size} must be (width, height) > 0")
        if not fps or not np.isfinite(fps) or fps <= 0:
            raise ValueError(f"{self.path}: fps {fps!r} must be a positive number")
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in FOURCC:
            raise MediaError(f"{self.path}: cannot write a {ext or 'extensionless'} video; "
                             f"use one of {', '.join(FOURCC)}")
        self.frames = 0
        self._pending = PendingFile(self.path, ".tmp" + ext)  # the extension tells OpenCV the container
        with quiet_opencv():
            self._writer = cv2.VideoWriter(self._pending.path, cv2.VideoWriter_fourcc(*FOURCC[ext]), float(fps),
                                           self.size)
        if not self._writer.isOpened():
            self._writer.release()
            self._pending.discard()
            raise MediaError(f"{self.path}: OpenCV cannot write a {ext} video here")

    def write(self, frame_rgb: np.ndarray) -> None:
        """Append one ``(H, W, 3) uint8`` RGB frame of the sink's ``size``."""
        _check_rgb(frame_rgb, f"{self.path} frame {self.frames}")
        if (frame_rgb.shape[1], frame_rgb.shape[0]) != self.size:
            raise ValueError(f"{self.path} frame {self.frames}: size {frame_rgb.shape[1]}x{frame_rgb.shape[0]}, "
                             f"expected {self.size[0]}x{self.size[1]} (width x height)")
        self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        """Finish the file and move it onto ``path``."""
        self._writer.release()
        if self.frames == 0:
            self._pending.discard()
            raise MediaError(f"{self.path}: no frames were written; the video was not created")
        self._pending.commit()

    def abort(self) -> None:
        """Drop the partial file; ``path`` keeps whatever it held before."""
        self._writer.release()
        self._pending.discard()

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_image_atomic(path: str | os.PathLike, image_rgb: np.ndarray) -> None:
    """Encode an ``(H, W, 3) uint8`` RGB image by ``path``'s extension and write it atomically."""
    _check_rgb(image_rgb, str(path))
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise MediaError(f"{path}: cannot write an image as {ext or 'extensionless'}; "
                         f"use one of {', '.join(IMAGE_EXTENSIONS)}")
    try:
        ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:
        raise MediaError(f"{path}: OpenCV cannot encode {ext}: {exc}") from exc
    if not ok:
        raise MediaError(f"{path}: OpenCV cannot encode {ext}")
    write_bytes_atomic(path, buf.tobytes())
