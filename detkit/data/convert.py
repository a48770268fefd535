"""Converting a detection dataset between the COCO, Pascal VOC and YOLO layouts (``detkit data convert``).

Any dataset detkit reads (its boxes already sanitised: clipped to the image, degenerate ones dropped) is
written in one of the three layouts, its images hard-linked where the file system allows (else copied) under
names made unique by their stem. COCO: ``images/`` and ``annotations.json``, the ground truth
``DetectionDataset.to_coco`` gives (the category ids and the segment areas of the source; a VOC ``difficult``
object becomes a crowd region). VOC: ``JPEGImages/``, ``Annotations/<stem>.xml`` and
``ImageSets/Main/<split>.txt``, boxes in VOC's 1-based inclusive pixel indices (detkit's continuous
``(x1, y1, x2, y2)`` is written ``(x1 + 1, y1 + 1, x2, y2)``, rounded to whole pixels, the inverse of
``detkit.data.voc``), crowd regions as difficult objects. YOLO: ``images/<split>/``, ``labels/<split>/<stem>.txt``
and a ``data.yaml``, boxes normalised by the size in the image's header; YOLO has no flag for crowd regions or
difficult objects, so those are left out (as Ultralytics' own VOC conversion leaves difficult objects out) and
counted. The dataset is written into a hidden folder beside the output and renamed onto it when complete.
"""
from __future__ import annotations

import os
import shutil
import uuid

import numpy as np

from detkit.config import ConfigError
from detkit.data.dataset import sanitize_boxes
from detkit.data.voc import annotation_xml
from detkit.data.yolo import data_yaml_text, image_size, label_text, xyxy_to_cxcywh
from detkit.engine.files import atomic_path, replace_directory, write_json_atomic, write_text_atomic

FORMATS = ("coco", "voc", "yolo")
#: the split a format's reader reads when none is named (COCO files hold one split and name none)
DEFAULT_SPLIT = {"coco": None, "voc": "trainval", "yolo": "train"}
#: a box moved further than this by VOC's whole-pixel rounding is counted


def output_names(dataset) -> list[str]:
    """A file name for each image of ``dataset``: its own base name, or ``<stem>-<image id><ext>`` when an
    earlier image has its stem (compared without case, as some file systems do; label and XML files are named
    by the stem)."""
    names, used = [], set()
    for index in range(len(dataset)):
        info = dataset.image_info(index)
        stem, ext = os.path.splitext(os.path.basename(info["file_name"]))
        candidate, k = stem, 1
        while candidate.lower() in used:
            candidate = f"{stem}-{info['id']}" if k == 1 else f"{stem}-{info['id']}-{k}"
            k += 1
        used.add(candidate.lower())
        names.append(candidate + ext)
    return names


def place_image(source: str, target: str, copy: bool) -> bool:
    """Put the image ``source`` at ``target``: a hard link unless ``copy`` or the file system refuses one (another
    device, no links), else a copy written atomically. Returns whether it was linked."""
    if not copy:
        try:
            os.link(source, target)
            return True
        except OSError:
            pass
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return False


def _write_coco(dataset, root: str, names: list[str], counts: dict) -> None:
    coco = dataset.to_coco()
    for entry, name in zip(coco["images"], names):  # to_coco lists the images in index order
        entry["file_name"] = name
    counts["boxes"] = len(coco["annotations"])
    write_json_atomic(os.path.join(root, "annotations.json"), coco)


def _write_voc(dataset, root: str, names: list[str], split: str, counts: dict) -> None:
    for sub in ("Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub))
    stems = []
    for index, name in enumerate(names):
        info, ann = dataset.image_info(index), dataset.annotations(index)
        flagged = np.asarray(ann["iscrowd"], bool) | np.asarray(ann["difficult"], bool)
        xml, written, moved = annotation_xml(name, info["height"], info["width"], dataset.class_names, ann["boxes"],
                                             ann["labels"], flagged)
        stem = os.path.splitext(name)[0]
        write_text_atomic(os.path.join(root, "Annotations", stem + ".xml"), xml)
        counts["boxes"] += written
        counts["dropped"] += len(ann["boxes"]) - written
        counts["rounded"] += moved
        stems.append(stem)
    write_text_atomic(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "".join(s + "\n" for s in stems))


def _write_yolo(dataset, root: str, names: list[str], split: str, counts: dict, comment: str) -> None:
    labels_dir = os.path.join(root, "labels", split)
    os.makedirs(labels_dir)
    for index, name in enumerate(names):
        info, ann = dataset.image_info(index), dataset.annotations(index)
        # The normalised boxes are read back against the header's size, so they are written against it too: an
        # image of another size than its annotations say has its boxes clipped to it, as training does.
        height, width = image_size(info["file_name"])
        counts["resized"] += (height, width) != (info["height"], info["width"])
        flagged = np.asarray(ann["iscrowd"], bool) | np.asarray(ann["difficult"], bool)
        counts["left_out"] += int(flagged.sum())
        boxes, _, keep = sanitize_boxes(np.asarray(ann["boxes"])[~flagged], height, width)
        counts["dropped"] += int((~keep).sum())
        labels = np.asarray(ann["labels"], np.int64)[~flagged][keep]
        counts["boxes"] += len(labels)
        write_text_atomic(os.path.join(labels_dir, os.path.splitext(name)[0] + ".txt"),
                          label_text(labels - 1, xyxy_to_cxcywh(boxes[keep], height, width)))
    write_text_atomic(os.path.join(root, "data.yaml"),
                      data_yaml_text(dataset.class_names, {split: f"images/{split}"}, comment))


def _check_out(out_dir: str, overwrite: bool, dataset, inputs: list[str]) -> None:
    """Refuse, before any work, a non-empty ``out_dir`` without ``overwrite``, one that holds a source image or
    annotation file (replacing it would delete them), and one this process cannot create or write."""
    from detkit.data.media import check_output_dir

    out = os.path.abspath(out_dir)
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(f"--output {out_dir}: the folder is not empty; give an empty or new folder, or "
                              f"--overwrite to replace what is there")
        sources = [dataset.image_info(k)["file_name"] for k in range(len(dataset))] + list(inputs)
        for path in sources:
            path = os.path.abspath(path)
            if path.startswith(out + os.sep):
                raise ConfigError(f"--output {out_dir}: holds {path}, which the conversion reads; --overwrite would "
                                  f"delete it (write the converted dataset elsewhere)")
    check_output_dir(out, "--output")


def convert_dataset(dataset, out_dir: str, fmt: str, split: str | None = None, overwrite: bool = False,
                    copy: bool = False, inputs: list[str] = (), comment: str = "") -> dict:
    """Write ``dataset`` (a ``DetectionDataset``) to ``out_dir`` in the layout ``fmt`` (``coco``, ``voc``,
    ``yolo``), its ``split`` named ``split`` (VOC's split file, YOLO's folders and data.yaml key; default
    :data:`DEFAULT_SPLIT`). Images are hard-linked, or copied with ``copy`` or where linking fails. ``out_dir``
    must be new or empty unless ``overwrite``, and must not hold ``inputs`` (the source's annotation files) or
    the source images. ``comment`` heads a YOLO data.yaml.

    Returns ``{"format", "split", "out", "images", "boxes", "linked", "copied", "left_out" (crowd and difficult
    boxes YOLO cannot flag), "dropped" (boxes without area once rounded to VOC's whole pixels or clipped to a
    YOLO image's real size), "rounded" (VOC boxes the rounding moved by more than voc.ROUNDING_TOLERANCE px),
    "resized" (YOLO images whose header gives another size than the annotations), "classes"}``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--to {fmt!r}: expected one of {', '.join(FORMATS)}")
    split = split or DEFAULT_SPLIT[fmt]
    if split is not None and (not split or os.sep in split or split.startswith(".")):
        raise ConfigError(f"--split {split!r}: expected a split name such as 'train' (a file and folder name)")
    _check_out(out_dir, overwrite, dataset, list(inputs))
    names = output_names(dataset)
    out = os.path.abspath(out_dir)
    staged = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex[:12]}.partial")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.mkdir(staged)
    counts = {"images": len(dataset), "boxes": 0, "linked": 0, "copied": 0, "left_out": 0, "dropped": 0,
              "rounded": 0, "resized": 0}
    try:
        folder = {"coco": "images", "voc": "JPEGImages", "yolo": os.path.join("images", split or "")}[fmt]
        image_dir = os.path.join(staged, folder)
        os.makedirs(image_dir)
        for index, name in enumerate(names):
            linked = place_image(dataset.image_info(index)["file_name"], os.path.join(image_dir, name), copy)
            counts["linked" if linked else "copied"] += 1
        if fmt == "coco":
            _write_coco(dataset, staged, names, counts)
        elif fmt == "voc":
            _write_voc(dataset, staged, names, split, counts)
        else:
            _write_yolo(dataset, staged, names, split, counts, comment)
        replace_directory(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {"format": fmt, "split": split, "out": out_dir, **counts, "classes": list(dataset.class_names)}
