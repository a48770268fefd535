"""Running a trained detector on images, folders, videos and webcams.

Writes annotated pictures (class name and score on each box), an annotated
video with the input's frame count and frame rate, and the detections as a
COCO-format results JSON (``results.json``, category ids as in the training
set) next to ``images.json``, which maps the results' image ids to files or frame
indices. An unreadable image in a folder is reported and skipped; nothing
already written is overwritten half-way (all outputs are written atomically).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@torch.no_grad()
def detect(model: nn.Module, image: np.ndarray, device: torch.device) -> dict:
    """Detections ``{"boxes" (N, 4), "scores" (N,), "labels" (N,)}`` for one RGB uint8 image, on the CPU."""
    from detkit.data.images import to_chw_tensor

    tensor = to_chw_tensor(image, device)
    det = model([tensor])[0]
    return {k: v.cpu() for k, v in det.items()}


def _filter(det: dict, score_thr: float) -> dict:
    keep = det["scores"] >= score_thr
    return {k: v[keep] for k, v in det.items()}


def run(model: nn.Module, class_names: list[str], cat_ids: list[int], input_spec: str, output_dir: str,
        device: torch.device, score_thr: float = 0.5, max_frames: int | None = None,
        progress: bool = True) -> dict:
    """Run on ``input_spec`` (image, folder, video file or webcam index); returns a summary dict."""
    from detkit.data.images import ImageReadError, read_image
    from detkit.evaluation import detections_to_coco_results
    from detkit.media import (VideoSink, classify_input, list_images, open_video, write_image_atomic,
                              write_json_atomic)
    from detkit.visualize import draw_detections

    kind = classify_input(input_spec)
    os.makedirs(output_dir, exist_ok=True)
    results: list[dict] = []
    images_meta: list[dict] = []
    written: list[str] = []
    skipped: list[str] = []
    model.eval()

    def annotate(image, det):
        return draw_detections(image, det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy(),
                               class_names, score_thr=score_thr)

    if kind in ("image", "folder"):
        paths = [Path(input_spec)] if kind == "image" else list_images(input_spec)
        iterator = paths
        if progress and len(paths) > 1:
            from tqdm import tqdm

            iterator = tqdm(paths, desc="infer", dynamic_ncols=True, mininterval=1.0)
        for image_id, path in enumerate(iterator):
            try:
                image = read_image(path)
            except ImageReadError as exc:
                if kind == "image":
                    raise
                log.warning("skipping %s", exc)
                skipped.append(str(path))
                continue
            det = _filter(detect(model, image, device), score_thr)
            out = os.path.join(output_dir, Path(path).stem + "_det" + (Path(path).suffix.lower() or ".png"))
            write_image_atomic(out, annotate(image, det))
            written.append(out)
            images_meta.append({"id": image_id, "file_name": str(path), "height": image.shape[0],
                                "width": image.shape[1]})
            results.extend(detections_to_coco_results(image_id, det, cat_ids))
    else:
        source = open_video(input_spec)
        name = f"webcam{input_spec}" if kind == "webcam" else Path(input_spec).stem
        out = os.path.join(output_dir, name + "_det.mp4")
        total = source.frame_count if source.frame_count and source.frame_count > 0 else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="infer", dynamic_ncols=True, mininterval=1.0)
        frames = 0
        try:
            with VideoSink(out, source.fps, source.size) as sink:
                for frame in source:
                    det = _filter(detect(model, frame, device), score_thr)
                    sink.write(annotate(frame, det))
                    images_meta.append({"id": frames, "file_name": f"{input_spec}#frame={frames}",
                                        "height": frame.shape[0], "width": frame.shape[1]})
                    results.extend(detections_to_coco_results(frames, det, cat_ids))
                    frames += 1
                    if bar is not None:
                        bar.update(1)
                    if max_frames is not None and frames >= max_frames:
                        break
        finally:
            source.close()
            if bar is not None:
                bar.close()
        written.append(out)
    write_json_atomic(os.path.join(output_dir, "results.json"), results)
    write_json_atomic(os.path.join(output_dir, "images.json"), images_meta)
    return {"kind": kind, "outputs": written, "detections": len(results), "images": len(images_meta),
            "skipped": skipped}
