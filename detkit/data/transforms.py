"""Training-time augmentation through albumentations (bounding-box aware).

The papers' only augmentation is the horizontal flip with probability 0.5
(Fast R-CNN Sec. 2.3, kept by Faster R-CNN); scale jitter (a zoom with the image size kept), crops that keep every
box whole, and photometric jitter are available from the config. Boxes that an
augmentation pushes outside the image are clipped by albumentations, and boxes
left without area are dropped together with their labels and per-box extras.
A pipeline built with ``seed`` gives the same sequence of augmentations every
time (albumentations 2.x keeps its own generators, independent of the global
ones), and ``set_seed`` makes one sample's augmentation a function of its seed,
which exact resuming relies on. Without a training augmentation the transform is
the identity.
"""
from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class DetectionAugment:
    """``(image (H, W, 3) uint8, boxes (N, 4) xyxy, labels (N,), extra: dict of (N,) arrays) -> same, augmented``.

    With no step enabled it is the identity and returns its inputs unchanged.
    """

    def __init__(self, hflip: float = 0.5, scale: tuple[float, float] | None = None, crop: float = 0.0,
                 color_jitter: float = 0.0, seed: int | None = None):
        self.pipeline = None
        if hflip <= 0 and scale is None and crop <= 0 and color_jitter <= 0:
            return  # the identity: no need to import albumentations
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
        self.pipeline = A.Compose(
            steps,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "index"], clip=True,
                                     min_area=0.0, min_visibility=0.0),
            seed=None if seed is None else int(seed) % (2**32),
        )

    def set_seed(self, seed: int) -> None:
        """Restart the pipeline's generators from ``seed``: the next call's draws depend only on it."""
        if self.pipeline is not None:
            self.pipeline.set_random_seed(int(seed) % (2**32))

    def __call__(self, image: np.ndarray, boxes, labels, extra: dict | None = None):
        extra = {k: np.asarray(v) for k, v in (extra or {}).items()}
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(labels, np.int64)
        if self.pipeline is None:
            return image, boxes, labels, extra
        # The box index travels as a label field, so per-box extras can follow the boxes albumentations keeps.
        out = self.pipeline(image=image, bboxes=boxes, labels=labels, index=np.arange(len(boxes)))
        kept = np.asarray(out["index"], np.int64)
        new_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        valid = (new_boxes[:, 2] > new_boxes[:, 0]) & (new_boxes[:, 3] > new_boxes[:, 1])
        kept, new_boxes = kept[valid], new_boxes[valid]
        return out["image"], new_boxes, labels[kept], {k: v[kept] for k, v in extra.items()}


def build_transform(train: bool, hflip: float = 0.5, scale: list[float] | None = None, crop: float = 0.0,
                    color_jitter: float = 0.0, seed: int | None = None) -> DetectionAugment:
    """The augmentation of ``data.augment`` for training, the identity for evaluation (``train=False``).

    hflip, crop, color_jitter: probabilities in [0, 1]; scale: ``[lo, hi]`` zoom range or None.
    seed: makes the sequence of augmentations reproducible (None: drawn from the OS).
    """
    for key, p in (("hflip", hflip), ("crop", crop), ("color_jitter", color_jitter)):
        if not 0 <= p <= 1:
            raise ValueError(f"data.augment.{key}={p}: expected a probability in [0, 1]")
    if scale is not None and (len(scale) != 2 or not 0 < scale[0] <= scale[1]):
        raise ValueError(f"data.augment.scale={scale}: expected [lo, hi] with 0 < lo <= hi")
    if not train:
        return DetectionAugment(hflip=0.0, seed=seed)
    return DetectionAugment(hflip, scale, crop, color_jitter, seed)


def collate(batch: list[tuple[np.ndarray, dict]]) -> tuple[list[np.ndarray], list[dict]]:
    """Samples ``(image, target)`` -> ``(list of images, list of targets)``: images differ in size, so they
    are not stacked (the detector pads them)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
