"""A Faster R-CNN must be able to overfit a few synthetic images (AP50 near 1.0 on them)."""
import pytest
import torch

from detkit.config import load_config
from detkit.training import train


@pytest.mark.slow
def test_faster_rcnn_overfits_a_few_images(tmp_path, registries):
    from detkit.data.synth import synthesize

    synthesize(str(tmp_path / "data"), "coco", 4, seed=3, image_size=(120, 160))
    ann = str(tmp_path / "data" / "annotations.json")
    images = str(tmp_path / "data" / "images")
    overrides = [
        "model.backbone.name=tiny",
        "model.backbone.args={widths: [16, 32, 48, 64, 64], hidden: 128}",
        "model.proposal_generator.anchors.sizes=[16, 32, 64, 128]",
        "model.proposal_generator.pre_nms_top_n_train=600", "model.proposal_generator.post_nms_top_n_train=200",
        "model.proposal_generator.pre_nms_top_n_test=300", "model.proposal_generator.post_nms_top_n_test=100",
        "model.proposal_generator.min_size=2",
        "model.roi_heads.batch_size_per_image=64",
        "model.transform.min_size=120", "model.transform.max_size=160",
        f"data.train={{name: coco, images: {images}, annotations: {ann}}}",
        f"data.test={{name: coco, images: {images}, annotations: {ann}}}",
        "data.augment.hflip=0.0", "data.batch_size=2", "data.num_workers=0",
        f"train.work_dir={tmp_path / 'work'}", "train.max_iters=600", "train.lr=0.02", "train.warmup_iters=20",
        "train.steps=[500]", "train.checkpoint_period=0", "train.log_period=50",
    ]
    cfg = load_config_from_overrides(tmp_path, overrides)
    torch.manual_seed(0)
    result = train(cfg, registries, progress=False)
    assert result["metrics"]["AP50"] > 0.9, result["metrics"]


def load_config_from_overrides(tmp_path, overrides):
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return load_config(path, overrides)
