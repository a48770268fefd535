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
         "tools/train.py", str(config(tmp_path / "ddp", 1, eval_period=2)), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "tools/train.py", str(config(tmp_path / "single", 2, eval_at_end=False)),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]

    # Rank 0 alone writes: one log, one set of checkpoints, the metric of the gathered shards.
    ddp_log, one_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    validations = [r for r in ddp_log if "val/AP" in r]
    ddp_log = [r for r in ddp_log if "val/AP" not in r]
    assert [r["iter"] for r in ddp_log] == [1, 2, 3, 4] and [r["iter"] for r in validations] == [2]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.pth")) == ["best.pth", "final.pth", "iter_0000002.pth"]
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
    # The validation at iteration 2, each process predicting its shard, is what one process's eval of the same
    # weights scores.
    scored = subprocess.run([sys.executable, "-m", "detkit", "eval", str(tmp_path / "single" / "iter_0000002.pth"),
                             "--output", str(tmp_path / "eval2"), "--no-progress"], env=env, capture_output=True,
                            text=True, timeout=240)
    assert scored.returncode == 0, scored.stderr[-3000:]
    single = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert validations[0]["val/AP"] == pytest.approx(single["AP"], abs=1e-6)
    assert validations[0]["val/AP50"] == pytest.approx(single["AP50"], abs=1e-6)

    # Resume the two-process checkpoint in one process: the sample stream continues where it stopped.
    resumed = config(tmp_path / "ddp", 2, max_iters=5, eval_at_end=False)
    again = subprocess.run([sys.executable, "tools/train.py", str(resumed), "--resume", "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)
    assert ckpt["iteration"] == 5 and ckpt["samples_seen"] == 10 and ckpt["world_size"] == 1
    assert [r["iter"] for r in read_log(tmp_path / "ddp") if "val/AP" not in r] == [1, 2, 3, 4, 5]
