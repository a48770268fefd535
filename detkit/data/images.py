"""Reading images robustly: any path, any channel layout, clear errors.

Every image enters detkit as ``(H, W, 3)`` uint8 RGB. Grayscale images are
replicated to three channels, 16-bit images scaled to 8 bits, and an alpha
channel is dropped (the colour channels are kept as stored, not composited on
a background: detection datasets have no transparent objects, and compositing
would invent a background colour). The file is read with ``np.fromfile`` and
decoded with ``cv2.imdecode``, so paths with non-ASCII characters work on every
platform.
"""
from __future__ import annotations

import io
import os

import cv2
import numpy as np

#: pixels one image may decode to, unless DETKIT_MAX_IMAGE_PIXELS says otherwise: a large aerial tile (10k x 10k).
#: The header is read first, so a small file that claims billions of pixels is refused before any decoding.
MAX_IMAGE_PIXELS = 100_000_000


class ImageReadError(ValueError):
    """An image that is missing, unreadable or empty; the message names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as ``(H, W, 3)`` uint8 RGB.

    Grayscale is replicated to three channels, 16-bit is scaled to 8 bits (``/ 257``), other depths are
    min-max stretched, and an alpha channel is dropped without compositing. Raises ImageReadError (naming
    the path and the reason) for a missing, empty, undecodable or zero-size image, a path that is not a
    regular file, and an image whose header gives more pixels than :func:`max_image_pixels`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.exists(path):  # a FIFO would block the read forever, a device never ends
            raise ImageReadError(f"{path}: not a regular file (a folder, FIFO or device); expected an image file")
        raise ImageReadError(f"{path}: image file not found")
    try:
        data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    _check_pixels(path, data)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # a few decoders raise on truncated data instead of returning None
        raise ImageReadError(f"{path}: not a decodable image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: not a decodable image (corrupt or unsupported format)")
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise ImageReadError(f"{path}: unsupported number of channels ({channels})")


def max_image_pixels() -> int:
    """The decoded-pixel limit: ``DETKIT_MAX_IMAGE_PIXELS`` when set (a positive integer), else
    :data:`MAX_IMAGE_PIXELS`."""
    given = os.environ.get("DETKIT_MAX_IMAGE_PIXELS")
    if given is None:
        return MAX_IMAGE_PIXELS
    try:
        value = int(given)
    except ValueError:
        value = 0
    if value < 1:
        raise ImageReadError(f"DETKIT_MAX_IMAGE_PIXELS={given!r}: expected a positive integer (pixels)")
    return value


def _check_pixels(path: str, data: np.ndarray) -> None:
    """ImageReadError when the header of the encoded image ``data`` gives more pixels than
    :func:`max_image_pixels` (Pillow reads the header without decoding; a format Pillow does not know is left
    to OpenCV)."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # detkit's own limit applies, below, whatever Pillow's warning threshold
    try:
        with Image.open(io.BytesIO(data.tobytes())) as header:
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError):
        return
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageReadError(f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} MP), more than the "
                             f"{limit / 1e6:g} MP one image may decode to; if this machine has the memory (3 bytes "
                             f"a pixel to decode, several times that to process), raise DETKIT_MAX_IMAGE_PIXELS "
                             f"and detect it with --tile, which runs the network on windows at native resolution")


def to_chw_tensor(image: np.ndarray, device=None):
    """An ``(H, W, 3)`` uint8 image as the ``(3, H, W)`` uint8 tensor detectors take (on ``device``)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return tensor if device is None else tensor.to(device)


def to_hwc_uint8(image) -> np.ndarray:
    """A ``(3, H, W)`` uint8 (or [0, 1] float) tensor as an ``(H, W, 3)`` uint8 array on the host."""
    import torch

    arr = image.detach().cpu()
    if arr.dtype != torch.uint8:
        arr = (arr.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(arr.permute(1, 2, 0).numpy())
