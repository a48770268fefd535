"""Exported against eager, in one process (``tools/benchmark.py export``): whether the detections match on
the test images, the mAP of each on the test set, and the latency per image of each.

Latency is the median over interleaved runs (ABBA, :func:`detkit.benchmarks.common.time_interleaved`) of one image
at a time, each runtime given the same uint8 image: the eager detector in ``torch.no_grad``, onnxruntime's
CPU provider with its default threads, TorchScript. A config instead of a checkpoint measures that detector
with its initial weights (detections and time; its mAP means nothing and is not reported).
"""
from __future__ import annotations

import os

import torch

from detkit.benchmarks.common import Stopwatch, load_average, machine, markdown_table, time_interleaved
from detkit.export.formats import FORMATS, export_detector, load_exported
from detkit.export.verify import format_comparisons, verify


def run(model, cfg, names: list[str], trained: bool, source: str, registries, out_dir: str,
        formats: tuple[str, ...] = ("onnx", "torchscript"), verify_images: int = 20, timed_images: int = 8,
        warmup: int = 2, iters: int = 5) -> dict:
    """Export ``model`` (from ``source``: a checkpoint when ``trained``, else a config's initial weights) in each
    format under ``out_dir``, verify each on the first ``verify_images`` test images, time the first
    ``timed_images`` of them, and score the test set with each when ``trained``."""
    from detkit.data.loading import build_dataset
    from detkit.data.images import read_image, to_chw_tensor

    model.eval()
    dataset = build_dataset(cfg.data.test, registries, "test")
    paths = [dataset.image_info(i)["file_name"] for i in range(min(verify_images, len(dataset)))]
    samples = [(p, to_chw_tensor(read_image(p))) for p in paths]
    os.makedirs(out_dir, exist_ok=True)
    result: dict = {"source": source, "trained": trained, "formats": {}, "images": len(samples)}
    runtimes = {"eager": model}
    for fmt in formats:
        path = os.path.join(out_dir, "model" + FORMATS[fmt])
        with Stopwatch(torch.device("cpu")) as watch:
            export_detector(model, fmt, path, torch.stack([samples[0][1]] * 2), {"class_names": names})
        seconds = watch.seconds
        exported = load_exported(path)
        rows = verify(model, exported, samples, 1e-3)
        print(f"== {fmt} ({seconds:.1f} s to export)\n{format_comparisons(rows, 1e-3)}")
        result["formats"][fmt] = {"export_s": seconds, "matching": sum(r.ok for r in rows), "compared": len(rows),
                                  "box_diff": max(r.box_diff for r in rows), "score_diff": max(r.score_diff for r in rows),
                                  "size_mb": os.path.getsize(path) / 2 ** 20}
        runtimes[fmt] = exported
    timed = [img for _, img in samples[:timed_images]]
    with torch.no_grad():
        latency = time_interleaved({name: (lambda m=m: [m([img]) for img in timed]) for name, m in runtimes.items()},
                                   warmup, iters, torch.device("cpu"))
    result["latency_ms"] = {name: 1000 * s / len(timed) for name, s in latency.items()}
    for fmt in formats:
        result["formats"][fmt]["speedup"] = latency["eager"] / latency[fmt]
    if trained:
        result["ap"] = {name: _ap(m, cfg, registries, os.path.join(out_dir, f"eval_{name}"), dataset)
                        for name, m in runtimes.items()}
    return result


def _ap(model, cfg, registries, out_dir: str, dataset) -> dict:
    from detkit.evaluation import evaluate

    metrics = evaluate(model, cfg, registries, torch.device("cpu"), out_dir, dataset=dataset, progress=False)
    return {"AP": metrics.get("AP"), "AP50": metrics.get("AP50")}


def markdown(results: list[dict], command: str) -> str:
    """A docs/benchmarks.md section: the machine and command, then one row per model and format."""
    rows = []
    for r in results:
        ap = r.get("ap", {})
        for fmt, f in r["formats"].items():
            rows.append((os.path.basename(r["source"]), fmt, f"{f['export_s']:.1f}", f"{f['matching']}/{f['compared']}",
                         f"{f['box_diff']:.1e}", f"{r['latency_ms']['eager']:.1f}", f"{r['latency_ms'][fmt]:.1f}",
                         f"{f['speedup']:.2f}x", f"{ap['eager']['AP']:.4f}" if ap else "n/a (initial weights)",
                         f"{ap[fmt]['AP']:.4f}" if ap else "n/a"))
    header = ("model", "format", "export s", "detections match", "max box diff px", "eager ms/img",
              "exported ms/img", "speed-up", "AP eager", "AP exported")
    return f"Machine: {machine()}; load {load_average()}; `{command}`\n\n" + markdown_table(header, rows)
