"""`make gpu-check DEVICE=cpu QUICK=1`: the GPU check's dry run, so the script cannot rot between GPU sessions."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_dry_run_writes_the_report_and_json(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", "QUICK=1", f"GPU_CHECK_OUT={out}",
                          f"CHECK_PYTHON={sys.executable}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)  # a guard against a hang only: the dry run enforces no time budget
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:], (out / "gpu_check.log").read_text()[-5000:])
    report = json.loads((out / "report.json").read_text())
    assert report["failed_tests"] == [] and report["failed_steps"] == []
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "cuda_tests", "bench_fp32", "bench_fpn_fp32", "bench_bf16", "pipelines_fp32",
                           "bench_bf16_cl", "pipelines_bf16", "bench_best"]
    assert steps["env"]["result"]["ops"]["nms_equal_to_cpu"] is True
    tests = steps["cuda_tests"]["result"]["tests"]
    # On the CPU the CUDA tests run with DETKIT_CUDA_TESTS_DEVICE=cpu; only the CUDA-only ones skip.
    outcomes = {t["name"]: t["outcome"] for t in tests}
    assert outcomes["test_torchvision_ops_agree_between_cpu_and_cuda"] == "passed"
    assert {n for n, o in outcomes.items() if o == "skipped"} == {
        "test_host_device_syncs_per_training_step", "test_one_process_nccl_ddp_matches_plain_training"}
    assert "cpu_cuda_top10_box_max_abs_diff_px" in steps["cuda_tests"]["result"]["figures"]
    for name in ("bench_fp32", "bench_fpn_fp32", "bench_bf16", "bench_bf16_cl", "bench_best"):
        (result,) = steps[name]["result"]["results"]
        assert result["train"]["detkit"] > 0 and result["inference"]["1"]["ratio"] > 0
    assert steps["bench_best"]["result"]["results"][0]["setup"]["compile"] is True
    assert steps["bench_fpn_fp32"]["result"]["results"][0]["setup"]["neck"] == "fpn"
    rows = steps["pipelines_fp32"]["result"]["rows"]
    assert [r["name"] for r in rows] == ["R-CNN", "SPP-net", "Fast R-CNN", "Faster R-CNN"]
    assert all(r["seconds"]["total"] > 0 and r["untrained"] for r in rows)
    assert len(report["best_vs_torchvision_fp32"]) == 3  # tiny: infer b1, infer b2, train
    text = (out / "report.md").read_text()
    for heading in ("## Steps", "## Tests marked cuda", "## Faster R-CNN: detkit against torchvision",
                    "## The lineage per image"):
        assert heading in text
    assert "| tiny + fpn (96x128) | fpn_fp32 |" in text
    assert not (out / ".steps").exists()

    # A second run does not overwrite the report without being asked.
    again = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert json.loads((out / "report.json").read_text()) == report


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_refused(tmp_path):
    run = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cuda", "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "CUDA is not available" in run.stderr
    assert not (tmp_path / "o").exists()


def test_the_dry_run_reports_budgets_but_never_enforces_them(tmp_path):
    """A step over its budget fails a GPU session's run, but not the dry run (`--quick`) that make test runs on a
    machine that may be busy."""
    from tool_utils import load_tool

    gpu_check = load_tool("gpu_check")
    slow = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    with open(tmp_path / "log", "w") as log:
        enforced = gpu_check.Step("slow", 0.5, slow, "a step over its budget")
        gpu_check.run_step(enforced, remaining=300, log=log)
        dry = gpu_check.Step("slow", 0.5, slow, "a step over its budget")
        gpu_check.run_step(dry, remaining=0, log=log, enforce=False)  # not even skipped for the overall budget
    assert enforced.status.startswith("timed out") and dry.status == "ok" and dry.seconds >= 1.5
    assert "budget 0 s, not enforced" in (tmp_path / "log").read_text()
