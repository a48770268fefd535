"""What the end-to-end tests share (tests/cli/test_e2e.py, tests/training/test_robust_training.py, the API,
validation and logger tests): the image size of their synthetic sets, making those sets, and a small
tiny-backbone training config for the CLI."""
import yaml

SIZE = "120x160"


def synth_splits(root, train: int = 8, val: int = 3):
    """``root/train`` and ``root/val``: synthetic COCO sets of ``train`` and ``val`` images at :data:`SIZE`."""
    from detkit.cli import main

    for split, num, seed in (("train", train, 0), ("val", val, 1)):
        assert main(["data", "synth", "--output", str(root / split), "--num-images", str(num), "--seed", str(seed),
                     "--size", SIZE]) == 0
    return root


def write_config(path, data_dir, work_dir, **train):
    cfg = {
        "model": {
            "backbone": {"name": "tiny", "args": {"widths": [8, 16, 32, 48, 48], "hidden": 64}},
            "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128]},
                                   "pre_nms_top_n_train": 600, "post_nms_top_n_train": 150, "pre_nms_top_n_test": 300,
                                   "post_nms_top_n_test": 50, "min_size": 2, "batch_size_per_image": 64},
            "roi_heads": {"batch_size_per_image": 32},
            "transform": {"min_size": 120, "max_size": 160},
        },
        "data": {
            "train": {"name": "coco", "images": f"{data_dir}/train/images",
                      "annotations": f"{data_dir}/train/annotations.json"},
            "test": {"name": "coco", "images": f"{data_dir}/val/images",
                     "annotations": f"{data_dir}/val/annotations.json"},
            "batch_size": 2,
            "num_workers": 0,
        },
        "train": {"work_dir": str(work_dir), "max_iters": 8, "lr": 0.01, "steps": [6], "warmup_iters": 2,
                  "checkpoint_period": 4, "log_period": 2, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
