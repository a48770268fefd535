"""Two-process DistributedDataParallel training on CPU (gloo), launched with torchrun: the same weights and
losses as one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ddp_utils import free_port, max_loss_diff, max_weight_diff, read_log, write_config


@pytest.mark.slow
def test_torchrun_two_processes_train_exactly_as_one_process(tmp_path):
    from detkit.data.synth import synthesize

    synthesize(str(tmp_path / "data"), "coco", 8, seed=5, image_size=(96, 128))

    def config(work, batch, **train):
        return write_config(tmp_path, tmp_path / "data", work, batch, **train)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "tools/train.py", str(config(tmp_path / "ddp", 1)), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "tools/train.py", str(config(tmp_path / "single", 2, eval_at_end=False)),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]

    # Rank 0 alone writes: one log, one set of checkpoints, the metric of the gathered shards.
    ddp_log, one_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    assert [r["iter"] for r in ddp_log] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.pth")) == ["final.pth", "iter_0000002.pth"]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text()).keys() >= {"AP", "AP50"}
    # Same global batch, same samples, same augmentation, same anchor and RoI draws: the same training.
    loss_diff = max_loss_diff(ddp_log, one_log)
    print(f"2 processes vs 1: max logged loss difference {loss_diff:.2g}")
    assert loss_diff <= 1e-5, (ddp_log, one_log)
    weight_diff = max_weight_diff(tmp_path / "ddp" / "final.pth", tmp_path / "single" / "final.pth")
    print(f"2 processes vs 1: max weight difference {weight_diff:.2g}")
    assert weight_diff <= 1e-6
    ckpt = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["samples_seen"] == 8

    # Resume the two-process checkpoint in one process: the sample stream continues where it stopped.
    resumed = config(tmp_path / "ddp", 2, max_iters=5, eval_at_end=False)
    again = subprocess.run([sys.executable, "tools/train.py", str(resumed), "--resume", "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)
    assert ckpt["iteration"] == 5 and ckpt["samples_seen"] == 10 and ckpt["world_size"] == 1
    assert [r["iter"] for r in read_log(tmp_path / "ddp")] == [1, 2, 3, 4, 5]
