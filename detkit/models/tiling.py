"""Tiled inference: a detector run on overlapping windows of a large image, what they found merged.

Aerial, satellite and microscopy images are thousands of pixels across with objects of tens of pixels:
resized to a detector's input they lose the objects. Cutting them into overlapping windows at native
resolution keeps the objects; an object cut by one window's edge lies whole inside a neighbour when the
overlap is at least its size. This is slicing-aided inference (Akyon et al., "Slicing Aided Hyper Inference
and Fine-tuning for Small Object Detection", ICIP 2022; the SAHI library), which torchvision, Detectron2
and MMDetection leave to that library.

:class:`TiledDetector` wraps any detector callable ``model(list[Tensor (3, H, W) uint8]) -> list[{"boxes",
"scores", "labels"}]``, runs the windows of :func:`~detkit.data.tile.tile_grid` (the grid that also cuts
datasets into tiles) through it ``batch`` at a time (windows are views of the uint8 image: besides it, only
one batch of windows is in memory as floats, the model's copies) and merges what the windows found with
:func:`merge_detections`: a box cut by a window edge inside the image is dropped where another window sees its
object whole; the rest are merged by the chosen rule (``nms``, ``larger`` or ``ios``). The settings are
:class:`~detkit.config.TileSettings` (the config's ``eval.tile``). It is a detector like any other, so
evaluation (``eval.tile``) and ``detkit infer --tile`` both wrap their model in it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor, nn

from detkit.config import ConfigError, TileSettings
from detkit.data.tile import TooManyWindows, tile_grid

MERGE_MODES = ("nms", "larger", "ios")
#: a progress bar over the windows from this many windows on (a few windows take a moment)
PROGRESS_MIN_WINDOWS = 9
#: elements of one block of pairwise box comparisons (a few of these float tensors are alive at a time)
PAIR_BLOCK_ELEMENTS = 2_000_000

__all__ = ["MERGE_MODES", "OPTIONS", "TileSettings", "TiledDetector", "check_tile_settings", "merge_detections",
           "settings_with_options", "tiled"]


# ----------------------------------------------------------------------------- settings

#: the smallest window: a detector's feature maps are 1/16-1/32 of its input, and a window below this holds
#: no object it could find (it is resized up to the model's size, so it would only multiply the windows)
MIN_TILE = 32

#: the ``detkit infer`` option of each setting, for messages about what was typed
OPTIONS = {"size": "--tile", "overlap": "--overlap", "merge": "--tile-merge", "batch": "--tile-batch",
           "full_image": "--tile-full-image"}


def check_tile_settings(settings: TileSettings, names: dict[str, str] | None = None, key: str = "eval.tile") -> None:
    """Raise ConfigError naming the setting (``key.<field>``, or the command-line option ``names[field]``), its
    value and what is expected, for a number outside its field's range or an unknown merge mode. (The config
    loader range-checks a file's keys already; merge names and settings made in code or from options are
    checked here, before any window is cut.)"""
    names = names or {}
    for f in dataclasses.fields(settings):
        value, bounds = getattr(settings, f.name), f.metadata.get("range")
        if f.name == "merge":
            bad, expected = value not in MERGE_MODES, f"one of {', '.join(MERGE_MODES)}"
        elif bounds is not None:
            kind = "an integer" if isinstance(f.default, int) else "a number"
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            bad, expected = not (number and bounds.admits(value)), f"{kind} {bounds}"
        else:
            continue
        if f.name == "size" and not bad and 0 < value < MIN_TILE:
            bad, expected = True, f"0 (no tiling) or a window side of at least {MIN_TILE} px"
        if bad:
            shown = f"{names[f.name]} {value}" if f.name in names else f"{key}.{f.name}={value!r}"
            raise ConfigError(f"{shown}: expected {expected}")


def settings_with_options(base: TileSettings, options: dict) -> TileSettings:
    """``base`` (a config's ``eval.tile``) with the ``detkit infer`` options that were given (a None value: not
    given), checked: ConfigError names the option, its value and the expected range (or the config key, for
    a bad value the options left alone)."""
    given = {k: v for k, v in options.items() if v is not None}
    settings = dataclasses.replace(base, **given)
    check_tile_settings(settings, names={k: OPTIONS[k] for k in given})
    return settings


# ----------------------------------------------------------------------------- the detector


def tiled(detector, settings: TileSettings, device=None, progress: bool = True):
    """``detector`` itself when tiling is off (``settings.size == 0``), else a :class:`TiledDetector` of it."""
    if settings.size == 0:
        check_tile_settings(settings)
        return detector
    return TiledDetector(detector, settings, device=device, progress=progress)


class TiledDetector(nn.Module):
    """``detector`` run on overlapping windows of each image, their detections merged; called as a detector
    is: ``tiled(images) -> list[{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}]`` in the images' pixels,
    an image being a ``(3, H, W)`` uint8 tensor or an ``(H, W, 3)`` uint8 array.

    Windows are views of the image; each goes through the detector's own resize like any image, so a window
    as large as the detector's ``min_size`` is seen at native resolution. Windows are moved to ``device``
    (None: they stay where the image is). ``full_image_side``: the longer side the image is shrunk to for the
    whole-image pass (``settings.full_image``), in uint8 with area interpolation, so there is neither a float
    copy of the whole image nor the aliasing of a bilinear shrink by 30; default: the detector's
    ``transform.max_size``, else the window size. A progress bar counts the windows of an image that has
    :data:`PROGRESS_MIN_WINDOWS` or more, unless ``progress`` is false.
    """

    def __init__(self, detector, settings: TileSettings, device=None, progress: bool = True,
                 full_image_side: int | None = None):
        super().__init__()
        check_tile_settings(settings)
        if settings.size < 1:
            raise ValueError("TiledDetector: settings.size is 0, which turns tiling off (tiled() then returns "
                             "the detector itself)")
        self.detector = detector  # a submodule when it is a module: eval()/to() reach it
        self.settings = settings
        self.device = None if device is None else torch.device(device)
        self.progress = progress
        transform_side = getattr(getattr(detector, "transform", None), "max_size", None)
        self.full_image_side = int(full_image_side or transform_side or settings.size)

    def forward(self, images: list, targets: list[dict] | None = None,
                proposals: list[Tensor] | None = None) -> list[dict]:
        if targets is not None or proposals is not None:
            raise ValueError("tiled inference takes images only: no targets, and proposals are made per window "
                             "by the detector's own proposal source")
        return [self.detect(image) for image in images]

    @torch.no_grad()
    def detect(self, image: Tensor | np.ndarray) -> dict:
        """One image's merged detections (see :func:`merge_detections`)."""
        image = _as_chw(image)
        height, width = image.shape[-2:]
        try:
            windows = tile_grid(height, width, self.settings.size, self.settings.overlap)
        except TooManyWindows as exc:
            raise ConfigError(f"tiled inference: {exc}: use a larger --tile (eval.tile.size) or a smaller --overlap "
                              f"(eval.tile.overlap)") from None
        found = self._detect_windows(image, windows)
        if self.settings.full_image:
            found.append(self._detect_whole(image))
            windows = torch.cat([windows, windows.new_tensor([[0, 0, width, height]])])
        return merge_detections(found, windows, (height, width), self.settings)

    def _to_device(self, image: Tensor) -> Tensor:
        return image if self.device is None else image.to(self.device)

    def _detect_windows(self, image: Tensor, windows: Tensor) -> list[dict]:
        """Each window's detections, shifted into the image's pixels; ``settings.batch`` windows per call."""
        bar = None
        if self.progress and len(windows) >= PROGRESS_MIN_WINDOWS:
            from detkit.engine.progress import progress_bar

            bar = progress_bar(total=len(windows), desc="windows", leave=False)
        found = []
        try:
            for batch in windows.split(self.settings.batch):
                corners = batch.tolist()
                crops = [self._to_device(image[:, y0:y1, x0:x1]) for x0, y0, x1, y1 in corners]
                for det, (x0, y0, _, _) in zip(self.detector(crops), corners):
                    shift = det["boxes"].new_tensor([x0, y0, x0, y0])
                    found.append({"boxes": det["boxes"] + shift, "scores": det["scores"], "labels": det["labels"]})
                if bar is not None:
                    bar.update(len(corners))
        finally:
            if bar is not None:
                bar.close()
        return found

    def _detect_whole(self, image: Tensor) -> dict:
        """The detections of the whole image shrunk to ``full_image_side``, in the image's pixels."""
        height, width = image.shape[-2:]
        small = image
        if self.full_image_side < max(height, width):
            import cv2

            scale = self.full_image_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            hwc = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
            small = torch.from_numpy(cv2.resize(hwc, size, interpolation=cv2.INTER_AREA)).permute(2, 0, 1)
        det = self.detector([self._to_device(small)])[0]
        factor = det["boxes"].new_tensor([width / small.shape[-1], height / small.shape[-2]] * 2)
        return {"boxes": det["boxes"] * factor, "scores": det["scores"], "labels": det["labels"]}


def _as_chw(image: Tensor | np.ndarray) -> Tensor:
    """``image`` as a ``(3, H, W)`` tensor; an ``(H, W, 3)`` uint8 array becomes a view of it (no copy)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got a {image.dtype} array of shape {image.shape}")
        if any(s < 0 for s in image.strides):  # a flipped view; torch takes positive strides only
            image = np.ascontiguousarray(image)
        return torch.from_numpy(image).permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    return image


# ----------------------------------------------------------------------------- merging


def merge_detections(found: list[dict], windows: Tensor, image_size: tuple[int, int],
                     settings: TileSettings) -> dict:
    """One image's detections ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,)}``, most confident first,
    from what the windows ``windows (T, 4)`` xyxy found (``found[t]``: window t's detections in the image's
    pixels; a window covering the whole image is the whole-image pass). ``image_size``: ``(height, width)``.

    Boxes are compared only across windows: duplicates within a window are the detector's own business (its
    NMS), so an image inside one window comes back as the detector returned it. Two steps:

    1. Truncation. A box within ``edge_margin`` of an edge of its window that lies inside the image may be a
       piece of an object the edge cuts. It is dropped when ``ios_thresh`` of it lies inside a box of its
       class from another window that no inner edge touches: that window saw the object whole. Dropping every
       box at an inner edge would lose the objects larger than the overlap, which no window sees whole (the
       whole-image pass's boxes touch no inner edge, so they stand for such objects); IoU alone cannot tell a
       piece from a neighbour (half of an object has IoU 0.5 with the whole).
    2. Duplicates, between boxes of one class from different windows, by ``settings.merge``: ``nms`` drops a box
       when a more confident one has IoU >= ``iou_thresh`` with it; ``larger`` drops the smaller box of a pair
       whose intersection covers ``ios_thresh`` of the smaller (the whole object over a piece of it; ties: the
       less confident); ``ios`` replaces every group of boxes linked by such pairs by their union, with the
       group's highest score (greedy non-maximum merging, SAHI's ``GREEDYNMM``, for objects cut in every window).

    The rules are matrix forms of the greedy ones, with no Python loop over boxes: ``nms`` and ``larger`` drop
    every box that a preferred box matches, even one that is itself dropped (Fast NMS, Bolya et al., YOLACT,
    ICCV 2019), where greedy NMS would let a dropped box spare a third: the same for the duplicates tiling makes,
    which all match each other, but a chain A~B~C with A and C apart loses C as well. ``ios`` merges connected
    components, transitively, where greedy merging joins each box to the best box it matches, one step.
    """
    boxes, scores, labels = (torch.cat([d[k] for d in found]) for k in ("boxes", "scores", "labels"))
    counts = torch.tensor([len(d["boxes"]) for d in found], device=boxes.device)
    source = torch.repeat_interleave(torch.arange(len(found), device=boxes.device), counts)
    rects = windows.to(device=boxes.device, dtype=boxes.dtype)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    i, j, inter = _cross_window_pairs(boxes, labels, source, rects)
    cut = _cut_by_inner_edge(boxes, rects[source], image_size, settings.edge_margin)
    keep = ~_pieces_seen_whole(cut, i, j, inter, area, settings.ios_thresh)
    alive = keep[i] & keep[j]
    i, j, inter = i[alive], j[alive], inter[alive]
    if settings.merge == "nms":
        match = inter >= settings.iou_thresh * (area[i] + area[j] - inter)
        keep &= ~_beaten(i[match], j[match], _rank(scores, area))
    elif settings.merge == "larger":
        match = inter >= settings.ios_thresh * torch.minimum(area[i], area[j])
        keep &= ~_beaten(i[match], j[match], _rank(area, scores))
    else:
        match = inter >= settings.ios_thresh * torch.minimum(area[i], area[j])
        boxes, scores, roots = _union_of_components(boxes, scores, i[match], j[match])
        keep &= roots
    index = keep.nonzero().squeeze(1)
    index = index[torch.argsort(scores[index], descending=True, stable=True)]
    return {"boxes": boxes[index], "scores": scores[index], "labels": labels[index]}


def _cross_window_pairs(boxes: Tensor, labels: Tensor, source: Tensor, rects: Tensor
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Index pairs ``(i, j)`` of intersecting boxes of one label from different windows, and their intersection
    areas. ``boxes (N, 4)`` are grouped by window in order (``source (N,)``: the window of each, whose rectangle
    is ``rects[source]``). A box lies inside its window, so only windows that overlap are compared: block by
    block of window pairs, each a ``(K, K)`` matrix (K: the most boxes of a window), so the work grows with the
    number of windows and not with the square of the image's detections."""
    counts = torch.bincount(source, minlength=len(rects))
    width = int(counts.max()) if len(source) else 0
    none = source.new_empty(0)
    if width == 0:
        return none, none, boxes.new_empty(0)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(width, device=source.device)
    members = torch.where(slot < counts[:, None], starts[:, None] + slot, -1)  # (T, K) box indices, -1: none
    busy = (counts > 0).nonzero().squeeze(1)
    lo = torch.maximum(rects[busy, None, :2], rects[None, busy, :2])
    hi = torch.minimum(rects[busy, None, 2:], rects[None, busy, 2:])
    a, b = torch.triu((hi > lo).all(-1), diagonal=1).nonzero(as_tuple=True)
    a, b = busy[a], busy[b]
    step = max(1, PAIR_BLOCK_ELEMENTS // (width * width))
    found_i, found_j, found_inter = [none], [none], [boxes.new_empty(0)]
    for start in range(0, len(a), step):  # blocks of window pairs
        ia, ib = members[a[start:start + step]], members[b[start:start + step]]
        ba, bb = boxes[ia.clamp(min=0)][:, :, None], boxes[ib.clamp(min=0)][:, None]
        wh = (torch.minimum(ba[..., 2:], bb[..., 2:]) - torch.maximum(ba[..., :2], bb[..., :2])).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        same = labels[ia.clamp(min=0)][:, :, None] == labels[ib.clamp(min=0)][:, None]
        block, r, q = ((inter > 0) & same & (ia >= 0)[:, :, None] & (ib >= 0)[:, None]).nonzero(as_tuple=True)
        found_i.append(ia[block, r])
        found_j.append(ib[block, q])
        found_inter.append(inter[block, r, q])
    return torch.cat(found_i), torch.cat(found_j), torch.cat(found_inter)


def _cut_by_inner_edge(boxes: Tensor, rects: Tensor, image_size: tuple[int, int], margin: float) -> Tensor:
    """Whether each box reaches within ``margin`` of an edge of its window ``rects`` that lies inside the image."""
    height, width = image_size
    x0, y0, x1, y1 = rects.unbind(1)
    return (((x0 > 0) & (boxes[:, 0] <= x0 + margin)) | ((y0 > 0) & (boxes[:, 1] <= y0 + margin))
            | ((x1 < width) & (boxes[:, 2] >= x1 - margin)) | ((y1 < height) & (boxes[:, 3] >= y1 - margin)))


def _pieces_seen_whole(cut: Tensor, i: Tensor, j: Tensor, inter: Tensor, area: Tensor, thresh: float) -> Tensor:
    """Boxes cut by an inner window edge of which ``thresh`` lies inside an uncut box of a pair."""
    pieces = torch.zeros_like(cut)
    pieces[i[cut[i] & ~cut[j] & (inter >= thresh * area[i])]] = True
    pieces[j[cut[j] & ~cut[i] & (inter >= thresh * area[j])]] = True
    return pieces


def _rank(primary: Tensor, secondary: Tensor) -> Tensor:
    """A distinct rank per box, higher for the preferred: by ``primary``, ties by ``secondary``, then by index."""
    order = torch.argsort(secondary, stable=True)
    order = order[torch.argsort(primary[order], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return rank


def _beaten(i: Tensor, j: Tensor, rank: Tensor) -> Tensor:
    """Boxes that are the lower-ranked box of at least one of the pairs ``(i, j)``."""
    beaten = torch.zeros(len(rank), dtype=torch.bool, device=rank.device)
    beaten[torch.where(rank[i] < rank[j], i, j)] = True
    return beaten


def _union_of_components(boxes: Tensor, scores: Tensor, i: Tensor, j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The union box and highest score of each connected component of the graph with edges ``(i, j)``, at the
    component's root (its lowest index), and which boxes are roots."""
    root = _components(len(boxes), i, j)
    union = torch.stack([boxes[:, 0].scatter_reduce(0, root, boxes[:, 0], "amin"),
                         boxes[:, 1].scatter_reduce(0, root, boxes[:, 1], "amin"),
                         boxes[:, 2].scatter_reduce(0, root, boxes[:, 2], "amax"),
                         boxes[:, 3].scatter_reduce(0, root, boxes[:, 3], "amax")], dim=1)
    best = scores.scatter_reduce(0, root, scores, "amax")
    return union, best, root == torch.arange(len(boxes), device=boxes.device)


def _components(n: int, i: Tensor, j: Tensor) -> Tensor:
    """The lowest index in the connected component of each of ``n`` nodes (edges ``(i, j)``): minimum-label
    propagation with pointer jumping, one vectorised step per round (rounds grow with the components' depth)."""
    root = torch.arange(n, device=i.device)
    while True:
        low = torch.minimum(root[i], root[j])
        step = root.scatter_reduce(0, i, low, "amin").scatter_reduce(0, j, low, "amin")
        step = step[step]
        if torch.equal(step, root):
            return root
        root = step
