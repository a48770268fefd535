"""Classification datasets: images with one class label each, for pretraining backbones (``detkit pretrain``).

Three built-in formats, registered by the core plugin (hook ``detkit_register_classification_datasets``;
``detkit list classification_datasets``):

- ``image_folder``: ``root/<class>/<image>``, one folder per class, classes in sorted folder order
  (torchvision's ``ImageFolder`` layout; ``detkit data synth-cls`` writes it);
- ``image_list``: a CSV (``image,label`` rows, a header line allowed) or JSON (a list of ``{"image",
  "label"}``, or ``{"classes": [...], "images": [...]}``) file of paths relative to ``root`` (default: the
  file's folder) and labels given as class names or as indices into ``classes``;
- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; real data that
  ships inside an installed dependency), each digit resized to 28x28 and padded to 32x32 as LeNet-5 saw
  MNIST (LeCun et al. 1998, Sec. III.A), split into train and test by a stratified, seeded draw.

Every dataset yields ``(image (H, W, 3) uint8 RGB, {"label": int})`` after its ``transform`` (which the
training stream seeds per sample through ``set_seed``), and answers ``image_info(index)`` and
``missing_image_files()`` as the detection datasets do, so the same loading code checks and skips images.
"""
from __future__ import annotations

import csv
import json
import os

import cv2
import numpy as np
import torch

from detkit.data.dataset import DatasetError
from detkit.data.images import read_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ClassificationDataset(torch.utils.data.Dataset):
    """``items``: ``(path, label)`` pairs, labels indexing ``class_names``; ``source``: what the items were read
    from (named in messages)."""

    def __init__(self, items: list[tuple[str, int]], class_names: list[str], source: str, transform=None):
        if not class_names:
            raise DatasetError(f"{source}: no classes")
        self.items = list(items)
        self.class_names = list(class_names)
        self.source = source
        self.transform = transform

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> np.ndarray:
        """The image at ``index``, untransformed (ImageReadError names the file)."""
        return read_image(self.items[index][0])

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, {"label": self.items[index][1]}

    def image_info(self, index: int) -> dict:
        return {"id": index, "file_name": self.items[index][0]}

    def missing_image_files(self) -> list[tuple[int, str, str]]:
        """``(index, path, reason)`` of each image file that does not exist or is empty."""
        missing = []
        for index, (path, _) in enumerate(self.items):
            try:
                if os.path.getsize(path) == 0:
                    missing.append((index, path, "empty file"))
            except OSError:
                missing.append((index, path, "not found"))
        return missing


def image_folder(root: str, transform=None) -> ClassificationDataset:
    """``root/<class>/<image>``: each subfolder is a class (sorted by name), each image file in it a sample."""
    if not os.path.isdir(root):
        raise DatasetError(f"image_folder: root {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"image_folder: {root} has no class folders (expected {root}/<class>/<image>)")
    items, empty = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            empty.append(name)
        items += [(os.path.join(folder, f), label) for f in files]
    if empty:
        raise DatasetError(f"image_folder: {root}: class folders without images ({', '.join(empty[:5])}"
                           f"{', ...' if len(empty) > 5 else ''}; image files end in {', '.join(IMAGE_EXTENSIONS)})")
    return ClassificationDataset(items, classes, root, transform)


def image_list(file: str, root: str | None = None, classes: list[str] | None = None,
               transform=None) -> ClassificationDataset:
    """A CSV or JSON list of ``(image, label)`` (see the module doc). ``classes``: the class names in label
    order (default: the JSON file's ``classes``, else the sorted distinct labels)."""
    if not os.path.isfile(file):
        raise DatasetError(f"image_list: file {file!r} not found")
    root = os.path.dirname(os.path.abspath(file)) if root is None else root
    rows, listed = _read_rows(file)
    classes = list(classes or listed or sorted({str(label) for _, label in rows}))
    index = {name: k for k, name in enumerate(classes)}
    items = []
    for line, (image, label) in enumerate(rows, 1):
        if str(label) in index:  # a class name (digits as names too: "3" is the class named "3")
            label_index = index[str(label)]
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
            label_index = label
        else:
            raise DatasetError(f"{file}: entry {line}: label {label!r} is not one of the {len(classes)} classes "
                               f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
        items.append((image if os.path.isabs(image) else os.path.join(root, image), label_index))
    if not items:
        raise DatasetError(f"{file}: no images listed")
    return ClassificationDataset(items, classes, file, transform)


def _read_rows(file: str) -> tuple[list[tuple[str, object]], list[str] | None]:
    """``[(image, label)]`` and the class list a JSON file gives (None for CSV)."""
    if file.lower().endswith(".json"):
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{file}: invalid JSON ({exc})") from None
        classes = data.get("classes") if isinstance(data, dict) else None
        entries = data.get("images") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) and {"image", "label"} <= set(e) for e in entries):
            raise DatasetError(f"{file}: expected a list of {{\"image\": path, \"label\": class}} entries "
                               f"(or {{\"classes\": [...], \"images\": [...]}})")
        return [(str(e["image"]), e["label"]) for e in entries], classes
    with open(file, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "label"]:
        rows = rows[1:]
    bad = next((n for n, r in enumerate(rows, 1) if len(r) < 2), None)
    if bad is not None:
        raise DatasetError(f"{file}: row {bad}: expected 'image,label'")
    return [(r[0].strip(), _int_or_name(r[1].strip())) for r in rows], None


def _int_or_name(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


class DigitsDataset(ClassificationDataset):
    """scikit-learn's handwritten digits (UCI optical recognition, 8x8, grey levels 0..16), in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str, transform=None):
        super().__init__([(f"digits[{i}]", int(y)) for i, y in enumerate(labels)], [str(d) for d in range(10)],
                         source, transform)
        self.images = images

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def missing_image_files(self) -> list:
        return []


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0, transform=None) -> DigitsDataset:
    """The bundled digits, ``split`` ``train`` or ``test`` of a stratified draw (``test_fraction`` held out,
    the same for a seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise DatasetError(f"digits: split={split!r}: expected 'train' or 'test'")
    if not 0 < test_fraction < 1:
        raise DatasetError(f"digits: test_fraction={test_fraction!r}: expected a number in (0, 1)")
    data = load_digits()
    order = np.arange(len(data.target))
    train, test = train_test_split(order, test_size=test_fraction, random_state=seed, stratify=data.target)
    chosen = np.sort(train if split == "train" else test)
    images = np.stack([_digit_image(data.images[i]) for i in chosen])
    return DigitsDataset(images, data.target[chosen], f"digits ({split}, seed {seed})", transform)


def _digit_image(grey: np.ndarray) -> np.ndarray:
    """8x8 grey levels 0..16 -> the digit at 28x28 in a 32x32 (H, W, 3) uint8 frame, white on black as MNIST."""
    digit = cv2.resize((grey * (255.0 / 16.0)).astype(np.float32), (28, 28), interpolation=cv2.INTER_CUBIC)
    frame = np.zeros((32, 32), np.float32)
    frame[2:30, 2:30] = digit
    return np.repeat(np.clip(frame, 0, 255).round().astype(np.uint8)[:, :, None], 3, axis=2)
