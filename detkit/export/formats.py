"""Writing a :class:`~detkit.export.graph.DetectionGraph` as ONNX, TorchScript or a ``torch.export``
program, and reading any of the three back as a detector.

- ``exported`` (``.pt2``): ``torch.export`` with symbolic batch, height and width; the detections' count
  is data-dependent (unbacked) and may be 0.
- ``onnx`` (``.onnx``): the same program translated by the ``torch.export``-based ONNX exporter
  (torchvision's ``nms`` and ``roi_align`` map to ``NonMaxSuppression`` and ``RoiAlign``; ``roi_pool`` to
  ``MaxRoiPool``, translated here because onnxscript's own entry takes the wrong arguments). Run with
  onnxruntime (``pip install detkit[export]``).
- ``torchscript`` (``.ts``): the graph's Python compiled by ``torch.jit.script``, with the trunk, the RPN
  head and the box head + predictor traced first (convolutions and fully connected layers, whose traces
  hold for any input size), so that batch and size stay dynamic.

Each file carries ``detkit.json`` (class names, COCO category ids, the input it expects, the format):
ONNX as metadata, the two others as an extra file of the archive.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from detkit.engine.files import atomic_path
from detkit.export.graph import DetectionGraph, ExportError

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported": ".pt2"}
METADATA = "detkit.json"
INPUT = "images: uint8 (B, 3, H, W) RGB; outputs: boxes (N, 4) xyxy input pixels, scores (N,), labels (N,) 1..K, " \
        "batch_index (N,)"
OUTPUT_NAMES = ["boxes", "scores", "labels", "batch_index"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters' progress logs (onnxscript's optimiser logs every rewrite at INFO) and their warnings
    about torch internals kept from the user's console; errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dynamic_shapes() -> dict:
    """Batch, height and width symbolic (the shortest side at least 16 pixels)."""
    dim = torch.export.Dim
    return {"images": {0: dim("batch", min=1, max=256), 2: dim("height", min=16, max=16384),
                       3: dim("width", min=16, max=16384)}}


def _allow_empty_nms() -> None:
    """torchvision's fake ``nms`` (the shape rule ``torch.export`` traces with) declares its output size with
    ``create_unbacked_symint()``, which assumes at least 2 kept boxes: the program then asserts ``kept >= 2``
    and fails on an image with fewer proposals or detections. Re-registered with a size that may be 0 (only
    the shape rule changes; the kernel is torchvision's)."""
    import torchvision  # noqa: F401  (registers torchvision::nms first)

    def nms_shape(dets, scores, iou_threshold):
        return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)

    torch.library.register_fake("torchvision::nms", nms_shape, allow_override=True)


def export_program(graph: DetectionGraph, example: Tensor) -> torch.export.ExportedProgram:
    """The graph as a ``torch.export`` program with dynamic batch and size."""
    _allow_empty_nms()
    with torch.no_grad():
        return torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes(), strict=False)


def _roi_pool_onnx(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    from onnxscript import opset18 as op

    out = op.MaxRoiPool(input, rois, pooled_shape=(pooled_height, pooled_width), spatial_scale=spatial_scale)
    return out, op.Cast(out, to=7)  # torchvision's second output (argmax indices) is not used: int64 filler


def write_onnx(graph: DetectionGraph, example: Tensor, path: str, metadata: dict) -> None:
    import onnx

    _allow_empty_nms()
    with torch.no_grad():
        program = torch.onnx.export(graph, (example,), dynamic_shapes=dynamic_shapes(), dynamo=True,
                                    input_names=["images"], output_names=OUTPUT_NAMES, verbose=False,
                                    custom_translation_table={torch.ops.torchvision.roi_pool.default: _roi_pool_onnx})
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(metadata)
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)


def write_torchscript(graph: DetectionGraph, example: Tensor, path: str, metadata: dict) -> None:
    scripted = script_graph(graph, example)
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, tmp, _extra_files={METADATA: json.dumps(metadata)})


def write_program(graph: DetectionGraph, example: Tensor, path: str, metadata: dict) -> None:
    program = export_program(graph, example)
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp, extra_files={METADATA: json.dumps(metadata)})


WRITERS: dict[str, Callable] = {"onnx": write_onnx, "torchscript": write_torchscript, "exported": write_program}


def script_graph(graph: DetectionGraph, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the graph after tracing its network parts on the inputs they get from
    ``example`` (recorded by forward hooks in one run)."""
    seen: dict[str, tuple] = {}
    parts = {"trunk": graph.trunk, "rpn_head": graph.rpn_head, "classifier": graph.classifier}
    def record(name: str):
        def hook(module, args, output) -> None:  # returns None: the output stays the module's
            seen.setdefault(name, args)
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in parts.items()]
    try:
        with torch.no_grad():
            graph(example)
    finally:
        for hook in hooks:
            hook.remove()
    if "classifier" not in seen:
        raise ExportError("the example image gave no region proposals, so the box head could not be traced")
    with torch.no_grad():
        for name, module in parts.items():
            setattr(graph, name, torch.jit.trace(module, seen[name], check_trace=False))
    # Not frozen: torch.jit.freeze folds batch norms into convolutions, which changes the rounding (ResNet-50
    # with initial weights then drifts by up to 7e-3 px) and was no faster on a quiet CPU (tools/benchmark.py
    # export); optimize_for_inference writes a file torch.jit.load rejects.
    return torch.jit.script(graph)


class ExportedDetector:
    """An exported file used like the eager detector: ``model(images: list[(3, H, W) uint8])`` ->
    ``list[{"boxes", "scores", "labels"}]`` in the images' pixels (consecutive images of one size go in one
    batch). ``class_names`` and ``cat_ids`` come from the file's metadata."""

    def __init__(self, path: str, run: Callable[[Tensor], tuple], metadata: dict, fmt: str):
        self.path, self.format, self.metadata = path, fmt, metadata
        self.class_names = list(metadata.get("class_names") or [])
        self.cat_ids = list(metadata.get("cat_ids") or range(1, len(self.class_names) + 1))
        self.max_detections = metadata.get("max_detections")  # per image, fixed at export (None: an older file)
        self._run = run

    def eval(self) -> "ExportedDetector":
        return self

    def __call__(self, images: list[Tensor], targets=None, proposals=None) -> list[dict]:
        results: list[dict] = []
        start = 0
        while start < len(images):
            end = start + 1
            while end < len(images) and images[end].shape == images[start].shape:
                end += 1
            results.extend(self.detect_batch(torch.stack([_as_uint8(img, i) for i, img in
                                                          enumerate(images[start:end], start)])))
            start = end
        return results

    @torch.no_grad()
    def detect_batch(self, batch: Tensor) -> list[dict]:
        boxes, scores, labels, index = (torch.as_tensor(t) for t in self._run(batch.cpu()))
        return [{"boxes": boxes[index == i].float(), "scores": scores[index == i].float(),
                 "labels": labels[index == i].long()} for i in range(batch.shape[0])]


def _as_uint8(image: Tensor, index: int) -> Tensor:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image {index}: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.cpu()
    return (image.float() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()


def format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    for fmt, suffix in FORMATS.items():
        if ext == suffix:
            return fmt
    return "torchscript" if ext in (".pt", ".torchscript", ".jit") else ""


def load_exported(path: str) -> ExportedDetector:
    """An exported detector from ``path`` (.onnx, .ts/.pt, .pt2); ExportError for a file that is not one."""
    import torchvision  # noqa: F401  (the files call torchvision::nms and roi_align: registered by the import)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model not found: {path}")
    fmt = format_of(path)
    try:
        if fmt == "onnx":
            return _load_onnx(path)
        if fmt == "exported":
            extra = {METADATA: ""}
            program = torch.export.load(path, extra_files=extra)
            module = program.module()
            return ExportedDetector(path, lambda x: module(x), json.loads(extra[METADATA] or "{}"), fmt)
        extra = {METADATA: ""}
        scripted = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        return ExportedDetector(path, lambda x: scripted(x), json.loads(extra[METADATA] or "{}"), "torchscript")
    except (RuntimeError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path}: not a detector exported by detkit as {fmt or 'torchscript'} ({exc})") from None


def _load_onnx(path: str) -> ExportedDetector:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(f"{path}: running an ONNX model needs onnxruntime (pip install 'detkit[export]')") from None
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error classes (InvalidProtobuf, Fail, ...): a file that is not a model
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: not an ONNX model onnxruntime can load ({message[:300]})") from None
    metadata = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA, "{}"))
    name = session.get_inputs()[0].name

    def run(batch: Tensor) -> tuple:
        return tuple(torch.from_numpy(out) for out in session.run(None, {name: batch.numpy()}))

    return ExportedDetector(path, run, metadata, "onnx")


def export_detector(model: nn.Module, fmt: str, path: str, example: Tensor, metadata: dict) -> None:
    """Write ``model`` (eval mode, on the CPU) as ``fmt`` to ``path`` (atomically)."""
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(WRITERS)}")
    # a copy, frozen: the file's outputs carry no autograd history, and the caller's model is left as it was
    graph = DetectionGraph(copy.deepcopy(model)).eval().requires_grad_(False)
    with quiet():
        WRITERS[fmt](graph, example, path, {**metadata, "format": fmt, "input": INPUT,
                                            "max_detections": graph.detections})
