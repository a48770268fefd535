"""The benchmark compares like with like: torchvision's model built around detkit's modules and weights."""
import torch

from detkit import benchmark


def test_pair_shares_weights_and_agrees(registries):
    setup = benchmark.Setup(image_size=(96, 128), anchor_sizes=(32.0, 64.0))
    ours, theirs = benchmark.build_pair(setup, registries)
    assert theirs.backbone.body is ours.trunk and theirs.roi_heads.box_head is ours.roi_heads.box_head
    ours.eval()
    theirs.eval()
    feats = ours.trunk(torch.rand(1, 3, 96, 128))
    a_obj, a_box = ours.proposal_generator.head(feats)
    b_obj, b_box = theirs.rpn.head([feats])
    torch.testing.assert_close(a_obj, b_obj[0])
    torch.testing.assert_close(a_box, b_box[0])
    x = torch.randn(5, ours.roi_heads.predictor.cls_score.in_features)
    torch.testing.assert_close(ours.roi_heads.predictor(x)[0], theirs.roi_heads.box_predictor(x)[0])


def test_run_reports_throughputs_and_ratios(registries):
    setup = benchmark.Setup(image_size=(64, 96), anchor_sizes=(32.0,))
    r = benchmark.run(setup, registries, torch.device("cpu"), batch_sizes=(1,), train_batch=1, warmup=0, repeats=1)
    assert r["inference"][1]["detkit"] > 0 and r["inference"][1]["torchvision"] > 0
    assert r["train"]["ratio"] == r["train"]["detkit"] / r["train"]["torchvision"]
    assert "| tiny | 64x96 | cpu |" in benchmark.markdown([r], None, "cmd")
