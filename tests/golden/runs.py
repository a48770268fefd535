"""The golden runs: one short fixed-seed CPU training run per training schedule, and what is recorded of it.

A golden pins the numbers a schedule produces today, so that a refactor of the training code that is
meant to change nothing can show that it changed nothing, bit for bit. Each schedule is a drastically
shrunk copy of its ``configs/*_tiny_synth.yaml`` (a tiny backbone, eight 96x128 synthetic images, three
iterations per stage, a few proposals). :func:`run_schedule` trains it in a fresh directory and returns,
for every stage (every ``final.pth`` the schedule writes), the logged values of every iteration
(``log.jsonl`` at ``log_period: 1``; the SVM stage logs none) and the final state dict, which for the
SVM stage holds the fitted SVMs and box regressors. ``tests/golden/record.py`` saves that as
``tests/golden/<schedule>.pt``; ``tests/training/test_golden.py`` runs it again and compares.

Determinism on the CPU: one thread for torch's intra-op work, for the BLAS/OpenMP pools numpy and
scikit-learn use, and for OpenCV; every random draw of the training loop is seeded (``train.seed``,
per-sample seeds), selective search re-seeds ``rand()`` before every image, liblinear runs with
``random_state=0``, and the loader has no worker processes.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
RECORD_COMMAND = "python tests/golden/record.py"
NUM_IMAGES = 8
IMAGE_SIZE = (96, 128)  # (h, w) of the synthetic images
DATA_SEED = 0
# log.jsonl fields that are not recorded: "iter" is the index; the others are wall clock and memory
LOG_SKIP = ("iter", "time", "sec_per_iter", "data_sec", "eta_sec", "images_per_sec", "peak_mem_mb")

# Kept in the config layout of the recording (before parts owned their settings): the runs check that such
# configs still load into the same models.
TINY = {"name": "tiny", "args": {"widths": [8, 8, 16, 16, 16], "hidden": 16}}
SS = {"mode": "fast", "max_side": 128, "top_k": 24, "min_size": 4, "num_workers": 1}
SVM_HEAD = {"name": "svm", "batch_size_per_image": 16, "score_thresh": -1.0, "nms_thresh": 0.3}
SVM = {"retrain_limit": 50, "max_iter": 200}


def _base_config(root: str) -> dict:
    data = os.path.join(root, "data")
    return {
        "model": {
            "backbone": TINY,
            "anchors": {"sizes": [16, 32, 64], "aspect_ratios": [0.5, 1.0, 2.0]},
            "rpn": {"pre_nms_top_n_train": 200, "post_nms_top_n_train": 40, "pre_nms_top_n_test": 100,
                    "post_nms_top_n_test": 20, "min_size": 2, "batch_size_per_image": 32},
            "roi_head": {"batch_size_per_image": 16},
            "selective_search": {**SS, "cache_dir": os.path.join(root, "proposals")},
            "transform": {"min_size": 96, "max_size": 128},
        },
        "data": {"train": {"name": "coco", "images": os.path.join(data, "images"),
                           "annotations": os.path.join(data, "annotations.json")},
                 "batch_size": 2, "num_workers": 0},
        # Three iterations: one of warmup, one at the base rate, one after the step.
        "train": {"work_dir": os.path.join(root, "work"), "device": "cpu", "max_iters": 3, "lr": 0.01,
                  "warmup_iters": 1, "warmup_factor": 0.1, "steps": [2], "log_period": 1, "checkpoint_period": 0,
                  "eval_at_end": False, "seed": 0},
    }


# Each schedule: what it changes in the base config. The comments name the config it shrinks.
SCHEDULES: dict[str, dict] = {
    # configs/faster_rcnn_tiny_synth.yaml: RPN and Fast R-CNN trained jointly (approximate joint training).
    "faster_rcnn": {},
    # configs/faster_rcnn_4step_tiny_synth.yaml: alternating training, two RPN proposal caches.
    "faster_rcnn_4step": {"train": {"schedule": "four_step", "four_step_iters": [3, 3, 2, 2]}},
    # configs/spp_net_tiny_synth.yaml: softmax fine-tuning, then SVMs with hard-negative mining and ridge
    # box regression on spatial-pyramid-pooled features.
    "spp_net_svm": {"model": {"detector": "spp_net", "proposal_generator": "selective_search",
                              "roi_extractor": {"name": "spp", "levels": [2, 1]}, "roi_head": SVM_HEAD,
                              "svm": SVM}},
    # configs/fast_rcnn_tiny_synth.yaml: RoI pooling over precomputed selective-search proposals.
    "fast_rcnn": {"model": {"detector": "fast_rcnn", "proposal_generator": "selective_search",
                            "roi_extractor": {"name": "roi_pool"}}},
    # configs/rcnn_tiny_synth.yaml: every window warped through the whole CNN; fine-tuning, then SVMs and
    # box regression on the warped windows' features.
    "rcnn_warp": {"model": {"detector": "rcnn", "proposal_generator": "selective_search",
                            "roi_extractor": {"name": "warp", "warp_size": 32, "context_padding": 2,
                                              "warp_batch": 64},
                            "roi_head": {**SVM_HEAD, "bg_iou_thresh_lo": 0.0, "box_loss_weight": 0.0},
                            "transform": {"min_size": 0}, "svm": SVM}},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def schedule_config(name: str, root: str) -> dict:
    """The config (a plain dict) of schedule ``name``, with its data, proposals and work dir under ``root``."""
    if name not in SCHEDULES:
        raise KeyError(f"unknown golden schedule {name!r}; the schedules are {', '.join(SCHEDULES)}")
    return _merge(_base_config(root), SCHEDULES[name])


def environment() -> dict:
    """What bit-exact agreement depends on: exact comparison needs the same ``torch`` and ``cpu_capability``;
    the rest is reported when a comparison fails."""
    import cv2
    import numpy
    import sklearn

    return {"torch": str(torch.__version__), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "cpu": cpu_model(),
            "numpy": numpy.__version__, "sklearn": sklearn.__version__, "opencv": cv2.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def cpu_model() -> str:
    """The processor's model name: two CPUs of one capability (AVX512) but of other makes round differently in
    oneDNN/BLAS kernels, so bit-exact agreement needs the same model."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


@contextlib.contextmanager
def deterministic_cpu():
    """One thread everywhere (torch, BLAS/OpenMP pools, OpenCV) for the duration; restored afterwards."""
    import cv2
    from threadpoolctl import threadpool_limits

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def _read_log(path: str) -> dict:
    """``log.jsonl`` -> ``{"iters": Tensor[n] int64, "values": {key: Tensor[n] float64}}`` (every logged loss,
    ``total`` and ``lr``, per iteration)."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    keys = [k for k in records[0] if k not in LOG_SKIP]
    for r in records:
        if [k for k in r if k not in LOG_SKIP] != keys:
            raise ValueError(f"{path}: iteration {r.get('iter')} logs {sorted(r)}, the first logged {sorted(keys)}")
    return {"iters": torch.tensor([r["iter"] for r in records], dtype=torch.int64),
            "values": {k: torch.tensor([float(r[k]) for r in records], dtype=torch.float64) for k in keys}}


def _collect(work_dir: str) -> dict:
    """Every stage under ``work_dir`` (a directory with a ``final.pth``, named by its path below ``work_dir``;
    ``"final"``, the schedule's own result, comes last): its log (None when it has none) and its state dict."""
    from detkit.engine.checkpoint import load_checkpoint

    stages = {}
    for directory, _, files in sorted(os.walk(work_dir)):
        if "final.pth" not in files:
            continue
        rel = os.path.relpath(directory, work_dir)
        name = "final" if rel == "." else rel.replace(os.sep, "/")
        log_path = os.path.join(directory, "log.jsonl")
        state = load_checkpoint(os.path.join(directory, "final.pth"))["model"]
        stages[name] = {"log": _read_log(log_path) if os.path.isfile(log_path) else None,
                        "state": {k: v.detach().clone() for k, v in state.items()}}
    return dict(sorted(stages.items(), key=lambda item: item[0] == "final"))  # in training order


def run_schedule(name: str, root: str) -> dict:
    """Train golden schedule ``name`` in the empty directory ``root`` (single-threaded, on the CPU) and
    return what is recorded: ``{"schedule", "environment", "stages": {stage: {"log", "state"}}}``."""
    from detkit.config import from_dict
    from detkit.data.synth import synthesize
    from detkit.training import train
    from detkit.plugins import get_registries

    cfg_dict = schedule_config(name, root)
    with deterministic_cpu():
        synthesize(os.path.join(root, "data"), "coco", NUM_IMAGES, DATA_SEED, IMAGE_SIZE)
        cfg = from_dict(copy.deepcopy(cfg_dict), source=f"golden schedule {name}")
        train(cfg, get_registries(), resume=None, progress=False)
    return {"schedule": name, "environment": environment(), "config": schedule_config(name, "<root>"),
            "stages": _collect(cfg_dict["train"]["work_dir"])}


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.pt")


def _share_equal_tensors(stages: dict) -> dict:
    """The same stages, where a tensor bit-identical to one of an earlier stage under the same key is that
    tensor object (``torch.save`` then stores it once: the 4-step result repeats its steps' weights, the
    SVM detector its fine-tuned trunk)."""
    seen: dict[str, list[torch.Tensor]] = {}
    out = {}
    for stage, rec in stages.items():
        state = {}
        for key, value in rec["state"].items():
            same = next((t for t in seen.get(key, []) if t.dtype == value.dtype and t.shape == value.shape
                         and torch.equal(t, value)), None)
            if same is None:
                seen.setdefault(key, []).append(value)
                same = value
            state[key] = same
        out[stage] = {**rec, "state": state}
    return out


def save_golden(result: dict, path: str) -> None:
    torch.save({**result, "stages": _share_equal_tensors(result["stages"])}, path)


def load_golden(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def relative_to_repo(path: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.dirname(GOLDEN_DIR)))
