"""Every shipped config (configs/*.yaml) builds its detector and detects on a small image.

test_config.py validates the files; here each config's model section is built as written (untrained, no
weights file) and run once in eval mode, with its transform scaled down to a small image so that VGG-16 and
ResNet-50 stay cheap on the CPU. Detectors fed by selective search are handed boxes, as their proposal cache
would; R-CNN's and SPP-net's SVM heads refuse to detect until the SVM stage has set them, so they are set
here (random SVMs and box regressors) through the same calls.
"""
import glob
import os

import pytest
import torch

from detkit.config import load_config
from detkit.models.assembly import build_detector
from detkit.models.svm import SVMBoxHead

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
# detector configs; configs/pretrain_*.yaml are classifier configs (tests/classification/test_pretrain.py)
PATHS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
               if not os.path.basename(p).startswith("pretrain_"))
CLASSES = ["a", "b", "c"]
H, W = 96, 128


def test_configs_are_found():
    assert PATHS


@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_config_builds_and_detects(path, registries):
    torch.manual_seed(0)
    cfg = load_config(path).model
    cfg.backbone.weights = None
    if cfg.transform.min_size != 0:  # 0: R-CNN's windows are cut from the original image
        cfg.transform.min_size, cfg.transform.max_size = H, W
    model = build_detector(cfg, registries, len(CLASSES), CLASSES).eval()
    assert model.class_names == CLASSES
    assert cfg.backbone.name in registries.backbones and cfg.detector.name in registries.detectors
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    proposals = None
    if cfg.proposal_generator.name != "rpn":
        proposals = [torch.tensor([[4.0, 6.0, 60.0, 70.0], [30.0, 20.0, 120.0, 90.0], [0.0, 0.0, W, H],
                                   [50.0, 40.0, 80.0, 64.0]])]
    predictor = model.roi_heads.predictor
    if isinstance(predictor, SVMBoxHead):
        with pytest.raises(RuntimeError, match="SVMs of this R-CNN are not trained"):
            with torch.no_grad():
                model([image], proposals=proposals)
        k, d, p = predictor.num_classes, predictor.in_features, predictor.pooled_features
        predictor.set_svms(0.01 * torch.randn(k, d), torch.zeros(k), feature_scale=1.0)
        predictor.set_regressor(0.001 * torch.randn(k, p + 1, 4), torch.zeros(k, 4), torch.ones(k, 4),
                                pooled_scale=1.0)
    with torch.no_grad():
        (det,) = model([image], proposals=proposals)
    n = len(det["scores"])
    assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
    assert n <= cfg.roi_heads.detections_per_img
    assert ((det["labels"] >= 1) & (det["labels"] <= len(CLASSES))).all()
    assert (det["scores"] >= cfg.roi_heads.score_thresh).all()
    boxes = det["boxes"]  # in the original image's coordinates, clipped to it
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    # softmax scores of an untrained head are near 1 / 4 (threshold 0.05); the small SVM margins pass -1
    assert n > 0
