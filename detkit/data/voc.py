"""Pascal VOC datasets in the devkit layout (Everingham et al. 2010).

``root`` is a ``VOC2007``-style directory: ``Annotations/<id>.xml``,
``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<split>.txt``. VOC boxes are 1-based
inclusive pixel indices; pixel i covers the continuous interval [i-1, i], so a box
becomes ``(xmin - 1, ymin - 1, xmax, ymax)`` in detkit's continuous xyxy pixels.
``difficult`` objects are kept and flagged.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

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


class VOCDataset(DetectionDataset):
    def __init__(self, root: str, split: str = "trainval", classes: list[str] | None = None, transform=None,
                 skip_empty: bool = False, use_difficult: bool = True):
        split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(split_file):
            raise DatasetError(f"VOC split file not found: {split_file}")
        with open(split_file, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
        if not ids:
            raise DatasetError(f"{split_file}: the split lists no images")
        names = list(classes) if classes else list(VOC_CLASSES)
        label_of = {n: i + 1 for i, n in enumerate(names)}
        records = []
        for index, image_id in enumerate(ids):
            xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
            if not os.path.isfile(xml_path):
                raise DatasetError(f"{split_file}: line {index + 1}: annotation {xml_path} not found")
            try:
                tree = ET.parse(xml_path).getroot()
            except ET.ParseError as exc:
                raise DatasetError(f"{xml_path}: invalid XML ({exc})") from None
            size = tree.find("size")
            if size is None:
                raise DatasetError(f"{xml_path}: no <size>")
            width = int(float(_text(size, "width", xml_path, "<size>")))
            height = int(float(_text(size, "height", xml_path, "<size>")))
            filename = tree.findtext("filename") or f"{image_id}.jpg"
            boxes, labels, difficult = [], [], []
            for k, obj in enumerate(tree.findall("object")):
                where = f"object {k}"
                name = _text(obj, "name", xml_path, where)
                if name not in label_of:
                    raise DatasetError(f"{xml_path}: object {k} has class {name!r}, not in the class list "
                                       f"({', '.join(names)})")
                diff = obj.findtext("difficult")
                is_difficult = bool(int(diff)) if diff and diff.strip() else False
                if is_difficult and not use_difficult:
                    continue
                bnd = obj.find("bndbox")
                if bnd is None:
                    raise DatasetError(f"{xml_path}: {where} ({name}) has no <bndbox>")
                coords = [float(_text(bnd, t, xml_path, f"{where} ({name}) <bndbox>"))
                          for t in ("xmin", "ymin", "xmax", "ymax")]
                boxes.append([coords[0] - 1, coords[1] - 1, coords[2], coords[3]])
                labels.append(label_of[name])
                difficult.append(is_difficult)
            records.append(ImageRecord(
                id=index, file_name=os.path.join(root, "JPEGImages", filename), height=height, width=width,
                boxes=np.array(boxes, np.float32).reshape(-1, 4), labels=np.array(labels, np.int64),
                difficult=np.array(difficult, bool), iscrowd=np.zeros(len(labels), bool)))
        super().__init__(records, names, list(range(1, len(names) + 1)), split_file, transform, skip_empty)
