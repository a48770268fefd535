"""Speed of detkit's Faster R-CNN (Ren et al. 2015) against torchvision's, on the same work, in one process
(``tools/benchmark.py faster_rcnn``): inference and training throughput, peak memory, the data loader.

The two detectors share their trunk and RoI head and hold copies of each other's RPN head and box predictor
(:func:`detkit.benchmarks.torchvision_pair.build_pair`, whose module says where they still differ). Timings
are medians of repeated runs after warm-up; detkit and torchvision runs are interleaved in ABBA order
(:func:`detkit.benchmarks.common.time_interleaved`) so that background load and cache effects hit both
alike. Ratios are detkit / torchvision throughput (> 1: detkit faster).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from detkit.benchmarks.common import (Stopwatch, load_average, machine, markdown_table, peak_memory_mib,
                                     time_interleaved)
from detkit.benchmarks.torchvision_pair import Setup, agreement, build_pair, setup_config, synthetic_batch
from detkit.config import Config, ConfigError, ModelConfig, apply_overrides, from_dict, to_dict
from detkit.engine.devices import autocast
from detkit.models.assembly import build_detector


@dataclass
class Tuned:
    """detkit at settings of its own, for inference beside the two at the same settings (each side at its
    best: torchvision keeps its defaults). Same weights; ``overrides`` are ``model.*`` config overrides
    that leave every weight's shape alone (e.g. ``model.proposal_generator.post_nms_top_n_test=300``)."""

    overrides: tuple[str, ...] = ()
    channels_last: bool = False
    compile: bool = False


def tuned_model(setup: Setup, registries, cfg: ModelConfig, weights: nn.Module, tuned: Tuned) -> nn.Module:
    """detkit's detector for ``cfg`` with ``tuned``'s overrides, holding ``weights``' parameters (a copy),
    in eval mode; channels-last and compiled trunk as ``tuned`` asks."""
    bad = [o for o in tuned.overrides if not o.startswith("model.")]
    if bad:
        raise ConfigError(f"tuned settings: {bad[0]!r}: expected a model.* override (KEY=VALUE)")
    data = apply_overrides(to_dict(Config(model=cfg)), list(tuned.overrides))
    model = build_detector(from_dict(data, "tuned settings").model, registries, setup.num_classes)
    try:
        model.load_state_dict(weights.state_dict())
    except RuntimeError as exc:
        raise ConfigError(f"tuned settings {list(tuned.overrides)} change the model's weights: "
                          f"{str(exc).splitlines()[0]}") from exc
    model.eval()
    if tuned.channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if tuned.compile:
        model.trunk.compile()
    return model


def run(setup: Setup, registries, device: torch.device, batch_sizes: tuple[int, ...] = (1, 8),
        train_batch: int = 2, warmup: int = 2, iters: int = 5, amp: str = "none",
        channels_last: bool = False, compile_trunk: bool = False, tuned: Tuned | None = None) -> dict:
    """Time inference at each of ``batch_sizes`` and training steps at ``train_batch`` for both detectors.

    Returns ``{"setup", "inference": {bs: {"detkit", "torchvision", "ratio"}} (images/s),
    "train": {"detkit", "torchvision", "ratio"} (iterations/s, forward + backward + SGD step),
    "memory": {"train" | "inference": {"detkit", "torchvision"}} (MiB; see ``memory_kind``),
    "memory_kind", "agreement"}``; ratios are detkit / torchvision (> 1: detkit faster).
    ``compile_trunk`` compiles the trunk (``torch.compile``), which both detectors share, so both run it
    compiled; the warm-up runs absorb the compilation. ``tuned``: a third detector, detkit at its own
    settings (:class:`Tuned`), is timed for inference too: ``inference[bs]["tuned"]`` and
    ``["tuned_ratio"]`` (against torchvision at the same settings, i.e. its defaults).
    """
    if any(b < 1 for b in batch_sizes) or train_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_sizes={list(batch_sizes)}, train_batch={train_batch}")
    torch.manual_seed(0)
    cfg = setup_config(setup, registries)
    models = _pair_on(device, *build_pair(setup, registries, cfg), channels_last, compile_trunk)
    ours, theirs = models["detkit"], models["torchvision"]
    timed = dict(models)
    if tuned is not None:
        timed["tuned"] = tuned_model(setup, registries, cfg, ours, tuned).to(device)
    sizes = [float(s) for g in ours.proposal_generator.anchor_generators for s in g.sizes]
    result: dict = {
        "setup": asdict(setup) | {"anchor_sizes": sizes, "device": str(device), "amp": amp,
                                  "channels_last": channels_last, "compile": compile_trunk,
                                  "warmup": warmup, "iters": iters, "train_batch": train_batch,
                                  "tuned": None if tuned is None else asdict(tuned)},
        "memory_kind": ("CUDA max_memory_allocated" if device.type == "cuda"
                        else "peak RSS growth of the process during one call"),
    }
    images, _ = synthetic_batch(setup, 1, device, seed=2)
    result["agreement"] = agreement(ours, theirs, images)
    result["inference"], inference_memory = _inference_phase(setup, models, timed, batch_sizes, warmup, iters,
                                                             device, amp)
    result["train"], train_memory = _train_phase(setup, models, train_batch, warmup, iters, device, amp)
    result["memory"] = {"inference": inference_memory, "train": train_memory}
    return result


def _pair_on(device: torch.device, ours: nn.Module, theirs: nn.Module, channels_last: bool,
             compile_trunk: bool) -> dict[str, nn.Module]:
    """The pair on ``device``, both in channels-last and with the (shared) trunk compiled when asked."""
    ours.to(device)
    theirs.to(device)
    if channels_last:
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)  # its own RPN head copy; the trunk is shared
        ours.channels_last = True
        theirs.backbone.channels_last = True
    if compile_trunk:
        ours.trunk.compile()  # in place; torchvision's TrunkAsBackbone holds the same module
    return {"detkit": ours, "torchvision": theirs}


def _inference_phase(setup: Setup, models: dict[str, nn.Module], timed: dict[str, nn.Module],
                     batch_sizes: tuple[int, ...], warmup: int, iters: int, device: torch.device,
                     amp: str) -> tuple[dict, dict[str, float]]:
    """``({bs: images/s of each of ``timed`` and the ratios}, {name: peak MiB of ``models`` at the largest
    batch})``, in eval mode."""
    for model in timed.values():
        model.eval()

    def infer(model: nn.Module, images: list[Tensor]) -> None:
        with torch.no_grad(), autocast(device, amp):
            model(images)

    throughput = {bs: _inference_throughput(timed, synthetic_batch(setup, bs, device)[0], infer, warmup, iters,
                                            device) for bs in batch_sizes}
    images, _ = synthetic_batch(setup, max(batch_sizes), device)
    memory = {k: peak_memory_mib(lambda m=m: infer(m, images), device) for k, m in models.items()}
    return throughput, memory


def _train_phase(setup: Setup, models: dict[str, nn.Module], train_batch: int, warmup: int, iters: int,
                 device: torch.device, amp: str) -> tuple[dict[str, float], dict[str, float]]:
    """``({name: iterations/s, "ratio"}, {name: peak MiB of one step})`` of SGD steps at ``train_batch``.
    The trunk and RoI head are shared, so both optimizers move the same tensors; only speed is compared."""
    images, targets = synthetic_batch(setup, train_batch, device, seed=1)
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for k, m in models.items()}
    for model in models.values():
        model.train()

    def step(name: str) -> None:
        with autocast(device, amp):
            losses = models[name](images, targets)
        optimizers[name].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizers[name].step()

    seconds = time_interleaved({k: (lambda k=k: step(k)) for k in models}, warmup, iters, device)
    rates = {k: 1.0 / v for k, v in seconds.items()}
    rates["ratio"] = rates["detkit"] / rates["torchvision"]
    return rates, {k: peak_memory_mib(lambda k=k: step(k), device) for k in models}


def _inference_throughput(models: dict[str, nn.Module], images: list[Tensor], infer: Callable, warmup: int,
                          iters: int, device: torch.device) -> dict[str, float]:
    """Images/s of each of ``models`` on ``images`` (interleaved timing), with detkit's and, when timed,
    the tuned detkit's ratio to torchvision."""
    t = time_interleaved({k: (lambda m=m: infer(m, images)) for k, m in models.items()}, warmup, iters, device)
    ips = {k: len(images) / v for k, v in t.items()}
    ips["ratio"] = ips["detkit"] / ips["torchvision"]
    if "tuned" in ips:
        ips["tuned_ratio"] = ips["tuned"] / ips["torchvision"]
    return ips


def loader_throughput(registries, image_size: tuple[int, int] = (240, 320), num_images: int = 64,
                      batch_size: int = 2, num_workers: int = 2, batches: int = 30) -> float:
    """Images per second through detkit's training data pipeline (PNG decode, flip, collate) on
    ``detkit.data.synth`` images, with the trainer's sampler and worker setup; worker start-up excluded."""
    from detkit.data import build_transform
    from detkit.data.synth import synthesize
    from detkit.data.loading import PositionSeeded, StreamBatchSampler, build_dataset, to_tensor_batch

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, "coco", num_images, seed=0, image_size=image_size)
        ds = build_dataset({"name": "coco", "images": f"{tmp}/images", "annotations": f"{tmp}/annotations.json"},
                           registries, "benchmark", transform=build_transform(True, 0.5))
        sampler = StreamBatchSampler(list(range(len(ds))), batch_size, 0)
        loader = torch.utils.data.DataLoader(PositionSeeded(ds), batch_sampler=sampler, num_workers=num_workers,
                                             collate_fn=to_tensor_batch)
        it = iter(loader)
        next(it)  # workers started
        with Stopwatch(torch.device("cpu")) as watch:
            for _ in range(batches):
                next(it)
        del it  # shut the workers down before the directory goes
        return batches * batch_size / watch.seconds


def model_name(setup: dict) -> str:
    """The backbone, and the neck if any (``resnet50 + fpn``), as a results table names a model."""
    return setup["backbone"] + (f" + {setup['neck']}" if setup.get("neck") else "")


def markdown(results: list[dict], loader_ips: float | None, command: str) -> str:
    """A docs/benchmarks.md section: machine, command, throughput table with ratios, memory, agreement."""
    lines = [f"Machine: {machine()}; load average after the run: {load_average()}.", "",
             f"Command: `{command}`", "", _throughput_table(results)]
    for r in results:
        if r["setup"].get("tuned"):
            t = r["setup"]["tuned"]
            lines += ["", f"detkit tuned ({model_name(r['setup'])}): {', '.join(t['overrides']) or 'same settings'}"
                          f"{', channels-last' if t['channels_last'] else ''}{', compiled trunk' if t['compile'] else ''}"
                          f"; torchvision at its defaults (the same settings as the first rows)."]
    memory = [(model_name(r["setup"]), f"{phase} (b{_phase_batch(r, phase)})", f"{v['detkit']:.0f}",
               f"{v['torchvision']:.0f}") for r in results for phase, v in r["memory"].items()]
    lines += ["", f"Peak memory (MiB, {results[0]['memory_kind']}):", "",
              markdown_table(("backbone", "phase", "detkit", "torchvision"), memory)]
    lines += ["", "Agreement on one image, same weights, eval mode:", ""]
    for r in results:
        a = r["agreement"]
        lines.append(f"- {model_name(r['setup'])}: RPN objectness max |diff| {a['rpn_objectness_max_abs_diff']:.2g}, "
                     f"top proposal IoU {a['top_proposal_iou']:.3f}, top detection IoU {a['top_detection_iou']:.3f}, "
                     f"top score |diff| {a['top_score_abs_diff']:.3g}, top-10 matched {a['matched_fraction']:.2f}, "
                     f"detection boxes max |diff| {a['detection_box_max_abs_diff']:.2g}, "
                     f"labels equal {a['detection_labels_equal']:.2f}")
    if loader_ips is not None:
        r = results[0]
        b = r["setup"]["train_batch"]
        lines += ["", f"Data loader (synthetic COCO PNGs, decode + flip + collate, 2 workers): {loader_ips:.1f} "
                      f"images/s; detkit's training step at batch {b} consumes {b * r['train']['detkit']:.1f} images/s."]
    return "\n".join(lines)


def _phase_batch(result: dict, phase: str) -> int:
    """The batch a peak-memory figure was measured at: the largest inference batch, or the training batch."""
    return max(result["inference"]) if phase == "inference" else result["setup"]["train_batch"]


def _throughput_table(results: list[dict]) -> str:
    """Images/s (inference) and iterations/s (training) of both detectors per run, with the ratios in bold."""
    rows = []
    for r in results:
        s = r["setup"]
        prefix = (model_name(s), f"{s['image_size'][0]}x{s['image_size'][1]}", s["device"], s["amp"])
        for bs, v in r["inference"].items():
            rows.append((*prefix, f"infer b{bs} (img/s)", f"{v['detkit']:.2f}", f"{v['torchvision']:.2f}",
                         f"**{v['ratio']:.2f}**"))
            if "tuned" in v:
                rows.append((*prefix, f"infer b{bs}, detkit tuned (img/s)", f"{v['tuned']:.2f}",
                             f"{v['torchvision']:.2f}", f"**{v['tuned_ratio']:.2f}**"))
        t = r["train"]
        rows.append((*prefix, f"train b{s['train_batch']} (it/s)", f"{t['detkit']:.2f}", f"{t['torchvision']:.2f}",
                     f"**{t['ratio']:.2f}**"))
    return markdown_table(("backbone", "image", "device", "amp", "batch", "detkit", "torchvision", "ratio"), rows)
