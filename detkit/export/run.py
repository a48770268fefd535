"""``detkit export``: a checkpoint written as ONNX, TorchScript or a ``torch.export`` program, checked
against the eager detector before it is put in place.

The file is written beside ``--output`` under a temporary name, run on the verification images next to the
eager model, and renamed to ``--output`` only when every detection matches; otherwise it is removed and the
command fails with the table of differences. An existing ``--output`` is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from detkit.engine.files import atomic_path, remove_orphaned_temporaries
from detkit.export.formats import FORMATS, export_detector, load_exported
from detkit.export.graph import ExportError, check_exportable
from detkit.export.verify import format_comparisons, verify

log = logging.getLogger(__name__)


class ExportMismatch(RuntimeError):
    """The exported file's detections differ from the eager model's (the file was not kept)."""


def check_request(fmt: str, output: str, overwrite: bool, images: list[str], count: int, tolerance: float) -> None:
    """Everything about the request that can be checked before the model is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not tolerance >= 0:  # NaN too
        raise ExportError(f"--tolerance {tolerance}: expected a distance in pixels >= 0 (default 1e-3)")
    if count < 1:
        raise ExportError(f"--num-images {count}: expected at least 1 verification image")
    for path in images:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--images {path}: no such file or folder")
    suffix = os.path.splitext(output)[1].lower()
    if suffix and suffix != FORMATS[fmt] and not (fmt == "torchscript" and suffix in (".pt", ".torchscript")):
        raise ExportError(f"--output {output}: --format {fmt} writes a *{FORMATS[fmt]} file (got {suffix!r})")
    if os.path.isdir(output):
        raise ExportError(f"--output {output} is a folder; expected a file name ending in {FORMATS[fmt]}")
    if os.path.exists(output) and not overwrite:
        raise ExportError(f"--output {output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ExportError(f"--output {output}: folder {folder} does not exist or is not writable")
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _importable(name)]
        if missing:
            raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install 'detkit[export]'")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def verification_images(paths: list[str], cfg, registries, count: int) -> list[tuple[str, torch.Tensor]]:
    """``(name, (3, H, W) uint8)`` of the given image files and folders, or of the first ``count`` images
    of the checkpoint's test set."""
    from detkit.data.images import read_image, to_chw_tensor
    from detkit.data.media import list_images

    files: list[Path] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(list_images(path))
        elif os.path.isfile(path):
            files.append(Path(path))
        else:
            raise FileNotFoundError(f"--images {path}: no such file or folder")
    if not files:
        from detkit.data.loading import build_dataset

        try:
            dataset = build_dataset(cfg.data.test, registries, "test")
        except (OSError, ValueError) as exc:
            raise ExportError(f"no --images given and the checkpoint's test set cannot be read ({exc}): "
                              "pass --images FILE_OR_FOLDER to verify the export on") from None
        files = [Path(dataset.image_info(i)["file_name"]) for i in range(min(count, len(dataset)))]
    files = files[:count]
    if not files:
        raise ExportError("no verification images: pass --images FILE_OR_FOLDER")
    samples = [(str(f), to_chw_tensor(read_image(f))) for f in files]
    if len({tuple(img.shape) for _, img in samples}) == 1:
        # one size only: add the first image at another size and aspect, so the file's dynamic size is checked
        name, image = samples[0]
        h, w = image.shape[1:]
        size = (max(16, round(h * 0.8)), max(16, round(w * 0.6)))
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        samples.append((f"{name} resized to {size[0]}x{size[1]}", resized[0].round().clamp(0, 255).to(torch.uint8)))
    return samples


def export_checkpoint(checkpoint: str, fmt: str, output: str, registries, images: list[str] | None = None,
                      count: int = 4, overrides: list[str] | None = None, overwrite: bool = False,
                      tolerance: float = 1e-3) -> str:
    """Export and verify; returns the comparison table. Raises ExportMismatch when the detections differ."""
    from detkit.models.loading import model_from_checkpoint

    check_request(fmt, output, overwrite, list(images or []), count, tolerance)
    for path in remove_orphaned_temporaries(output):
        log.info("removed %s, left by an export that was killed", path)
    model, cfg, ckpt = model_from_checkpoint(checkpoint, registries, torch.device("cpu"), overrides)
    model.eval()
    check_exportable(model)
    samples = verification_images(list(images or []), cfg, registries, count)
    metadata = {"class_names": list(ckpt["class_names"]), "cat_ids": list(ckpt.get("cat_ids") or []),
                "checkpoint": os.path.abspath(checkpoint)}
    example = torch.stack([samples[0][1], samples[0][1]])  # a batch of two: one would fix the batch size to 1
    with atomic_path(output, suffix=".tmp" + FORMATS[fmt]) as tmp:  # the reader picks the format by extension
        export_detector(model, fmt, tmp, example, metadata)
        rows = verify(model, load_exported(tmp), samples, tolerance)
        table = format_comparisons(rows, tolerance)
        if not all(r.ok for r in rows):
            raise ExportMismatch(f"the exported model's detections differ from the eager model's; {output} was "
                                 f"not written:\n{table}")
    return table
