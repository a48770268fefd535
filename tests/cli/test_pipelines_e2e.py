"""R-CNN, SPP-net, Fast R-CNN and 4-step Faster R-CNN trained and evaluated end to end by config, from the
CLI, on a tiny synthetic dataset on the CPU; inference on new images (selective search on the fly),
test-time truncated SVD, and the pipelines benchmark table."""
import json
import os

import pytest
import yaml

from detkit.cli import main

SIZE = "96x128"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    assert main(["data", "synth", "--output", str(root / "train"), "--num-images", "8", "--seed", "0",
                 "--size", SIZE]) == 0
    assert main(["data", "synth", "--output", str(root / "val"), "--num-images", "3", "--seed", "1",
                 "--size", SIZE]) == 0
    return root


def write_config(root, name, model, **train):
    cfg = {
        "model": {
            "backbone": {"name": "tiny", "args": {"widths": [8, 8, 16, 16, 16], "hidden": 32}},
            "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64]}, "pre_nms_top_n_train": 300,
                                   "post_nms_top_n_train": 100, "pre_nms_top_n_test": 200,
                                   "post_nms_top_n_test": 50, "min_size": 2, "batch_size_per_image": 64},
            "transform": {"min_size": 96, "max_size": 128},
            **model,
        },
        "data": {"train": {"name": "coco", "images": str(root / "train/images"),
                           "annotations": str(root / "train/annotations.json")},
                 "test": {"name": "coco", "images": str(root / "val/images"),
                          "annotations": str(root / "val/annotations.json")},
                 "batch_size": 2, "num_workers": 0},
        "train": {"work_dir": str(root / name), "max_iters": 4, "lr": 0.01, "steps": [3], "log_period": 2,
                  "checkpoint_period": 100, **train},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SVM_HEADS = {"batch_size_per_image": 16, "score_thresh": -10.0, "nms_thresh": 0.3}


def selective_search(root):
    return {"name": "selective_search", "mode": "fast", "max_side": 128, "top_k": 100, "min_size": 2,
            "cache_dir": str(root / "proposals"), "num_workers": 1}


DETECTORS = {
    "fast_rcnn": {"detector": "fast_rcnn", "roi_heads": {"batch_size_per_image": 16}},
    "spp_net": {"detector": "spp_net",
                "backbone": {"name": "tiny", "freeze_at": -1, "args": {"widths": [8, 8, 16, 16, 16], "hidden": 32}},
                "roi_extractor": {"name": "spp", "levels": [3, 2, 1]}, "roi_heads": SVM_HEADS,
                "box_predictor": "svm"},
    "rcnn": {"detector": "rcnn",
             "roi_extractor": {"name": "warp", "warp_size": 32, "context_padding": 2, "warp_batch": 64},
             "roi_heads": {**SVM_HEADS, "bg_iou_thresh_lo": 0.0, "box_loss_weight": 0.0}, "box_predictor": "svm",
             "transform": {"min_size": 0}},
}


@pytest.fixture(scope="module")
def trained(workspace):
    checkpoints = {}
    for name, model in DETECTORS.items():
        config = write_config(workspace, name, {"proposal_generator": selective_search(workspace), **model})
        assert main(["train", str(config), "--no-progress"]) == 0
        checkpoints[name] = workspace / name / "final.pth"
    config = write_config(workspace, "four_step", {}, schedule="four_step", four_step_iters=[3, 3, 2, 2])
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoints["four_step"] = workspace / "four_step" / "final.pth"
    return checkpoints


def rescore(workspace, results: list[dict], images: int | None = None) -> dict:
    """COCO metrics of ``results`` against the first ``images`` validation images (all by default), scored
    independently of the run that wrote them."""
    from detkit.evaluation import score_results

    gt = json.loads((workspace / "val" / "annotations.json").read_text())
    ids = {img["id"] for img in gt["images"][:images]}
    gt = {**gt, "images": [img for img in gt["images"] if img["id"] in ids],
          "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    return score_results(gt, [r for r in results if r["image_id"] in ids], "coco",
                         class_names=[c["name"] for c in gt["categories"]])


@pytest.mark.parametrize("name", list(DETECTORS) + ["four_step"])
def test_each_detector_trains_and_evaluates(trained, workspace, name):
    metrics = json.loads((workspace / name / "metrics.json").read_text())
    results = json.loads((workspace / name / "results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    # The metrics are those of the detections written next to them, scored again here.
    again = rescore(workspace, results)
    for key in ("AP", "AP50", "AP75", "AR100", "per_class"):
        assert metrics[key] == pytest.approx(again[key], abs=1e-12), key
    # AP is the mean of the per-class APs over the classes the validation images have; the others are -1.
    gt = json.loads((workspace / "val" / "annotations.json").read_text())
    present = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
    per_class = metrics["per_class"]
    assert set(per_class) == {"circle", "square", "triangle", "star", "cross"} and present
    assert {k for k, v in per_class.items() if v != -1.0} == present
    assert metrics["AP"] == pytest.approx(sum(per_class[k] for k in present) / len(present), abs=1e-12)
    assert all(0.0 <= per_class[k] <= 1.0 for k in present)


def test_svm_detectors_have_fitted_svms_and_a_feature_cache(trained, workspace):
    import torch

    from detkit.engine.checkpoint import load_checkpoint

    for name in ("spp_net", "rcnn"):
        ckpt = load_checkpoint(str(trained[name]))
        assert ckpt["config"]["model"]["box_predictor"]["name"] == "svm"
        assert bool(ckpt["model"]["roi_heads.predictor.fitted"])
        assert torch.count_nonzero(ckpt["model"]["roi_heads.predictor.svm_weight"]) > 0
        assert (workspace / name / "finetune" / "final.pth").is_file()
        assert (workspace / name / "features" / "meta.json").is_file()


def test_four_step_keeps_each_step_and_one_shared_trunk(trained, workspace):
    import torch

    from detkit.engine.checkpoint import load_checkpoint

    steps = ["step1_rpn", "step2_fast_rcnn", "step3_rpn", "step4_fast_rcnn"]
    assert all((workspace / "four_step" / s / "final.pth").is_file() for s in steps)
    final = load_checkpoint(str(trained["four_step"]))["model"]
    step2 = load_checkpoint(str(workspace / "four_step" / "step2_fast_rcnn" / "final.pth"))["model"]
    step3 = load_checkpoint(str(workspace / "four_step" / "step3_rpn" / "final.pth"))["model"]
    trunk = [k for k in final if k.startswith("trunk.")]
    assert trunk and all(torch.equal(final[k], step2[k]) for k in trunk)  # the shared trunk is step 2's
    assert all(torch.equal(final[k], step3[k]) for k in final if k.startswith("proposal_generator."))
    assert all(torch.equal(step3[k], step2[k]) for k in trunk)  # step 3 kept it fixed
    # Running again with --resume finds every step done and only reassembles (without it: refused).
    config = workspace / "four_step.yaml"
    before = os.path.getmtime(workspace / "four_step" / "step1_rpn" / "final.pth")
    assert main(["train", str(config), "--no-progress", "--set", "train.eval_at_end=false"]) == 2
    assert main(["train", str(config), "--no-progress", "--resume", "--set", "train.eval_at_end=false"]) == 0
    assert os.path.getmtime(workspace / "four_step" / "step1_rpn" / "final.pth") == before


def test_inference_on_new_images_searches_them(trained, workspace, tmp_path):
    out = tmp_path / "infer"
    assert main(["infer", str(trained["fast_rcnn"]), str(workspace / "val" / "images"), "--output", str(out),
                 "--score-thr", "0", "--no-progress"]) == 0
    assert len(list(out.glob("*.png")) + list(out.glob("*.jpg"))) == 3
    assert (out / "results.json").is_file()


def test_eval_with_truncated_svd(trained, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="detkit.api")
    assert main(["eval", str(trained["fast_rcnn"]), "--svd", "16,8", "--output", str(tmp_path / "svd"),
                 "--no-progress"]) == 0
    assert "truncated SVD" in caplog.text and "rank 16" in caplog.text  # logged by detkit.api.evaluate
    assert (tmp_path / "svd" / "metrics.json").is_file()
    assert main(["eval", str(trained["fast_rcnn"]), "--svd", "64", "--output", str(tmp_path / "bad"),
                 "--no-progress"]) != 0
    assert "rank 64" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_pipelines_benchmark_table(trained, workspace, tmp_path, capsys):
    from tool_utils import load_tool

    tool = load_tool("benchmark")
    out = tmp_path / "pipelines.json"
    pipelines = {"R-CNN": "rcnn", "SPP-net": "spp_net", "Fast R-CNN": "fast_rcnn", "Faster R-CNN": "four_step"}
    args = [f"{label}={trained[name]}" for label, name in pipelines.items()]
    assert tool.main(["pipelines", *args, "--images", "2", "--svd", "16,8", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| method | proposals | conv | region-wise (RoI head / post) | total |" in text
    assert "| Fast R-CNN + SVD |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == [f"{label}{svd}" for label in pipelines for svd in ("", " + SVD")]
    for r in rows:
        s = r["seconds"]
        assert s["total"] > 0 and abs(s["proposal"] + s["conv"] + s["region"] - s["total"]) < 1e-6
        assert s["roi_head"] > 0 and abs(s["roi_head"] + s["post"] - s["region"]) < 1e-6
        assert not r["untrained"]
        # Each row scores the first two validation images: the same as scoring, on those images, the
        # detections `detkit eval` wrote for the same checkpoint (with the same truncated SVD for an SVD row).
        name = pipelines[r["name"].removesuffix(" + SVD")]
        if r["name"].endswith(" + SVD"):
            reference = tmp_path / f"{name}_svd"
            assert main(["eval", str(trained[name]), "--svd", "16,8", "--output", str(reference),
                         "--no-progress"]) == 0
        else:
            reference = workspace / name
        expected = rescore(workspace, json.loads((reference / "results.json").read_text()), images=2)
        assert (r["map50"], r["map"]) == pytest.approx((expected["AP50"], expected["AP"]), abs=1e-9), r["name"]
