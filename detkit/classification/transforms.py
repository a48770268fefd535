"""Classification augmentation and test-time crops, on ``(H, W, 3)`` uint8 RGB arrays (OpenCV resizing).

The papers' augmentations that their text defines (``data.augment``):

- ``resized``: a crop of a random fraction of the image area in ``area`` and aspect ratio in ``ratio``
  (log-uniform), resized to the input (GoogLeNet Sec. 6: "8% and 100% of the image area ... aspect ratio
  between 3/4 and 4/3"; the "scale augmentation" of torchvision's ImageNet recipes);
- ``scale_jitter``: the shorter side resized to S drawn from ``scale_jitter`` x the input side, then a random
  input-sized crop (VGG Sec. 3.1: S in [256, 512] for 224 crops; ResNet Sec. 3.4: [256, 480]);
- ``center``: no random crop (the test-time resize and centre crop);

then a horizontal flip with probability ``hflip`` (AlexNet Sec. 4.1) and, with ``color_jitter`` s > 0,
brightness, contrast and saturation each scaled by a factor drawn from [1 - s, 1 + s] (a simple form of
AlexNet's and GoogLeNet's photometric distortions). Testing resizes the shorter side to ``test_resize`` x
the input side and takes the centre crop, or the 10 crops of AlexNet Sec. 4.1 / GoogLeNet Sec. 7 (four
corners and centre, and their mirror images).

Each sample's draws come from its own generator, seeded by :meth:`ClassifierAugment.set_seed` with the sample's
stream position: exact resuming relies on it, as in detection.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

CROPS = ("resized", "scale_jitter", "center")


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area interpolation when shrinking (no aliasing), bilinear when enlarging."""
    shrink = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_shorter(image: np.ndarray, side: float) -> np.ndarray:
    h, w = image.shape[:2]
    scale = side / min(h, w)
    return resize(image, max(1, round(w * scale)), max(1, round(h * scale)))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` window (an image smaller than that is resized up first)."""
    if min(image.shape[:2]) < size:
        image = resize_shorter(image, size)
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def test_view(image: np.ndarray, size: int, test_resize: float) -> np.ndarray:
    """The single test view: the shorter side to ``test_resize * size``, then the centre crop."""
    return center_crop(resize_shorter(image, test_resize * size), size)


def ten_crops(image: np.ndarray, size: int, test_resize: float) -> np.ndarray:
    """``(10, size, size, 3)``: the four corners and the centre of the resized image, and their mirrors."""
    image = resize_shorter(image, max(test_resize * size, size))
    h, w = image.shape[:2]
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = [image[t:t + size, left:left + size] for t, left in corners]
    return np.stack(crops + [c[:, ::-1] for c in crops])


class ClassifierAugment:
    """``image (H, W, 3) uint8 -> (size, size, 3) uint8``, training (random, from ``augment``) or test
    (``augment`` None: :func:`test_view`)."""

    def __init__(self, size: int, augment=None, test_resize: float = 256 / 224, seed: int = 0):
        self.size = size
        self.augment = augment
        self.test_resize = augment.test_resize if augment is not None else test_resize
        self.rng = np.random.default_rng(seed)
        if augment is not None:
            check_augment(augment)

    def set_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        aug = self.augment
        if aug is None:
            return np.ascontiguousarray(test_view(image, self.size, self.test_resize))
        if aug.crop == "resized":
            image = self._resized_crop(image)
        elif aug.crop == "scale_jitter":
            side = self.rng.uniform(*aug.scale_jitter) * self.size
            image = self._random_window(resize_shorter(image, side))
        else:
            image = test_view(image, self.size, self.test_resize)
        if self.rng.random() < aug.hflip:
            image = image[:, ::-1]
        if aug.color_jitter > 0:
            image = self._colour(image, aug.color_jitter)
        return np.ascontiguousarray(image)

    def _random_window(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        top = int(self.rng.integers(0, h - self.size + 1))
        left = int(self.rng.integers(0, w - self.size + 1))
        return image[top:top + self.size, left:left + self.size]

    def _resized_crop(self, image: np.ndarray) -> np.ndarray:
        """torchvision's RandomResizedCrop sampling: up to 10 draws of (area, ratio) that fit, else the
        central crop of the nearest allowed ratio."""
        h, w = image.shape[:2]
        area_lo, area_hi = self.augment.area
        log_lo, log_hi = (math.log(r) for r in self.augment.ratio)
        for _ in range(10):
            area = h * w * self.rng.uniform(area_lo, area_hi)
            ratio = math.exp(self.rng.uniform(log_lo, log_hi))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(self.rng.integers(0, h - ch + 1)), int(self.rng.integers(0, w - cw + 1))
                return resize(image[top:top + ch, left:left + cw], self.size, self.size)
        ratio = min(max(w / h, math.exp(log_lo)), math.exp(log_hi))
        cw, ch = (w, round(w / ratio)) if w / h < ratio else (round(h * ratio), h)
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
        return resize(image[top:top + ch, left:left + cw], self.size, self.size)

    def _colour(self, image: np.ndarray, strength: float) -> np.ndarray:
        brightness, contrast, saturation = self.rng.uniform(1 - strength, 1 + strength, 3)
        x = image.astype(np.float32) * brightness
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = (x - grey.mean()) * contrast + grey.mean()
        grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[:, :, None]
        x = (x - grey) * saturation + grey
        return np.clip(x, 0, 255).round().astype(np.uint8)


def check_augment(aug) -> None:
    """ValueError naming the ``data.augment`` key whose value cannot work."""
    if aug.crop not in CROPS:
        raise ValueError(f"data.augment.crop={aug.crop!r}: expected one of {', '.join(CROPS)}")
    for key in ("area", "ratio", "scale_jitter"):
        pair = getattr(aug, key)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ValueError(f"data.augment.{key}={pair}: expected [lo, hi] with lo <= hi")
