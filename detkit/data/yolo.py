"""YOLO-txt datasets in the layout Ultralytics uses (boxes as in Redmon et al. 2016, Sec. 2: a centre and a
size, normalised by the image's width and height).

A ``data.yaml`` names the classes (``names``: a list, or a mapping index -> name with the indices 0..K-1) and
the splits (``train``, ``val``, ``test``: a folder of images, a ``.txt`` file listing images, or a list of
those), relative to ``path`` (itself relative to the yaml's folder, or to the working directory; the yaml's
folder when left out). Each image ``.../images/<split>/<name>.<ext>`` has its labels in
``.../labels/<split>/<name>.txt`` (the last ``images`` folder of its path becomes ``labels``), one
``class cx cy w h`` line per object with ``class`` in 0..K-1 and the four numbers in [0, 1]; an image
without a label file has no objects. Labels are ``class + 1`` (1..K in ``names`` order) and ``cat_ids`` is
``[1, ..., K]``, as for VOC. Because the coordinates are normalised, each image's size is read from its
header (Pillow, nothing decoded). Pixel orientation is the stored one (EXIF rotation is not applied), as
:func:`detkit.data.images.read_image` reads the pixels.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import yaml

from detkit.config import read_yaml_file
from detkit.data.dataset import DatasetError, DetectionDataset, ImageRecord

log = logging.getLogger(__name__)

#: image files a split folder is searched for (those OpenCV decodes; others in the folder are not images)
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
#: a YOLO label line: ``class cx cy w h``
FIELDS = ("class", "cx", "cy", "w", "h")


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise DatasetError(f"YOLO data file not found: {path} (expected a data.yaml with 'names' and "
                           f"'train'/'val'/'test' entries)")
    data = read_yaml_file(path, DatasetError, "a YOLO data.yaml")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'names' and 'train'/'val'/'test' entries, got "
                           f"{type(data).__name__}")
    return data


def class_names(path: str, data: dict) -> list[str]:
    """The class names of a data.yaml's ``names`` (a list, or a mapping with the keys 0..K-1), checked against
    ``nc`` when it is given; DatasetError naming the key otherwise."""
    names = data.get("names")
    if isinstance(names, dict):
        keys = list(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            raise DatasetError(f"{path}: 'names' keys must be the class indices 0..K-1, got {keys[:5]!r}")
        missing = sorted(set(range(len(keys))) - set(keys))
        if missing:
            raise DatasetError(f"{path}: 'names' has {len(keys)} entries but no index {missing[0]}; expected the "
                               f"indices 0..{len(keys) - 1}, each once")
        names = [names[k] for k in range(len(keys))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list of class names or a mapping "
                           f"index -> name, got {names!r}")
    if not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
        raise DatasetError(f"{path}: 'names' must be strings, got {names!r}")
    names = [str(n) for n in names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # one class would vanish from the model's names and the per-class results
        raise DatasetError(f"{path}: 'names' lists {duplicates} more than once; give each class its own name")
    nc = data.get("nc")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{path}: 'nc' is {nc!r} but 'names' has {len(names)} entries; they must agree")
    return names


def _root(path: str, data: dict) -> str:
    """The folder the split entries are relative to: ``path`` (relative to the yaml's folder, else to the
    working directory), or the yaml's folder."""
    here = os.path.dirname(os.path.abspath(path))
    given = data.get("path")
    if given is None or given == "":
        return here
    if not isinstance(given, str):
        raise DatasetError(f"{path}: 'path' must be a folder, got {given!r}")
    if os.path.isabs(given):
        candidates = [given]
    else:
        candidates = [os.path.join(here, given), os.path.abspath(given)]
    for folder in candidates:
        if os.path.isdir(folder):
            return os.path.normpath(folder)
    raise DatasetError(f"{path}: 'path' is {given!r}, which is no folder (tried {' and '.join(candidates)}); "
                       f"expected the dataset's root folder, relative to the yaml's folder or absolute")


def _list_folder(folder: str) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _list_file(path: str, list_file: str) -> list[str]:
    """The images a ``.txt`` list names (one a line; relative ones relative to the list's folder)."""
    here = os.path.dirname(list_file)
    images = []
    with open(list_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            image = os.path.normpath(name if os.path.isabs(name) else os.path.join(here, name))
            if not os.path.isfile(image):
                raise DatasetError(f"{list_file}: line {number}: image {name!r} not found ({image}); expected the "
                                   f"path of an image file, relative to the list's folder or absolute (listed by "
                                   f"{path})")
            images.append(image)
    return images


def split_images(path: str, data: dict, split: str) -> list[str]:
    """The image files of ``split`` in the data.yaml at ``path`` (``data``, already read), in order: each
    folder's images sorted (subfolders included), each list file's in its order."""
    if not isinstance(split, str) or not split:
        raise DatasetError(f"{path}: split {split!r}: expected a name such as 'train'")
    entry = data.get(split)
    if entry is None:
        present = [k for k in data if k not in ("path", "names", "nc", "download") and data[k] is not None
                   and isinstance(data[k], (str, list))]
        raise DatasetError(f"{path}: no {split!r} split (it has {', '.join(present) or 'none'}); choose one of "
                           f"those (split: NAME in the config, --split NAME on the command line)")
    entries = entry if isinstance(entry, list) else [entry]
    root = _root(path, data)
    images = []
    for item in entries:
        if not isinstance(item, str) or not item:
            raise DatasetError(f"{path}: '{split}' has {item!r}; expected a folder of images or a .txt list of "
                               f"images, relative to the dataset root {root}")
        where = os.path.normpath(item if os.path.isabs(item) else os.path.join(root, item))
        if os.path.isdir(where):
            images += _list_folder(where)
        elif os.path.isfile(where) and where.endswith(".txt"):
            images += _list_file(path, where)
        else:
            raise DatasetError(f"{path}: '{split}' names {item!r}, which is neither a folder nor a .txt list "
                               f"({where} not found); expected it relative to the dataset root {root}")
    if not images:
        raise DatasetError(f"{path}: the {split!r} split ({', '.join(map(str, entries))}) holds no images "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
    return images


def label_path(image: str) -> str:
    """The label file of ``image``: the last ``images`` folder of its path becomes ``labels`` and the extension
    ``.txt`` (Ultralytics' rule; an image under no ``images`` folder has its labels beside it)."""
    head, sep, tail = image.rpartition(f"{os.sep}images{os.sep}")
    moved = f"{head}{os.sep}labels{os.sep}{tail}" if sep else image
    return os.path.splitext(moved)[0] + ".txt"


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the image at ``path`` from its header (Pillow; no pixels decoded); DatasetError
    naming the file when it has none Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            raise DatasetError(f"{path}: empty image file; the normalised YOLO boxes need the image's size")
        with Image.open(path) as header:
            width, height = header.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the image size from its header ({exc}); the normalised YOLO "
                           f"boxes need it: expected an image file ({', '.join(IMAGE_EXTENSIONS)})") from None
    if width <= 0 or height <= 0:
        raise DatasetError(f"{path}: the header gives a {width}x{height} (WxH) image; expected a positive size")
    return height, width


def _class_index(text: str, where: str, num_classes: int) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise DatasetError(f"{where}: class {text!r} is not an integer; expected a class index 0..{num_classes - 1}")
    if not 0 <= value < num_classes:
        raise DatasetError(f"{where}: class {int(value)} is out of range; expected 0..{num_classes - 1} "
                           f"(the {num_classes} names of the data.yaml)")
    return int(value)


def _coordinate(text: str, key: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where}: {key} is {text!r}; expected a number in [0, 1]") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {key} is {text!r}; expected a finite number in [0, 1]")
    if key in ("w", "h") and value <= 0:
        raise DatasetError(f"{where}: {key} is {value:g}; expected a positive {'width' if key == 'w' else 'height'} "
                           f"in (0, 1]")
    if not 0.0 <= value <= 1.0:
        raise DatasetError(f"{where}: {key} is {value:g}, outside [0, 1]; expected coordinates normalised by the "
                           f"image's width and height (pixel coordinates must be divided by them)")
    return value


def read_labels(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The label file at ``path``: ``(classes (N,) int64 in 0..K-1, cxcywh (N, 4) float64 in [0, 1],
    duplicates)``, a line repeated in the file kept once and counted in ``duplicates``. DatasetError naming the
    file, the line number and what was expected for a line that is not ``class cx cy w h``."""
    classes, boxes, seen = [], [], set()
    duplicates = 0
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); expected 'class cx cy w h' lines") from None
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {number}"
        if len(fields) != len(FIELDS):
            more = ("; a segmentation polygon or keypoints? detkit reads boxes only" if len(fields) > len(FIELDS)
                    else "")
            raise DatasetError(f"{where}: {len(fields)} fields ({line.strip()!r}); expected {len(FIELDS)}: "
                               f"{' '.join(FIELDS)}, the four normalised to [0, 1]{more}")
        key = tuple(fields)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        classes.append(_class_index(fields[0], where, num_classes))
        boxes.append([_coordinate(text, name, where) for text, name in zip(fields[1:], FIELDS[1:])])
    return np.array(classes, np.int64), np.array(boxes, np.float64).reshape(-1, 4), duplicates


def cxcywh_to_xyxy(cxcywh: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised ``(N, 4)`` centre-size boxes as ``(N, 4)`` xyxy pixels (float64)."""
    b = np.asarray(cxcywh, np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], np.float64)
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1) * scale


def xyxy_to_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(N, 4)`` xyxy pixels as normalised centre-size boxes (float64), the inverse of :func:`cxcywh_to_xyxy`."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], np.float64)
    return np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1) / scale


def label_text(classes: np.ndarray, cxcywh: np.ndarray) -> str:
    """The label file of one image: a ``class cx cy w h`` line per box (``classes`` 0-based; nine significant
    digits, a ten-thousandth of a pixel on a 10,000 px image)."""
    return "".join(f"{int(c)} {' '.join(f'{v:.9g}' for v in box)}\n" for c, box in zip(classes, cxcywh))


def data_yaml_text(names: list[str], splits: dict[str, str], comment: str = "") -> str:
    """A data.yaml naming ``names`` (as index -> name) and each split's image folder (relative to the yaml's
    folder, which is the dataset root when ``path`` is left out)."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    body = yaml.safe_dump({**splits, "nc": len(names), "names": dict(enumerate(names))}, sort_keys=False,
                          allow_unicode=True)
    return head + body


def _orphan_labels(images: list[str], expected: set[str]) -> tuple[int, int, str | None]:
    """Label files under the label folders of ``images`` that belong to no image: ``(orphans, label files,
    the first orphan)``."""
    folders = {os.path.dirname(p) for p in expected}
    orphans, total, first = 0, 0, None
    for folder in sorted(folders):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".txt"):
                continue
            total += 1
            label = os.path.join(folder, name)
            if label not in expected:
                orphans += 1
                first = first or label
    return orphans, total, first


class YOLODataset(DetectionDataset):
    """The images of one split of a YOLO ``data.yaml`` with their ``labels/*.txt``.

    Image ids are the positions in the split, 1..N (images sorted by path within each folder). Raises
    DatasetError naming the file (and the line, for a label) for a missing or invalid data.yaml, bad ``names``,
    a split the yaml does not have or with no images, an image whose header gives no size, and a label line
    that is not ``class cx cy w h``: a wrong number of fields, a class that is not an integer in 0..K-1, a
    coordinate that is not a finite number in [0, 1], a width or height that is not positive. These are
    refused, not dropped: a YOLO writer never produces them, so the file is wrong. A box that reaches past the
    image is clipped to it, and one left without area is dropped, both counted in the log (as COCO's
    degenerate boxes are: :class:`DetectionDataset`). A label line repeated in one file is kept once, counted in
    the log; so are label files that belong to no image, and a split whose images have no label file at all.
    """

    def __init__(self, data: str, split: str = "train", transform=None, skip_empty: bool = False):
        spec = _load_yaml(data)
        names = class_names(data, spec)
        images = split_images(data, spec, split)
        records, duplicates, labelled = [], 0, 0
        expected = set()
        for number, image in enumerate(images, 1):
            height, width = image_size(image)
            label = label_path(image)
            expected.add(label)
            classes, boxes = np.zeros(0, np.int64), np.zeros((0, 4))
            if os.path.isfile(label):
                labelled += 1
                classes, boxes, repeated = read_labels(label, len(names))
                duplicates += repeated
            records.append(ImageRecord(
                id=number, file_name=image, height=height, width=width,
                boxes=cxcywh_to_xyxy(boxes, height, width).astype(np.float32), labels=classes + 1,
                difficult=np.zeros(len(classes), bool), iscrowd=np.zeros(len(classes), bool)))
        source = f"{data} ({split})"
        if duplicates:
            log.warning("%s: %d repeated label lines kept once", source, duplicates)
        if not labelled:
            log.warning("%s: none of the %d images has a label file (looked for %s, ...): every image is "
                        "background", source, len(images), label_path(images[0]))
        orphans, total, first = _orphan_labels(images, expected)
        if orphans:
            log.warning("%s: %d of the %d label files belong to no image of the split (%s, ...)", source, orphans,
                        total, first)
        super().__init__(records, names, list(range(1, len(names) + 1)), source, transform, skip_empty)
        self.data_file, self.split = data, split
