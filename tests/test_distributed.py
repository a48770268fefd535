"""Two-process DistributedDataParallel training on CPU (gloo), launched with torchrun."""
import json
import os
import subprocess
import sys

import torch
import yaml


def test_torchrun_two_processes_train_and_match_one_process(tmp_path):
    from detkit.data.synth import synthesize

    synthesize(str(tmp_path / "data"), "coco", 8, seed=5, image_size=(96, 128))
    ann, images = str(tmp_path / "data" / "annotations.json"), str(tmp_path / "data" / "images")

    def config(work, batch):
        cfg = {
            "model": {"backbone": {"name": "tiny", "frozen_bn": True, "args": {"widths": [8, 16, 16, 32, 32],
                                                                              "hidden": 32}},
                      "anchors": {"sizes": [16, 32, 64]},
                      "rpn": {"pre_nms_top_n_train": 300, "post_nms_top_n_train": 100, "pre_nms_top_n_test": 100,
                              "post_nms_top_n_test": 30, "min_size": 2, "batch_size_per_image": 64},
                      # every image contributes the same number of RoIs, so the per-process mean losses
                      # DDP averages equal the one-process mean over the global batch
                      "roi_head": {"batch_size_per_image": 16, "bg_iou_thresh_lo": 0.0},
                      "transform": {"min_size": 96, "max_size": 128}},
            "data": {"train": {"name": "coco", "images": images, "annotations": ann},
                     "test": {"name": "coco", "images": images, "annotations": ann},
                     "batch_size": batch, "num_workers": 0, "augment": {"hflip": 0.0}},
            "train": {"work_dir": str(work), "max_iters": 4, "lr": 0.01, "steps": [100], "checkpoint_period": 2,
                      "log_period": 1, "scale_lr": False},
        }
        path = tmp_path / f"{work.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "tools/train.py", str(config(tmp_path / "ddp", 2)), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "tools/train.py", str(config(tmp_path / "single", 4)), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]

    # Rank 0 alone writes: one log, one set of checkpoints, the metric of the gathered shards.
    ddp_log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in ddp_log] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text()).keys() >= {"AP", "AP50"}
    # Same global batch, same samples: the first iteration's losses agree up to the random anchor/RoI sampling.
    for key in ("rpn/objectness", "roi/cls"):
        assert abs(ddp_log[0][key] - one_log[0][key]) < 0.15 * one_log[0][key] + 1e-3, (key, ddp_log[0], one_log[0])
    ckpt = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["samples_seen"] == 16

    # Resume the two-process checkpoint in one process: the sample stream continues where it stopped.
    resumed = config(tmp_path / "ddp", 4)
    raw = yaml.safe_load(resumed.read_text())
    raw["train"]["max_iters"] = 5
    raw["train"]["eval_at_end"] = False
    resumed.write_text(yaml.safe_dump(raw))
    again = subprocess.run([sys.executable, "tools/train.py", str(resumed), "--resume", "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)
    assert ckpt["iteration"] == 5 and ckpt["samples_seen"] == 20 and ckpt["world_size"] == 1
