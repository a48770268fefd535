"""``detkit pretrain`` under torchrun: two CPU processes (gloo) of 4 images each train LeNet-5 on the digits
exactly as one process of 8 does, and one process resumes the two-process checkpoint where its sample stream
stopped.

LeNet-5 has neither batch norm nor dropout, so nothing in the step depends on how the global batch is split:
the per-process mean losses that DDP averages are the one-process mean, and the weights must agree to float
rounding. The random resized crops are drawn per sample from its stream position, so a rank that took the
wrong slice of the stream, or seeded its crops by rank, would train on other views and fail the comparison.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ddp_utils import free_port, max_weight_diff, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(ROOT, "tools", "pretrain.py")
# Crops of 80-100% of the area at a random aspect ratio and place, no flip: every sample's view is its own.
AUGMENT = {"crop": "resized", "area": [0.8, 1.0], "hflip": 0.0, "color_jitter": 0.0, "test_resize": 1.0}
TRAIN_KEYS = ("cls/loss", "total", "top1/train", "top5/train")
VAL_KEYS = ("top1/val", "top5/val", "loss/val")


def write_config(tmp_path, name: str, batch: int, max_iters: int) -> str:
    """LeNet-5 on the digits at 32x32, ``batch`` images per process, constant learning rate (not scaled by the
    number of processes), a checkpoint and a validation every 2 iterations, the log every iteration."""
    cfg = {"model": {"backbone": {"name": "lenet5"}, "input_size": 32},
           "data": {"train": {"name": "digits", "split": "train"}, "test": {"name": "digits", "split": "test"},
                    "batch_size": batch, "num_workers": 0, "augment": AUGMENT},
           "train": {"work_dir": str(tmp_path / name), "max_iters": max_iters, "lr": 0.05, "steps": [1000],
                     "warmup_iters": 0, "scale_lr": False, "checkpoint_period": 2, "log_period": 1,
                     "eval_at_end": True, "device": "cpu"},
           "eval": {"period": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(*argv: str) -> None:
    """Run a command from the repository root with one thread per process; it must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-4000:]}"


def training_records(work) -> dict[int, dict]:
    return {r["iter"]: r for r in read_log(work) if "cls/loss" in r}


def validation_records(work) -> dict[int, dict]:
    return {r["iter"]: r for r in read_log(work) if "top1/val" in r}


def max_diff(records_a: dict[int, dict], records_b: dict[int, dict], keys, iters) -> float:
    """The largest difference of ``keys`` over ``iters``, both logs holding each of those iterations."""
    assert set(iters) <= set(records_a) and set(iters) <= set(records_b), (sorted(records_a), sorted(records_b))
    return max(abs(records_a[i][k] - records_b[i][k]) for i in iters for k in keys)


def check_rank_zero_alone_wrote(work) -> None:
    """One log with each iteration once, one set of checkpoints, the report of the final validation."""
    assert [r["iter"] for r in read_log(work)] == [1, 2, 2, 3, 4, 4]  # training 1-4, validation after 2 and 4
    # (pathlib's glob matches dot files too: no .tmp-*.pth left by a second writer either)
    # best.pth: the best validation top-1 (eval.period), written by rank 0 alone
    assert sorted(p.name for p in work.glob("*.pth")) == ["backbone.pth", "best.pth", "final.pth", "iter_0000002.pth"]
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["count"] == 450 and metrics["top1"] == validation_records(work)[4]["top1/val"]


@pytest.mark.slow
def test_torchrun_two_processes_pretrain_exactly_as_one_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), PRETRAIN,
        write_config(tmp_path, "ddp", 4, 4), "--no-progress")
    # The one-process run goes on to iteration 6: its iteration-4 checkpoint is the two-process run's final.pth,
    # its last two iterations what resuming that checkpoint must reproduce.
    run(PRETRAIN, write_config(tmp_path, "single", 8, 6), "--no-progress")

    check_rank_zero_alone_wrote(ddp)
    ddp_train, one_train = training_records(ddp), training_records(single)
    loss_diff = max_diff(ddp_train, one_train, ("cls/loss", "total"), range(1, 5))
    print(f"2 processes x 4 vs 1 x 8: max logged loss difference {loss_diff:.2g}")
    assert loss_diff <= 1e-5, (ddp_train, one_train)
    # Top-1/top-5 of the training batches: each rank's rate over its 4 images, averaged over the 2 ranks.
    assert max_diff(ddp_train, one_train, ("top1/train", "top5/train"), range(1, 5)) <= 1e-6
    assert ddp_train[1]["cls/loss"] != ddp_train[4]["cls/loss"]  # it trained
    assert max_diff(validation_records(ddp), validation_records(single), VAL_KEYS, (2, 4)) <= 1e-5
    weight_diff = max_weight_diff(ddp / "final.pth", single / "iter_0000004.pth")
    print(f"2 processes x 4 vs 1 x 8: max weight difference {weight_diff:.2g}")
    assert weight_diff <= 1e-6
    ckpt = torch.load(ddp / "final.pth", weights_only=True)
    assert ckpt["iteration"] == 4 and ckpt["world_size"] == 2 and ckpt["samples_seen"] == 32

    # One process of 8 resumes the two-process checkpoint: the stream continues at sample 32.
    run(PRETRAIN, str(tmp_path / "ddp.yaml"), "--set", "data.batch_size=8", "--set", "train.max_iters=6",
        "--no-progress", "--resume")
    ckpt = torch.load(ddp / "final.pth", weights_only=True)
    assert ckpt["iteration"] == 6 and ckpt["world_size"] == 1 and ckpt["samples_seen"] == 48
    resumed_train = training_records(ddp)
    assert sorted(resumed_train) == [1, 2, 3, 4, 5, 6]
    assert max_diff(resumed_train, one_train, TRAIN_KEYS, (5, 6)) <= 1e-5
    assert max_diff(validation_records(ddp), validation_records(single), VAL_KEYS, (6,)) <= 1e-5
    assert max_weight_diff(ddp / "final.pth", single / "final.pth") <= 1e-6
