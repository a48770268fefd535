"""Pascal VOC datasets in the devkit layout (Everingham et al. 2010).

``root`` is a ``VOC2007``-style directory: ``Annotations/<id>.xml``,
``JPEGImages/<id>.jpg`` (or the XML's ``<filename>``) and
``ImageSets/Main/<split>.txt``. VOC boxes are 1-based inclusive pixel indices:
pixel i covers the continuous interval [i-1, i], so a box becomes
``(xmin - 1, ymin - 1, xmax, ymax)`` in detkit's continuous xyxy pixels, which
is what Detectron2's ``load_voc_instances`` does. ``difficult`` objects are kept
and flagged (the VOC metric ignores them; ``to_coco`` marks them as crowd), or
dropped with ``use_difficult=False``. Labels are 1..K in the order of
``classes`` and ``cat_ids`` is ``[1, ..., K]``.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import numpy as np

from detkit.data.dataset import DatasetError, DetectionDataset, ImageRecord

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _text(node, tag: str, xml_path: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{xml_path}: {where} has no <{tag}>")
    return child.text.strip()


def _number(node, tag: str, xml_path: str, where: str) -> float:
    text = _text(node, tag, xml_path, where)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml_path}: {where} <{tag}> is {text!r}, expected a number") from None


def _parse_annotation(xml_path: str, image_id: str, label_of: dict[str, int], use_difficult: bool):
    """One XML file -> ``(filename, height, width, boxes (N, 4) xyxy, labels (N,), difficult (N,))``."""
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: invalid XML ({exc})") from None
    size = tree.find("size")
    if size is None:
        raise DatasetError(f"{xml_path}: no <size>")
    width = int(_number(size, "width", xml_path, "<size>"))
    height = int(_number(size, "height", xml_path, "<size>"))
    if width <= 0 or height <= 0:
        raise DatasetError(f"{xml_path}: <size> is {width}x{height} (WxH), expected a positive width and height")
    filename = (tree.findtext("filename") or "").strip() or f"{image_id}.jpg"
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(tree.findall("object")):
        name = _text(obj, "name", xml_path, f"object {k}")
        if name not in label_of:
            raise DatasetError(f"{xml_path}: object {k} has class {name!r}, not in the class list "
                               f"({', '.join(label_of)})")
        where = f"object {k} ({name})"
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise DatasetError(f"{xml_path}: {where} <difficult> is {flag!r}, expected 0 or 1")
        if flag == "1" and not use_difficult:
            continue
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DatasetError(f"{xml_path}: {where} has no <bndbox>")
        x1, y1, x2, y2 = (_number(bnd, t, xml_path, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])
        labels.append(label_of[name])
        difficult.append(flag == "1")
    return (filename, height, width, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
            np.array(difficult, bool))


class VOCDataset(DetectionDataset):
    """The images listed in ``root/ImageSets/Main/<split>.txt`` with their ``Annotations/*.xml``.

    ``classes`` defaults to the 20 VOC classes. Raises DatasetError naming the file (and the object index
    and class) for a missing split file, an empty split, a missing annotation file, invalid XML, a missing
    or non-numeric field, or a class not in ``classes``. Image ids are the positions in the split, 1..N.
    """

    def __init__(self, root: str, split: str = "trainval", classes: list[str] | None = None, transform=None,
                 skip_empty: bool = False, use_difficult: bool = True):
        split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(split_file):
            raise DatasetError(f"VOC split file not found: {split_file}")
        with open(split_file, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
        if not ids:
            raise DatasetError(f"{split_file}: the split lists no images")
        names = list(classes) if classes is not None else list(VOC_CLASSES)
        if not names:
            raise DatasetError(f"{root}: the class list is empty")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DatasetError(f"{root}: classes {duplicates} appear more than once in the class list")
        label_of = {n: i + 1 for i, n in enumerate(names)}
        records = []
        for number, image_id in enumerate(ids, 1):
            xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
            if not os.path.isfile(xml_path):
                raise DatasetError(f"{split_file}: image {image_id!r}: annotation {xml_path} not found")
            filename, height, width, boxes, labels, difficult = _parse_annotation(xml_path, image_id, label_of,
                                                                                  use_difficult)
            records.append(ImageRecord(
                id=number, file_name=os.path.join(root, "JPEGImages", filename), height=height, width=width,
                boxes=boxes, labels=labels, difficult=difficult, iscrowd=np.zeros(len(labels), bool)))
        super().__init__(records, names, list(range(1, len(names) + 1)), split_file, transform, skip_empty)


#: a box the rounding to whole pixels moves by more than this (pixels) is counted as moved
ROUNDING_TOLERANCE = 1e-3


def annotation_xml(name: str, height: int, width: int, class_names: list[str], boxes: np.ndarray,
                   labels: np.ndarray, difficult: np.ndarray, extra: dict[str, str] | None = None
                   ) -> tuple[str, int, int]:
    """The ``Annotations/<id>.xml`` of one image (``boxes (N, 4)`` xyxy continuous pixels, ``labels (N,)`` in
    1..K) in VOC's 1-based whole-pixel indices, the inverse of this module's reading (``xmin - 1``); ``extra``:
    more elements under ``<annotation>`` (a tile's ``source_image``). Returns ``(xml, boxes written, boxes moved
    more than ROUNDING_TOLERANCE by the rounding)``; a box narrower or lower than a pixel once rounded is left
    out (not counted as written). The one VOC writer: ``data convert`` and ``data tile`` use it."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rounded = np.round(boxes)
    keep = (rounded[:, 2] > rounded[:, 0]) & (rounded[:, 3] > rounded[:, 1])
    moved = int((np.abs(rounded - boxes).max(axis=1, initial=0) > ROUNDING_TOLERANCE)[keep].sum())
    objects = "".join(
        f"  <object>\n    <name>{escape(class_names[int(label) - 1])}</name>\n    <difficult>{int(flag)}</difficult>\n"
        f"    <bndbox><xmin>{int(b[0]) + 1}</xmin><ymin>{int(b[1]) + 1}</ymin><xmax>{int(b[2])}</xmax>"
        f"<ymax>{int(b[3])}</ymax></bndbox>\n  </object>\n"
        for b, label, flag in zip(rounded[keep], np.asarray(labels)[keep], np.asarray(difficult, bool)[keep]))
    more = "".join(f"  <{key}>{escape(str(value))}</{key}>\n" for key, value in (extra or {}).items())
    xml = (f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(name)}</filename>\n{more}"
           f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n{objects}</annotation>\n")
    return xml, int(keep.sum()), moved
