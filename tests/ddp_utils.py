"""What the distributed tests share: a free loopback port, a small training config, and the comparisons of
two runs' logs and weights."""
import json
import socket

import torch
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path, data_dir, work, batch: int, **train) -> str:
    """A 4-iteration tiny-backbone config on the synthetic set in ``data_dir`` (train and test), written to
    ``tmp_path/<work name>.yaml``. Every image contributes the same number of anchors and RoIs to the
    losses, so the per-process means DDP averages equal the one-process mean over the global batch."""
    ann, images = str(data_dir / "annotations.json"), str(data_dir / "images")
    cfg = {
        "model": {"backbone": {"name": "tiny", "frozen_bn": True, "args": {"widths": [8, 16, 16, 32, 32],
                                                                          "hidden": 32}},
                  "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64]},
                                         "pre_nms_top_n_train": 300, "post_nms_top_n_train": 100,
                                         "pre_nms_top_n_test": 100, "post_nms_top_n_test": 30, "min_size": 2,
                                         "batch_size_per_image": 64},
                  "roi_heads": {"batch_size_per_image": 16, "bg_iou_thresh_lo": 0.0},
                  "transform": {"min_size": 96, "max_size": 128}},
        "data": {"train": {"name": "coco", "images": images, "annotations": ann},
                 "test": {"name": "coco", "images": images, "annotations": ann},
                 "batch_size": batch, "num_workers": 0, "augment": {"hflip": 0.5}},
        "train": {"work_dir": str(work), "max_iters": 4, "lr": 0.01, "steps": [100], "checkpoint_period": 2,
                  "log_period": 1, "scale_lr": False, **train},
    }
    path = tmp_path / f"{work.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def read_log(work) -> list[dict]:
    return [json.loads(x) for x in (work / "log.jsonl").read_text().splitlines()]


def max_weight_diff(a, b) -> float:
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0 for k in wa)


def max_loss_diff(log_a: list[dict], log_b: list[dict]) -> float:
    """The largest difference of any logged loss at any iteration (the iterations must be the same)."""
    assert [r["iter"] for r in log_a] == [r["iter"] for r in log_b]
    return max(abs(a[k] - b[k]) for a, b in zip(log_a, log_b) for k in a if k == "total" or "/" in k)
