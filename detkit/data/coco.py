"""COCO-format datasets (Lin et al. 2014) through pycocotools.

Category ids need not be contiguous: they are sorted and mapped to labels 1..K;
``cat_ids`` maps back for results files. Boxes are converted from COCO's
``[x, y, width, height]`` to xyxy. Crowd regions (``iscrowd=1``) are kept for
the metric and left out of the training targets. The file is checked entry by
entry before pycocotools indexes it, so a bad entry is named instead of
surfacing later as a KeyError.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np

from detkit.data.dataset import DatasetError, DetectionDataset, ImageRecord


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_entries(path: str, data) -> None:
    """Raise DatasetError naming the first entry of a COCO dict that detkit cannot use."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO annotation file (expected a JSON object with an 'images' list)")
    for key in ("annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise DatasetError(f"{path}: images[{i}] has no integer 'id'")
        for key in ("file_name", "height", "width"):
            if key not in img:
                raise DatasetError(f"{path}: image {img['id']} (images[{i}]) has no {key!r}")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise DatasetError(f"{path}: image {img['id']} has file_name={img['file_name']!r}, expected a path "
                               f"relative to the images directory (a non-empty string)")
        for key in ("height", "width"):
            value = img[key]  # some exporters write 480.0: accept integral floats
            if not (_is_number(value) and value > 0 and float(value).is_integer()):
                raise DatasetError(f"{path}: image {img['id']} has {key}={value!r}, expected a positive integer")
        if img["id"] in image_ids:
            raise DatasetError(f"{path}: image id {img['id']!r} appears twice in 'images'")
        image_ids.add(img["id"])
    cat_ids, named = set(), {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise DatasetError(f"{path}: categories[{i}] has no integer 'id'")
        if cat["id"] in cat_ids:
            raise DatasetError(f"{path}: category id {cat['id']} appears twice in 'categories'")
        cat_ids.add(cat["id"])
        name = str(cat.get("name", cat["id"]))
        if name in named:  # one class would vanish from the model's names and from the per-class results
            raise DatasetError(f"{path}: categories {named[name]} and {cat['id']} are both named {name!r}; "
                               f"give each category its own name (or merge them into one id)")
        named[name] = cat["id"]
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{i}] is not an object")
        ref = f"annotation {ann['id']}" if "id" in ann else f"annotations[{i}]"
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{path}: {ref} refers to image id {ann.get('image_id')!r}, which is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise DatasetError(f"{path}: {ref} refers to category id {ann.get('category_id')!r}, "
                               f"which is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{path}: {ref}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):  # JSON readers take NaN and Infinity
            raise DatasetError(f"{path}: {ref}: 'bbox' must be finite numbers, got {bbox!r}")


def _load_coco(path: str):
    from pycocotools.coco import COCO

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from None
    if isinstance(data, dict):
        data.setdefault("annotations", [])
        data.setdefault("categories", [])
    _check_entries(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress we do not want
        coco.createIndex()
    return coco


class COCODataset(DetectionDataset):
    """A COCO json (``annotations``) with its images under ``images`` (``file_name`` is relative to it).

    Labels are ``1..K`` in the order of the sorted category ids (``cat_ids``). Raises DatasetError for a
    missing file or directory, invalid JSON, an annotation naming an unknown image or category id, a bbox
    that is not four finite numbers, two categories of one name, no categories, or an empty image list, and
    for a ``file_name`` outside ``images`` (``../``, an absolute path) unless ``allow_outside_images``.
    """

    def __init__(self, images: str, annotations: str, transform=None, skip_empty: bool = False,
                 allow_outside_images: bool = False):
        if not os.path.isfile(annotations):
            raise DatasetError(f"COCO annotation file not found: {annotations}")
        if not os.path.isdir(images):
            raise DatasetError(f"COCO images directory not found: {images} (for {annotations})")
        coco = _load_coco(annotations)
        if not coco.imgs:
            raise DatasetError(f"{annotations}: the dataset has no images ('images' is empty)")
        cat_ids = sorted(coco.getCatIds())
        if not cat_ids:
            raise DatasetError(f"{annotations}: no categories")
        label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
        names = [str(coco.cats[c].get("name", c)) for c in cat_ids]
        records, root = [], os.path.normpath(images)
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            file_name = os.path.normpath(os.path.join(images, info["file_name"]))
            if not allow_outside_images and not file_name.startswith(root + os.sep):
                raise DatasetError(f"{annotations}: image {image_id} has file_name {info['file_name']!r}, which lies "
                                   f"outside the images directory {images}; give paths inside it, or set "
                                   f"allow_outside_images: true in the dataset's section to read it anyway")
            anns = coco.imgToAnns.get(image_id, [])
            xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            records.append(ImageRecord(
                id=int(image_id), file_name=file_name, height=int(info["height"]),
                width=int(info["width"]), boxes=boxes,
                labels=np.array([label_of[a["category_id"]] for a in anns], np.int64),
                difficult=np.zeros(len(anns), bool),
                iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
                area=np.array([a["area"] if _is_number(a.get("area")) else np.nan for a in anns], np.float64)))
        super().__init__(records, names, cat_ids, annotations, transform, skip_empty)
