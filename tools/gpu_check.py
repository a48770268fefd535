#!/usr/bin/env python
"""The GPU figures in one prepared run: ``make gpu-check`` (or ``python tools/gpu_check.py --out DIR``).

Steps, each a subprocess with its own time budget inside one overall budget (``--budget``, 450 s by
default; a step that would start with under 20 s left is skipped and reported so):

1. ``env``: GPU name, driver, CUDA, cuDNN, torch and torchvision versions; torchvision's NMS and RoIAlign
   run on the device and agree with the CPU.
2. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (forward/backward with each RoI extractor, CPU/CUDA
   agreement of the ops and of a detector's detections, fp16 + gradient scaler / bf16 / fp32 training
   through the trainer, channels-last, ``torch.compile`` of the trunk, one-process NCCL DDP, a CUDA
   checkpoint loaded on the CPU, host-device synchronisations per training step). Figures the tests
   measure come into the report.
3. ``bench_*``: ``tools/benchmark.py faster_rcnn`` against torchvision for the tiny, VGG-16 and ResNet-50
   (C4) backbones at 600x1000: fp32, bf16, bf16 + channels-last, and bf16 + channels-last + compiled
   trunk (VGG-16); R50-FPN (``--neck fpn``, as ``fasterrcnn_resnet50_fpn``) in fp32; inference batch 1
   and 8, training batch 2, peak CUDA memory.
4. ``pipelines_*``: ``tools/benchmark.py pipelines`` for R-CNN, SPP-net, Fast R-CNN and Faster R-CNN with
   VGG-16 on synthetic 375x500 images (VOC's typical size; each method resizes as its paper did),
   untrained weights (time per image only), in the form of the Faster R-CNN paper's timing table, in
   fp32 and in bf16.

Writes ``report.md`` and ``report.json`` (and ``gpu_check.log``, every step's output) to ``--out``, which
must not already hold a report (``--overwrite`` replaces it). Exits 1 if a test failed or a step failed
or ran out of time, 2 on bad arguments (e.g. ``--device cuda`` without CUDA), 0 otherwise.

``--device cpu --quick`` (``make gpu-check DEVICE=cpu QUICK=1``) is the dry run that ``make test`` runs:
tiny sizes, one repetition, the CUDA tests run on the CPU (``DETKIT_CUDA_TESTS_DEVICE=cpu``), so the script
cannot rot between GPU sessions. ``--quick`` reports the budgets but does not enforce them (no step is
stopped or skipped for time): the dry run checks that every step works, and a busy machine must not fail it.

Preparing a GPU machine. The script installs nothing. On a machine with internet, ``make setup`` then
``make gpu-check``. On a bare machine that has CUDA torch and torchvision but no internet (the lent GPU
machine), bring wheels made on a machine that has internet, for that machine's Python (here 3.12):
``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl
opencv-contrib-python-headless==4.10.0.84 albumentations albucore pydantic pydantic_core annotated-types
typing-inspection simsimd stringzilla pycocotools`` and ``pip wheel --no-deps -w .whl .`` (detkit itself,
for its plugin entry points), then on the GPU machine::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site make gpu-check

(opencv-contrib 4.10 rather than 5.x only because its wheel is smaller: selective search is the same.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_VGG16_MS = {"proposal": 10, "conv": 141, "region": 47, "total": 198}  # Ren et al. 2015, Table 5, K40
PIPELINE_CONFIGS = [("R-CNN", "configs/rcnn_alexnet_voc07.yaml"), ("SPP-net", "configs/spp_net_zf5_voc07.yaml"),
                    ("Fast R-CNN", "configs/fast_rcnn_vgg16_voc07.yaml"),
                    ("Faster R-CNN", "configs/faster_rcnn_vgg16_voc07.yaml")]
QUICK_PIPELINE_CONFIGS = [("R-CNN", "configs/rcnn_tiny_synth.yaml"), ("SPP-net", "configs/spp_net_tiny_synth.yaml"),
                          ("Fast R-CNN", "configs/fast_rcnn_tiny_synth.yaml"),
                          ("Faster R-CNN", "configs/faster_rcnn_tiny_synth.yaml")]


@dataclass
class Step:
    name: str
    budget: float  # seconds
    argv: list[str]
    title: str
    env: dict = field(default_factory=dict)
    status: str = "not run"  # ok | failed (exit N) | timed out | skipped (...)
    seconds: float = 0.0
    result: object = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="work_dirs/gpu_check", help="directory for report.md, report.json and the log")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: a dry run of the script)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (the CPU dry run)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--env-json", help=argparse.SUPPRESS)  # internal: the env step writes its facts here
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- step 1: environment


def environment(device_name: str) -> dict:
    """Versions, the device, and torchvision's NMS / RoIAlign run on it against the CPU."""
    import platform

    import torch
    import torchvision
    from torchvision.ops import nms, roi_align

    facts = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "cpu_count": os.cpu_count()}
    device = torch.device(device_name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                  "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                  "cudnn": torch.backends.cudnn.version()}
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            facts["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            facts["driver"] = "unknown (nvidia-smi not found)"
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2000, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + 10 + torch.rand(2000, 2, generator=g) * 100], 1)
    scores = torch.rand(2000, generator=g)
    features = torch.randn(1, 64, 38, 50, generator=g)
    rois = torch.cat([torch.zeros(300, 1), boxes[:300]], 1)
    keep_cpu = nms(boxes, scores, 0.7)
    keep_dev = nms(boxes.to(device), scores.to(device), 0.7).cpu()
    pooled_cpu = roi_align(features, rois, (7, 7), 1 / 16, 2)
    pooled_dev = roi_align(features.to(device), rois.to(device), (7, 7), 1 / 16, 2).cpu()
    facts["ops"] = {"nms_device": str(device), "nms_equal_to_cpu": bool(torch.equal(keep_cpu, keep_dev)),
                    "nms_kept": len(keep_cpu),
                    "roi_align_max_abs_diff_vs_cpu": float((pooled_cpu - pooled_dev).abs().max())}
    return facts


# ----------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace, tmp: str) -> list[Step]:
    py = sys.executable
    bench = [py, os.path.join(ROOT, "tools", "benchmark.py")]
    dev = ["--device", args.device]
    steps = [Step("env", 60, [py, os.path.abspath(__file__), "--env-json", f"{tmp}/env.json", *dev],
                  "Environment and torchvision ops on the device")]
    test_env = {"DETKIT_GPU_CHECK_FIGURES": f"{tmp}/figures.jsonl"}
    if args.device.startswith("cpu"):
        test_env["DETKIT_CUDA_TESTS_DEVICE"] = "cpu"
    steps.append(Step("cuda_tests", 180, [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                          os.path.join(ROOT, "tests", "test_cuda.py"),
                                          f"--junitxml={tmp}/cuda_tests.xml"],
                      "Tests marked cuda", env=test_env))
    if args.quick:
        size, backbones, batches, reps = "96x128", ["tiny"], ["--batch-sizes", "1,2", "--train-batch", "1"], \
            ["--iters", "1", "--warmup", "0"]
        compile_backbone, pipeline_configs, synth, images = "tiny", QUICK_PIPELINE_CONFIGS, "96x128", ["1", "0"]
        fpn_backbone = "tiny"
    else:
        size, backbones, batches, reps = "600x1000", ["tiny", "vgg16", "resnet50"], \
            ["--batch-sizes", "1,8", "--train-batch", "2"], ["--iters", "10", "--warmup", "3"]
        compile_backbone, pipeline_configs, synth, images = "vgg16", PIPELINE_CONFIGS, "375x500", ["3", "1"]
        fpn_backbone = "resnet50"
    common = ["faster_rcnn", "--image-size", size, *batches, *reps, "--no-loader", *dev]
    for name, extra, budget, title, chosen in [
            ("bench_fp32", [], 100, "fp32", backbones),
            ("bench_fpn_fp32", ["--neck", "fpn"], 90, "FPN (R50-FPN as fasterrcnn_resnet50_fpn), fp32",
             [fpn_backbone]),
            ("bench_bf16", ["--amp", "bf16"], 80, "bf16", backbones),
            ("pipelines_fp32", None, 100, "fp32", None),
            ("bench_bf16_cl", ["--amp", "bf16", "--channels-last"], 80, "bf16 + channels-last", backbones),
            ("pipelines_bf16", ["--amp", "bf16"], 60, "bf16", None),
            ("bench_best", ["--amp", "bf16", "--channels-last", "--compile"], 120,
             "bf16 + channels-last + compiled trunk", [compile_backbone])]:
        out = f"{tmp}/{name}.json"
        if chosen is not None:
            steps.append(Step(name, budget, [*bench, *common, "--backbone", ",".join(chosen), *extra,
                                             "--output", out],
                              f"Faster R-CNN against torchvision, {title}"))
            continue
        entries = [f"{label}={os.path.join(ROOT, path)}" for label, path in pipeline_configs]
        overrides = [] if args.quick else ["--set", "model.backbone.name=vgg16"]
        steps.append(Step(name, budget, [*bench, "pipelines", *entries, *overrides, "--synthetic", synth,
                                         "--images", images[0], "--warmup", images[1], *(extra or []), *dev,
                                         "--output", out],
                          f"The lineage's timing table, {title}"))
    return steps


# ----------------------------------------------------------------------------- running


def run_step(step: Step, remaining: float, log, enforce: bool = True) -> None:
    """Run ``step`` within its budget and the ``remaining`` seconds of the whole run; ``enforce=False`` (the
    dry run) runs it to the end whatever it takes."""
    if enforce and remaining < 20:
        step.status = f"skipped (overall budget spent: {remaining:.0f} s left)"
        return
    timeout = min(step.budget, remaining) if enforce else None
    limit = f"budget {timeout:.0f} s" if enforce else f"budget {step.budget:.0f} s, not enforced"
    log.write(f"\n===== {step.name}: {' '.join(step.argv)} ({limit})\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **step.env}
    start = time.monotonic()
    # A session of its own, so that a timeout stops the step's children (workers, compilers) too.
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
        step.status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        step.status = f"timed out after {timeout:.0f} s"
    step.seconds = round(time.monotonic() - start, 1)
    log.write(f"===== {step.name}: {step.status} in {step.seconds} s\n")
    log.flush()
    print(f"[gpu-check] {step.name}: {step.status} ({step.seconds} s)", flush=True)


def junit_results(path: str) -> list[dict]:
    """Each test case of a pytest JUnit XML file: name, outcome (passed | failed | error | skipped), seconds."""
    if not os.path.isfile(path):
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:300] if node.get("message") else ""
                break
        cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})
    return cases


def figures(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {r["key"]: r["value"] for r in (json.loads(line) for line in f if line.strip())}


def collect(steps: list[Step], tmp: str) -> None:
    for step in steps:
        if step.name == "cuda_tests":
            step.result = {"tests": junit_results(f"{tmp}/cuda_tests.xml"), "figures": figures(f"{tmp}/figures.jsonl")}
            continue
        path = f"{tmp}/{step.name}.json"
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                step.result = json.load(f)


# ----------------------------------------------------------------------------- report


def _model(setup: dict) -> str:
    from detkit.benchmarks.torchvision_parity import model_name

    return model_name(setup)


def _bench_table(steps: list[Step]) -> str | None:
    """Every faster_rcnn run: throughputs of both models with the ratios, peak memory; None without runs."""
    from detkit.benchmarks.common import markdown_table

    runs = [r for s in steps if s.name.startswith("bench_") and s.result for r in s.result["results"]]
    if not runs:
        return None
    batches = sorted(runs[0]["inference"], key=int)
    header = ("backbone", "settings", *(f"infer b{b} img/s (detkit / tv / ratio)" for b in batches),
              f"train b{runs[0]['setup']['train_batch']} it/s", "peak MiB infer (detkit / tv)", "peak MiB train")
    rows = []
    for step in steps:
        if not step.name.startswith("bench_") or not step.result:
            continue
        for r in step.result["results"]:
            s, t, mem = r["setup"], r["train"], r["memory"]
            cells = [f"{v['detkit']:.1f} / {v['torchvision']:.1f} / **{v['ratio']:.2f}**"
                     for v in (r["inference"][bs] for bs in sorted(r["inference"], key=int))]
            cells.append(f"{t['detkit']:.2f} / {t['torchvision']:.2f} / **{t['ratio']:.2f}**")
            rows.append((f"{_model(s)} ({s['image_size'][0]}x{s['image_size'][1]})", step.name.removeprefix("bench_"),
                         *cells, f"{mem['inference']['detkit']:.0f} / {mem['inference']['torchvision']:.0f}",
                         f"{mem['train']['detkit']:.0f} / {mem['train']['torchvision']:.0f}"))
    return markdown_table(header, rows)


def _bench_lines(steps: list[Step]) -> list[str]:
    """The report's Faster R-CNN section: every run, then detkit at its best against torchvision's fp32."""
    from detkit.benchmarks.common import markdown_table

    bench = _bench_table(steps)
    if not bench:
        return []
    lines = ["", "## Faster R-CNN: detkit against torchvision (same modules and weights, same process)", "",
             "Throughputs are medians of interleaved runs; ratio = detkit / torchvision (> 1: detkit faster). "
             "Settings apply to both models.", "", bench]
    best = best_vs_default(steps)
    if best:
        rows = [(b["backbone"], b["phase"], b["best_settings"], f"{b['detkit']:.2f}",
                 f"{b['torchvision_fp32']:.2f}", f"**{b['ratio']:.2f}**") for b in best]
        lines += ["", "detkit with its best settings against torchvision at its fp32 default:", "",
                  markdown_table(("backbone", "phase", "detkit best settings", "detkit", "torchvision fp32", "ratio"),
                                 rows)]
    return lines


def best_vs_default(steps: list[Step]) -> list[dict]:
    """detkit with its best settings (the fastest of the bf16 / channels-last / compile runs) against
    torchvision at fp32 defaults, per backbone and phase."""
    by_step = {s.name: {_model(r["setup"]): r for r in s.result["results"]}
               for s in steps if s.name.startswith("bench_") and s.result}
    base = by_step.get("bench_fp32", {})
    rows = []
    for backbone, ref in base.items():
        phases = [(f"infer b{bs}", lambda r, bs=bs: r["inference"].get(bs)) for bs in ref["inference"]]
        phases.append(("train", lambda r: r["train"]))
        for phase, get in phases:
            candidates = [(name, get(runs[backbone])["detkit"]) for name, runs in by_step.items()
                          if backbone in runs and get(runs[backbone])]
            name, best = max(candidates, key=lambda c: c[1])
            rows.append({"backbone": backbone, "phase": phase, "best_settings": name.removeprefix("bench_"),
                         "detkit": best, "torchvision_fp32": get(ref)["torchvision"],
                         "ratio": best / get(ref)["torchvision"]})
    return rows


def _pipeline_lines(step: Step) -> list[str]:
    from detkit.benchmarks.pipeline import timing_table

    r = step.result
    return [f"Device {r['device']}, amp {r['amp']}, mean over {r['images']} synthetic image(s):", "",
            timing_table(r["rows"]), ""]


def markdown(steps: list[Step], args: argparse.Namespace, wall: float) -> str:
    from detkit.benchmarks.common import markdown_table

    env = next((s.result for s in steps if s.name == "env" and s.result), {}) or {}
    lines = ["# detkit gpu-check", "",
             f"Device: **{env.get('gpu', args.device)}** (driver {env.get('driver', 'n/a')}, CUDA runtime "
             f"{env.get('cuda_runtime')}, cuDNN {env.get('cudnn', 'n/a')}, {env.get('gpu_memory_gib', 'n/a')} GiB, "
             f"{env.get('multiprocessors', 'n/a')} SMs), torch {env.get('torch')}, torchvision "
             f"{env.get('torchvision')}, Python {env.get('python')}, {env.get('cpu_count')} CPU cores.",
             f"Command: `python tools/gpu_check.py --device {args.device}{' --quick' if args.quick else ''}`; "
             f"whole run {wall:.0f} s of a {args.budget:.0f} s budget.", ""]
    if env.get("ops"):
        o = env["ops"]
        lines += [f"torchvision ops on {o['nms_device']}: NMS keeps the same {o['nms_kept']} of 2000 boxes as on "
                  f"the CPU: {o['nms_equal_to_cpu']}; RoIAlign max |diff| vs CPU {o['roi_align_max_abs_diff_vs_cpu']:.2g}.",
                  ""]
    rows = [(s.name, s.title, s.status, s.seconds, f"{s.budget:.0f}") for s in steps]
    lines += ["## Steps", "", markdown_table(("step", "what", "status", "seconds", "budget"), rows)]
    tests = next((s.result for s in steps if s.name == "cuda_tests" and s.result), None)
    if tests:
        counts = {}
        for t in tests["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        rows = [(t["name"], t["outcome"] + (f" ({t['message']})" if t["outcome"] != "passed" and t["message"] else ""),
                 f"{t['seconds']:.1f}") for t in tests["tests"]]
        lines += ["", "## Tests marked cuda", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", "",
                  markdown_table(("test", "outcome", "seconds"), rows)]
        if tests["figures"]:
            lines += ["", "Measured by the tests:", ""]
            lines += [f"- {k}: {json.dumps(v)}" for k, v in tests["figures"].items()]
    lines += _bench_lines(steps)
    pipes = [s for s in steps if s.name.startswith("pipelines_") and s.result]
    if pipes:
        lines += ["", "## The lineage per image (the Faster R-CNN paper's Table 5 form)", "",
                  f"Untrained weights (time only), selective search on the CPU as the papers ran it. The paper's "
                  f"VGG-16 Faster R-CNN on a K40: proposals {PAPER_VGG16_MS['proposal']} ms, conv "
                  f"{PAPER_VGG16_MS['conv']} ms, region-wise {PAPER_VGG16_MS['region']} ms, total "
                  f"{PAPER_VGG16_MS['total']} ms.", ""]
        for s in pipes:
            lines += _pipeline_lines(s)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.env_json:
        facts = environment(args.device)
        with open(args.env_json, "w", encoding="utf-8") as f:
            json.dump(facts, f, indent=1)
        print(json.dumps(facts, indent=1))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available here (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    if args.budget < 60:
        print(f"--budget {args.budget}: expected at least 60 seconds", file=sys.stderr)
        return 2
    report_md, report_json = os.path.join(args.out, "report.md"), os.path.join(args.out, "report.json")
    if os.path.exists(report_json) and not args.overwrite:
        print(f"--out {args.out}: already holds a report (report.json); pass --overwrite to replace it or choose "
              f"another directory", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, ".steps")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    steps = plan(args, tmp)
    start = time.monotonic()
    with open(os.path.join(args.out, "gpu_check.log"), "w", encoding="utf-8") as log:
        for step in steps:
            run_step(step, args.budget - (time.monotonic() - start), log, enforce=not args.quick)
    wall = time.monotonic() - start
    collect(steps, tmp)
    text = markdown(steps, args, wall)
    tests = next((s.result["tests"] for s in steps if s.name == "cuda_tests" and s.result), [])
    failed_tests = [t["name"] for t in tests if t["outcome"] in ("failed", "error")]
    failed_steps = [s.name for s in steps if s.status != "ok"]
    payload = {"device": args.device, "quick": args.quick, "budget_s": args.budget, "wall_s": round(wall, 1),
               "failed_tests": failed_tests, "failed_steps": failed_steps,
               "steps": [{"name": s.name, "title": s.title, "status": s.status, "seconds": s.seconds,
                          "budget_s": s.budget, "argv": s.argv, "result": s.result} for s in steps],
               "best_vs_torchvision_fp32": best_vs_default(steps), "paper_vgg16_faster_rcnn_ms": PAPER_VGG16_MS}
    for path, content in ((report_json, json.dumps(payload, indent=1)), (report_md, text)):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(path + ".tmp", path)
    shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    if failed_tests or failed_steps:
        print(f"[gpu-check] failed tests: {failed_tests or 'none'}; steps not ok: {failed_steps or 'none'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
