"""Training-time augmentation through albumentations (bounding-box aware).

The papers' augmentation is the horizontal flip (Faster R-CNN Sec. 4: "flipped
images"); scale jitter (a zoom with the image size kept), crops that keep every
box whole, and photometric jitter are available from the config. Boxes that an
augmentation pushes outside the image are clipped by albumentations, and boxes
left without area are dropped together with their labels and per-box extras.
``set_seed`` makes a sample's augmentation a function of its seed, which exact
resuming relies on.
"""
from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class DetectionAugment:
    """``(image, boxes (N, 4), labels (N,), extra: dict of (N,) arrays) -> same, augmented``."""

    def __init__(self, hflip: float = 0.5, scale: tuple[float, float] | None = None, crop: float = 0.0,
                 color_jitter: float = 0.0):
        import albumentations as A

        steps = []
        if crop > 0:
            steps.append(A.BBoxSafeRandomCrop(erosion_rate=0.0, p=crop))
        if scale is not None:
            steps.append(A.Affine(scale=tuple(scale), keep_ratio=True, p=1.0))
        if hflip > 0:
            steps.append(A.HorizontalFlip(p=hflip))
        if color_jitter > 0:
            steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=color_jitter))
        self.pipeline = None
        if steps:
            self.pipeline = A.Compose(
                steps,
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "index"], clip=True,
                                         min_area=0.0, min_visibility=0.0),
            )

    def set_seed(self, seed: int) -> None:
        if self.pipeline is not None:
            self.pipeline.set_random_seed(int(seed) % (2**32))

    def __call__(self, image: np.ndarray, boxes, labels, extra: dict | None = None):
        extra = dict(extra or {})
        if self.pipeline is None:
            return image, boxes, labels, extra
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = self.pipeline(image=image, bboxes=boxes, labels=np.asarray(labels, np.int64),
                            index=np.arange(len(boxes)))
        kept = np.asarray(out["index"], np.int64)
        new_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        valid = (new_boxes[:, 2] > new_boxes[:, 0]) & (new_boxes[:, 3] > new_boxes[:, 1])
        kept, new_boxes = kept[valid], new_boxes[valid]
        extra = {k: np.asarray(v)[kept] for k, v in extra.items()}
        return out["image"], new_boxes, np.asarray(labels, np.int64)[kept], extra


def build_transform(train: bool, hflip: float = 0.5, scale: list[float] | None = None, crop: float = 0.0,
                    color_jitter: float = 0.0):
    """The augmentation of ``data.augment`` for training; None (no augmentation) for evaluation."""
    for key, p in (("hflip", hflip), ("crop", crop), ("color_jitter", color_jitter)):
        if not 0 <= p <= 1:
            raise ValueError(f"data.augment.{key}={p}: expected a probability in [0, 1]")
    if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1]):
        raise ValueError(f"data.augment.scale={scale}: expected [lo, hi] with 0 < lo <= hi")
    if not train or (hflip <= 0 and scale is None and crop <= 0 and color_jitter <= 0):
        return None
    return DetectionAugment(hflip, scale, crop, color_jitter)


def collate(batch):
    """Samples ``(image, target)`` -> ``(list of images, list of targets)``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
