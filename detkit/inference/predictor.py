"""Running a trained detector on images, folders, videos and webcams.

Writes annotated pictures (class name and score on each box), an annotated video with the input's frame count
and frame rate, and the detections as a COCO-format results JSON (``results.json``, category ids as in the
training set; every detection, whatever ``--score-thr`` draws) next to ``images.json``, which maps the results'
image ids to files or frame indices. An unreadable image in a folder (a dangling link included) is reported and
skipped, and a folder of which no image can be read is an error; nothing already written is overwritten
half-way (all outputs are written atomically).
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


def check_output_apart(input_spec: str, output_dir: str) -> None:
    """MediaError when ``output_dir`` is the input folder or lies inside it: the pictures and results.json
    written there would sit among the images read (a name shared with an input replaces that image, and the
    next run on the folder reads the drawings as input)."""
    from detkit.data.media import MediaError

    if not os.path.isdir(input_spec):
        return
    folder, out = os.path.realpath(input_spec), os.path.realpath(output_dir)
    if out == folder or out.startswith(folder + os.sep):
        raise MediaError(f"--output {output_dir}: {'is' if out == folder else 'lies inside'} the input folder "
                         f"{input_spec}; the annotated pictures and results.json would land among the images "
                         f"read: choose another output folder")


def run(model: nn.Module, class_names: list[str], cat_ids: list[int], input_spec: str, output_dir: str,
        device: torch.device, score_thr: float = 0.5, max_frames: int | None = None,
        progress: bool = True, results_thr: float | None = None) -> dict:
    """Run on ``input_spec`` (image, folder, video file or webcam index); returns a summary dict
    ``{"kind", "outputs", "detections", "drawn", "images", "skipped"}``.

    The pictures show the detections scoring at least ``score_thr``; ``results.json`` holds every detection the
    model returned (its own ``score_thresh`` applies), or those scoring at least ``results_thr``: an evaluation
    of the file then sees the whole precision-recall curve. Its ``image_id`` is the image's position in
    ``images.json`` (files sorted by name; frames in order), which gives each id's ``file_name``
    (``detkit eval --results`` maps them onto a dataset's ids by file name).

    Raises MediaError when ``output_dir`` cannot be written or is (inside) the input folder (checked first) and
    when no image of a folder could be read (an unreadable image among readable ones is skipped and listed in
    ``"skipped"``).
    """
    from detkit.data.media import check_output_dir, classify_input
    from detkit.engine.files import write_json_atomic
    from detkit.evaluation import detections_to_coco_results
    from detkit.evaluation.drawing import draw_detections

    kind = classify_input(input_spec)
    check_output_dir(output_dir, "--output")
    check_output_apart(input_spec, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    model.eval()

    drawn = [0]

    def detect_and_draw(image_id: int, image: np.ndarray, results: list[dict]) -> np.ndarray:
        det = detect(model, image, device)
        kept = det if results_thr is None else _filter(det, results_thr)
        results.extend(detections_to_coco_results(image_id, kept, cat_ids))
        shown = _filter(det, score_thr)
        drawn[0] += len(shown["scores"])
        return draw_detections(image, shown["boxes"].numpy(), shown["scores"].numpy(), shown["labels"].numpy(),
                               class_names, score_thr=score_thr)

    if kind in ("image", "folder"):
        done = _run_images(input_spec, kind, output_dir, detect_and_draw, progress)
    else:
        done = _run_video(input_spec, kind, output_dir, detect_and_draw, max_frames, progress)
    write_json_atomic(os.path.join(output_dir, "results.json"), done["results"])
    write_json_atomic(os.path.join(output_dir, "images.json"), done["images"])
    return {"kind": kind, "outputs": done["written"], "detections": len(done["results"]), "drawn": drawn[0],
            "images": len(done["images"]), "skipped": done["skipped"]}


def _read(path: Path) -> np.ndarray:
    """The image at ``path`` (see ``read_image``); a symbolic link whose target is missing is named as such."""
    from detkit.data.images import ImageReadError, read_image

    if path.is_symlink() and not path.exists():
        raise ImageReadError(f"{path}: a link to {os.readlink(path)}, which does not exist")
    return read_image(path)


def _run_images(input_spec: str, kind: str, output_dir: str, detect_and_draw, progress: bool) -> dict:
    """An image, or every image of a folder: unreadable ones are logged and skipped, unless none can be read."""
    from detkit.data.images import ImageReadError
    from detkit.data.media import MediaError, list_images, write_image_atomic

    paths = [Path(input_spec)] if kind == "image" else list_images(input_spec)
    iterator = paths
    if progress and len(paths) > 1:
        from detkit.engine.progress import progress_bar

        iterator = progress_bar(paths, desc="infer")
    done: dict = {"results": [], "images": [], "written": [], "skipped": []}
    reasons = []
    for image_id, path in enumerate(iterator):
        try:
            image = _read(path)
        except ImageReadError as exc:
            if kind == "image":
                raise
            log.warning("skipping %s", exc)
            done["skipped"].append(str(path))
            reasons.append(str(exc))
            continue
        out = os.path.join(output_dir, Path(path).stem + "_det" + (Path(path).suffix.lower() or ".png"))
        write_image_atomic(out, detect_and_draw(image_id, image, done["results"]))
        done["written"].append(out)
        done["images"].append({"id": image_id, "file_name": str(path), "height": image.shape[0],
                               "width": image.shape[1]})
    if not done["images"]:
        more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
        raise MediaError(f"{input_spec}: none of its {len(paths)} images could be read, so nothing was detected "
                         f"or written: {'; '.join(reasons[:3])}{more}")
    return done


def _run_video(input_spec: str, kind: str, output_dir: str, detect_and_draw, max_frames: int | None,
               progress: bool) -> dict:
    """Every frame of a video file or webcam (up to ``max_frames``), annotated into ``<name>_det.mp4``."""
    from detkit.data.media import VideoSink, open_video

    source = open_video(input_spec)
    name = f"webcam{input_spec}" if kind == "webcam" else Path(input_spec).stem
    out = os.path.join(output_dir, name + "_det.mp4")
    total = source.frame_count if source.frame_count and source.frame_count > 0 else None
    bar = None
    if progress:
        from detkit.engine.progress import progress_bar

        bar = progress_bar(total=total, desc="infer")
    done: dict = {"results": [], "images": [], "written": [], "skipped": []}
    frames = 0
    try:
        with VideoSink(out, source.fps, source.size) as sink:
            for frame in source:
                sink.write(detect_and_draw(frames, frame, done["results"]))
                done["images"].append({"id": frames, "file_name": f"{input_spec}#frame={frames}",
                                       "height": frame.shape[0], "width": frame.shape[1]})
                frames += 1
                if bar is not None:
                    bar.update(1)
                if max_frames is not None and frames >= max_frames:
                    break
    finally:
        source.close()
        if bar is not None:
            bar.close()
    done["written"].append(out)
    return done
