"""COCO-format datasets (Lin et al. 2014) through pycocotools.

Category ids need not be contiguous: they are sorted and mapped to labels 1..K;
``cat_ids`` maps back for results files. Boxes are converted from xywh to xyxy.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np

from detkit.data.dataset import DatasetError, DetectionDataset, ImageRecord


def _load_coco(path: str):
    from pycocotools.coco import COCO

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO annotation file (no 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    for key in ("annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    image_ids = {img.get("id") for img in data["images"]}
    cat_ids = {c.get("id") for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        ref = f"annotation {ann.get('id', f'#{i}')}"
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{path}: {ref} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise DatasetError(f"{path}: {ref} refers to category id {ann.get('category_id')!r}, "
                               f"which is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise DatasetError(f"{path}: {ref}: 'bbox' must be [x, y, width, height], got {bbox!r}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODataset(DetectionDataset):
    def __init__(self, images: str, annotations: str, transform=None, skip_empty: bool = False):
        if not os.path.isfile(annotations):
            raise DatasetError(f"COCO annotation file not found: {annotations}")
        if not os.path.isdir(images):
            raise DatasetError(f"COCO images directory not found: {images} (for {annotations})")
        coco = _load_coco(annotations)
        cat_ids = sorted(coco.getCatIds())
        if not cat_ids:
            raise DatasetError(f"{annotations}: no categories")
        label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
        names = [coco.cats[c].get("name", str(c)) for c in cat_ids]
        records = []
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            for key in ("file_name", "height", "width"):
                if key not in info:
                    raise DatasetError(f"{annotations}: image {image_id} has no {key!r}")
            anns = coco.imgToAnns.get(image_id, [])
            xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            records.append(ImageRecord(
                id=int(image_id), file_name=os.path.join(images, info["file_name"]), height=int(info["height"]),
                width=int(info["width"]), boxes=boxes,
                labels=np.array([label_of[a["category_id"]] for a in anns], np.int64),
                difficult=np.zeros(len(anns), bool),
                iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)))
        super().__init__(records, names, cat_ids, annotations, transform, skip_empty)
