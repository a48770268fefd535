"""detkit on a CUDA device: what the CPU suite cannot show.

Every test here is marked ``cuda`` and skipped where CUDA is missing; ``make gpu-check`` (tools/gpu_check.py)
runs them on a lent GPU and puts their results and measured figures in its report. Figures (host-device
synchronisations per training step, agreement margins) are appended as JSON lines to the file named by
``DETKIT_GPU_CHECK_FIGURES`` when it is set.

``DETKIT_CUDA_TESTS_DEVICE=cpu`` runs the same tests on the CPU (the CUDA-only checks inside them are
skipped): a way to check the tests' own logic on a machine without a GPU before spending GPU time on them.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from ddp_utils import free_port
from detkit.config import from_dict
from detkit.models.assembly import build_detector

DEVICE = torch.device(os.environ.get("DETKIT_CUDA_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="CUDA is not available")]
CPU = torch.device("cpu")
NAMES = ["a", "b", "c"]


def record(key: str, value) -> None:
    """Append one measured figure to the gpu-check report's figures file (when one is named)."""
    path = os.environ.get("DETKIT_GPU_CHECK_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")


@pytest.fixture(autouse=True)
def strict_float32():
    """No TF32: CPU/CUDA agreement is checked at float32 precision."""
    if not ON_CUDA:
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def model_cfg(**model):
    base = {"backbone": {"name": "tiny", "frozen_bn": True, "args": {"widths": [8, 16, 16, 32, 32], "hidden": 32}},
            "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64]}, "pre_nms_top_n_train": 300,
                                   "post_nms_top_n_train": 100, "pre_nms_top_n_test": 200,
                                   "post_nms_top_n_test": 50, "min_size": 2, "batch_size_per_image": 64},
            "roi_heads": {"batch_size_per_image": 32, "score_thresh": 0.0},
            "transform": {"min_size": 96, "max_size": 128}}
    for key, value in model.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict({"model": base}).model


def batch(device: torch.device, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=g).to(device) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]], device=device),
                "labels": torch.tensor([1, 2], device=device)} for _ in range(n)]
    return images, targets


def detector(registries, seed: int = 0, **model):
    torch.manual_seed(seed)
    return build_detector(model_cfg(**model), registries, len(NAMES), NAMES)


# ----------------------------------------------------------------------------- ops and models


def test_torchvision_ops_agree_between_cpu_and_cuda():
    from torchvision.ops import batched_nms, box_iou, nms, roi_align, roi_pool

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(500, 2, generator=g) * 80], 1)
    scores = torch.rand(500, generator=g)
    idxs = torch.randint(0, 5, (500,), generator=g)
    features = torch.randn(2, 16, 32, 40, generator=g)
    rois = torch.cat([torch.randint(0, 2, (300, 1), generator=g).float(), boxes[:300] / 2], 1)
    moved = [t.to(DEVICE) for t in (boxes, scores, idxs, features, rois)]
    assert torch.equal(nms(boxes, scores, 0.5), nms(moved[0], moved[1], 0.5).cpu())
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), batched_nms(moved[0], moved[1], moved[2], 0.5).cpu())
    torch.testing.assert_close(box_iou(boxes, boxes), box_iou(moved[0], moved[0]).cpu())
    for op, kwargs in ((roi_align, {"sampling_ratio": 2, "aligned": True}), (roi_pool, {})):
        torch.testing.assert_close(op(features, rois, (7, 7), 0.25, **kwargs),
                                   op(moved[3], moved[4], (7, 7), 0.25, **kwargs).cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("detector_name,extractor", [
    ("faster_rcnn", {"name": "roi_align", "sampling_ratio": 2}),
    ("faster_rcnn", {"name": "roi_pool"}),
    ("two_stage", {"name": "spp", "levels": [3, 2, 1]}),
    ("rcnn", {"name": "warp", "warp_size": 48, "context_padding": 4}),
])
def test_each_roi_extractor_trains_and_detects_on_the_device(registries, detector_name, extractor):
    extra = {}
    if extractor["name"] == "warp":  # R-CNN: windows cut from the original image, proposals given
        extra = {"proposal_generator": "selective_search", "transform": {"min_size": 0}}
    model = detector(registries, detector=detector_name, roi_extractor=extractor, **extra).to(DEVICE)
    images, targets = batch(DEVICE)
    proposals = None
    if extra:
        proposals = [torch.tensor([[8.0, 10.0, 62.0, 72.0], [0, 0, 128, 96], [48, 18, 118, 92]], device=DEVICE)] * 2
    model.train()
    losses = model(images, targets, proposals)
    assert all(v.device.type == DEVICE.type and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == DEVICE.type for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    with torch.no_grad():
        dets = model(images, None, proposals)
    for det in dets:
        assert det["boxes"].device.type == DEVICE.type and det["boxes"].shape[1] == 4
        assert len(det["boxes"]) > 0  # score_thresh 0: every image keeps detections


def test_fpn_with_a_light_head_trains_and_detects_on_the_device(registries):
    model = detector(registries, neck={"name": "fpn", "in_strides": [4, 8, 16], "out_channels": 16},
                     proposal_generator={"anchors": {"sizes": [16, 32, 64, 128]}, "straddle_thresh": -1.0},
                     box_head={"name": "two_fc", "fc_dim": 32}).to(DEVICE)
    images, targets = batch(DEVICE)
    model.train()
    losses = model(images, targets)
    assert all(v.device.type == DEVICE.type and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert model.trunk.neck.lateral[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert all(d["boxes"].device.type == DEVICE.type and len(d["boxes"]) > 0 for d in dets)


def test_detections_agree_between_cpu_and_cuda(registries):
    model = detector(registries, seed=3).eval()
    images, _ = batch(CPU, n=1, seed=4)
    with torch.no_grad():
        on_cpu = model(images)[0]
        on_device = model.to(DEVICE)([images[0].to(DEVICE)])[0]
    on_device = {k: v.cpu() for k, v in on_device.items()}
    top = min(10, len(on_cpu["scores"]))
    assert top > 0
    torch.testing.assert_close(on_device["scores"][:top], on_cpu["scores"][:top], atol=1e-4, rtol=1e-4)
    assert torch.equal(on_device["labels"][:top], on_cpu["labels"][:top])
    box_diff = float((on_device["boxes"][:top] - on_cpu["boxes"][:top]).abs().max())
    record("cpu_cuda_top10_box_max_abs_diff_px", box_diff)
    record("cpu_cuda_top10_score_max_abs_diff", float((on_device["scores"][:top] - on_cpu["scores"][:top]).abs().max()))
    assert box_diff < 0.05


def test_channels_last_gives_the_same_detections(registries):
    model = detector(registries, seed=5).to(DEVICE).eval()
    images, _ = batch(DEVICE, n=2, seed=6)
    with torch.no_grad():
        plain = model(images)
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
        last = model(images)
    for a, b in zip(plain, last):
        top = min(10, len(a["scores"]))
        torch.testing.assert_close(b["scores"][:top], a["scores"][:top], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b["boxes"][:top], a["boxes"][:top], atol=0.05, rtol=0)


def test_compiled_trunk_matches_the_eager_one(registries):
    model = detector(registries, seed=7).to(DEVICE).eval()
    images, targets = batch(DEVICE, n=2, seed=8)
    with torch.no_grad():
        eager = model(images)
        features = model.trunk(model.transform(images)[0].tensors)
    model.trunk.compile()
    with torch.no_grad():
        compiled = model(images)
        compiled_features = model.trunk(model.transform(images)[0].tensors)
    torch.testing.assert_close(compiled_features, features, atol=1e-4, rtol=1e-4)
    for a, b in zip(eager, compiled):
        top = min(5, len(a["scores"]))
        torch.testing.assert_close(b["scores"][:top], a["scores"][:top], atol=1e-3, rtol=1e-3)
    model.train()  # and a training step runs through the compiled trunk
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def _sync_events(fn, capfd) -> list[str]:
    """Where ``fn`` makes synchronising CUDA calls (``torch.cuda.set_sync_debug_mode("warn")``): the Python
    file:line of each one warned on the calling thread, and ``"autograd engine thread"`` for each one the
    backward pass's own threads print to stderr (they cannot raise Python warnings)."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    events = [f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    stderr = capfd.readouterr().err
    return events + ["autograd engine thread"] * stderr.count("called a synchronizing CUDA operation")


@pytest.mark.skipif(not ON_CUDA, reason="host-device synchronisation exists only on CUDA")
def test_host_device_syncs_per_training_step(registries, capfd):
    """Counted, not only asserted: the report shows the syncs of one training step of detkit's Faster
    R-CNN and of torchvision's on the same modules, and where detkit's happen. Moving a pinned batch to the
    device and the optimizer step add none."""
    from collections import Counter

    from detkit.benchmarks import torchvision_pair as pair

    setup = pair.Setup(image_size=(96, 128), anchor_sizes=(16.0, 32.0, 64.0), num_classes=3)
    ours, theirs = pair.build_pair(setup, registries)
    ours.to(DEVICE).train()
    theirs.to(DEVICE).train()
    images_cpu, targets_cpu = pair.synthetic_batch(setup, 2, CPU, seed=1)
    images_cpu = [im.pin_memory() for im in images_cpu]
    targets_cpu = [{k: v.pin_memory() for k, v in t.items()} for t in targets_cpu]
    optimizers = {m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for m in (ours, theirs)}
    schedulers = {m: torch.optim.lr_scheduler.LambdaLR(o, lambda it: 1.0) for m, o in optimizers.items()}
    moved = {}

    def move():
        moved["images"] = [im.to(DEVICE, non_blocking=True) for im in images_cpu]
        moved["targets"] = [{k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                            for t in targets_cpu]

    def forward(model):
        moved["losses"] = model(moved["images"], moved["targets"])

    def backward(model):
        optimizers[model].zero_grad(set_to_none=True)
        sum(moved["losses"].values()).backward()

    def optimizer_step(model):
        optimizers[model].step()
        schedulers[model].step()

    for model in (ours, theirs):  # warm-up: cuDNN autotuning and first-call allocations
        for _ in range(2):
            move()
            forward(model)
            backward(model)
            optimizer_step(model)
    # The first counted call on torch 2.11 reported one event inside torch/cuda/__init__.py whatever it ran
    # (a batch move in one run, detkit's forward in the next): count nothing first to absorb it.
    _sync_events(lambda: None, capfd)
    found = {}
    # detkit as the trainer runs it (each target carries its sample_seed: the seeded samplers) and as a
    # user calling the model without seeds runs it (the global-RNG samplers), then torchvision.
    for name, model, seeded in (("detkit", ours, True), ("detkit_unseeded", ours, False),
                                ("torchvision", theirs, False)):
        for i, t in enumerate(targets_cpu):
            t.pop("sample_seed", None)
            if seeded:
                t["sample_seed"] = 1000 + i
        move()
        found[f"{name}_forward"] = _sync_events(lambda: forward(model), capfd)
        found[f"{name}_backward"] = _sync_events(lambda: backward(model), capfd)
        found[f"{name}_optimizer"] = _sync_events(lambda: optimizer_step(model), capfd)
    record("syncs_per_train_step", {k: len(v) for k, v in found.items()})
    for name in ("detkit", "detkit_unseeded"):
        record(f"sync_sites_{name}", dict(Counter(found[f"{name}_forward"] + found[f"{name}_backward"]
                                                  + found[f"{name}_optimizer"]).most_common()))
    assert found["detkit_optimizer"] == [] and found["detkit_forward"]  # the count works: NMS sizes are dynamic
    # Moving the batch must not synchronise: in "error" mode a sync raises where it happens.
    torch.cuda.set_sync_debug_mode("error")
    try:
        move()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- training through the trainer


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from detkit.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(str(root), "coco", 4, seed=5, image_size=(96, 128))
    return {"name": "coco", "images": str(root / "images"), "annotations": str(root / "annotations.json")}


def train_config(synth_data, work_dir, **train):
    model = {"backbone": {"name": "tiny", "frozen_bn": True, "args": {"widths": [8, 16, 16, 32, 32], "hidden": 32}},
             "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64]}, "pre_nms_top_n_train": 300,
                                    "post_nms_top_n_train": 100, "pre_nms_top_n_test": 100,
                                    "post_nms_top_n_test": 30, "min_size": 2, "batch_size_per_image": 64},
             "roi_heads": {"batch_size_per_image": 32}, "transform": {"min_size": 96, "max_size": 128}}
    return {"model": model,
            "data": {"train": synth_data, "test": synth_data, "batch_size": 2, "num_workers": 0,
                     "augment": {"hflip": 0.0}},
            "train": {"work_dir": str(work_dir), "device": str(DEVICE), "max_iters": 40, "lr": 0.01,
                      "warmup_iters": 0, "steps": [1000], "log_period": 1, "checkpoint_period": 0,
                      "eval_at_end": False, **train}}


def _train(data: dict, registries):
    from detkit.training import train

    return train(from_dict(data), registries, progress=False)


def _losses(work_dir) -> list[float]:
    with open(os.path.join(work_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["total"] for line in f if line.strip()]


@pytest.mark.parametrize("amp", ["fp16", "bf16", "none"])
def test_training_lowers_the_loss(registries, synth_data, tmp_path, amp):
    """fp16 with the gradient scaler, bf16 and fp32 training steps on the device lower the loss on a
    4-image set (the mean of the last 10 logged losses against the first 10)."""
    work = tmp_path / amp
    _train(train_config(synth_data, work, amp=amp), registries)
    losses = _losses(work)
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    record(f"train_loss_first10_last10_{amp}", [round(first, 4), round(last, 4)])
    assert last < 0.8 * first, losses


def test_channels_last_and_compiled_training_through_the_engine(registries, synth_data, tmp_path):
    work = tmp_path / "cl_compile"
    _train(train_config(synth_data, work, channels_last=True, compile=True, amp="bf16", max_iters=20), registries)
    losses = _losses(work)
    assert len(losses) == 20 and all(v == v for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_checkpoint_saved_on_the_device_loads_and_detects_on_cpu(registries, synth_data, tmp_path):
    from detkit.models.loading import model_from_checkpoint

    work = tmp_path / "ckpt"
    result = _train(train_config(synth_data, work, max_iters=5), registries)
    model, _, ckpt = model_from_checkpoint(result["checkpoint"], registries, CPU)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    trained = result["model"].eval()
    images, _ = batch(CPU, n=1, seed=9)
    with torch.no_grad():
        on_cpu = model(images)[0]
        on_device = trained([images[0].to(DEVICE)])[0]
    top = min(5, len(on_cpu["scores"]))
    torch.testing.assert_close(on_cpu["scores"][:top], on_device["scores"][:top].cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ON_CUDA, reason="NCCL needs CUDA")
def test_one_process_nccl_ddp_matches_plain_training(registries):
    """DistributedDataParallel over NCCL (world size 1), wrapped as the trainer wraps it, takes the same
    steps as the bare model."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        images, targets = batch(DEVICE, n=2, seed=10)
        finals = []
        for wrap in (False, True):
            model = detector(registries, seed=11).to(DEVICE).train()
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[DEVICE.index or 0]) if wrap else model
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
            for step in range(3):
                torch.manual_seed(100 + step)  # the same anchor/RoI samples in both runs
                losses = net(images, targets)
                opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                opt.step()
            finals.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        for key in finals[0]:
            torch.testing.assert_close(finals[1][key], finals[0][key], atol=1e-5, rtol=1e-5, msg=key)
    finally:
        dist.destroy_process_group()
