"""The detkit-cascade plugin: Cascade R-CNN built on detkit's public interfaces, used through detkit's CLI."""
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import socket

import pytest
import torch
import yaml

from detkit.cli import main
from detkit.config import ConfigError, load_config
from detkit.models.assembly import build_detector
from detkit.plugins import get_registries

torch.set_num_threads(1)
REPO = pathlib.Path(__file__).resolve().parents[3]
SIZE = "96x128"


@pytest.fixture(scope="module")
def registries():
    return get_registries()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for split, num, seed in (("train", 8, 0), ("val", 4, 1)):
        assert main(["data", "synth", "--output", str(root / split), "--format", "coco", "--num-images", str(num),
                     "--seed", str(seed), "--size", SIZE]) == 0
    return root


def cascade_config(path, data_dir, work_dir, model=None, **train):
    """A small cascade on the tiny backbone with FPN (the demo's layout, smaller), written to ``path``."""
    cfg = {
        "version": 3,
        "model": {
            "detector": "cascade_rcnn",
            "backbone": {"name": "tiny", "args": {"widths": [8, 16, 32, 48, 48], "hidden": 64}},
            "neck": {"name": "fpn", "in_strides": [4, 8, 16], "out_channels": 32, "extra_levels": 1},
            "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128]},
                                   "straddle_thresh": -1.0, "pre_nms_top_n_train": 300, "post_nms_top_n_train": 100,
                                   "pre_nms_top_n_test": 200, "post_nms_top_n_test": 50, "min_size": 2},
            "roi_extractor": {"name": "roi_align", "output_size": 7, "sampling_ratio": 2},
            "box_head": {"name": "two_fc", "fc_dim": 64},
            "roi_heads": {"batch_size_per_image": 32, "stats_period": 2},
            "transform": {"min_size": 96, "max_size": 128},
            **(model or {}),
        },
        "data": {
            "train": {"name": "coco", "images": f"{data_dir}/train/images",
                      "annotations": f"{data_dir}/train/annotations.json"},
            "test": {"name": "coco", "images": f"{data_dir}/val/images",
                     "annotations": f"{data_dir}/val/annotations.json"},
            "batch_size": 2, "num_workers": 0,
        },
        "train": {"work_dir": str(work_dir), "max_iters": 6, "lr": 0.01, "steps": [5], "warmup_iters": 2,
                  "checkpoint_period": 3, "log_period": 1, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def model_of(registries, tmp_path, **model):
    cfg = load_config(str(cascade_config(tmp_path / "m.yaml", tmp_path, tmp_path / "w", model)))
    return build_detector(cfg.model, registries, num_classes=3, class_names=["a", "b", "c"])


def batch(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 30.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 3]), "sample_seed": 100 + i} for i in range(n)]
    return images, targets


# --------------------------------------------------------------------------------------------- registration


def test_the_plugin_registers_through_its_entry_point(registries, capsys):
    assert main(["list", "detectors"]) == 0
    listed = next(line for line in capsys.readouterr().out.splitlines() if "cascade_rcnn" in line)
    assert "plugin=cascade" in listed
    entry = registries.detectors.get("cascade_rcnn")
    assert entry.plugin == "cascade"
    assert registries.box_predictors.get("softmax_box_agnostic").plugin == "cascade"
    slots = {slot.key: slot for slot in entry.info["slots"]}
    assert list(slots) == ["neck", "proposal_generator", "roi_extractor", "roi_heads", "box_head", "box_predictor"]
    assert "svm" not in slots["box_predictor"].choices


def test_the_core_names_no_cascade():
    files = [p for p in (REPO / "detkit").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 50
    hits = [str(p) for p in files if b"cascade" in p.read_bytes().lower()]
    assert hits == []


def test_settings_are_the_single_heads_less_the_per_stage_keys(registries, tmp_path, capsys):
    from detkit.models.roi_heads import RoIHeadsSettings
    from detkit_cascade.heads import PER_STAGE, CascadeSettings

    shared = {f.name for f in dataclasses.fields(RoIHeadsSettings)} - set(PER_STAGE)
    names = {f.name for f in dataclasses.fields(CascadeSettings)}
    assert shared < names and not names & set(PER_STAGE)
    s = CascadeSettings()
    assert (s.stage_iou_thresholds, s.stage_loss_weights) == ([0.5, 0.6, 0.7], [1.0, 0.5, 0.25])
    assert s.stage_box_coder_weights == [[10, 10, 5, 5], [20, 20, 10, 10], [30, 30, 15, 15]]
    # config show prints the cascade's section; a single-head key is refused with its name
    cfg = cascade_config(tmp_path / "c.yaml", tmp_path, tmp_path / "w")
    assert main(["config", "show", str(cfg)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["roi_heads"]["stage_iou_thresholds"] == [0.5, 0.6, 0.7]
    assert main(["config", "show", str(cfg), "--set", "model.roi_heads.fg_iou_thresh=0.6"]) == 2
    assert "model.roi_heads.fg_iou_thresh" in capsys.readouterr().err


@pytest.mark.parametrize("roi_heads, key", [
    ({"stage_loss_weights": [1.0, 0.5]}, "model.roi_heads.stage_loss_weights"),
    ({"stage_box_coder_weights": [[10, 10, 5, 5], [20, 20, 10], [30, 30, 15, 15]]},
     "model.roi_heads.stage_box_coder_weights[1]"),
    ({"stage_iou_thresholds": [0.5, 1.5, 0.7]}, "model.roi_heads.stage_iou_thresholds[1]"),
    ({"stage_iou_thresholds": [], "stage_loss_weights": [], "stage_box_coder_weights": []},
     "model.roi_heads.stage_iou_thresholds"),
])
def test_inconsistent_stage_lists_are_refused_naming_the_key(registries, tmp_path, roi_heads, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        model_of(registries, tmp_path, roi_heads=roi_heads)


def test_multi_scale_testing_and_the_svm_predictor_are_refused(registries, tmp_path):
    with pytest.raises(ConfigError, match="test_scales"):
        model_of(registries, tmp_path, transform={"min_size": 96, "max_size": 128, "test_scales": [80, 96]})
    with pytest.raises(ConfigError, match="model.box_predictor.name='svm'"):
        model_of(registries, tmp_path, box_predictor="svm")


# --------------------------------------------------------------------------------------------- the model


def test_every_stage_has_its_own_head_predictor_and_coder(registries, tmp_path):
    from detkit_cascade.assembly import CascadeRCNN

    model = model_of(registries, tmp_path)
    heads = model.roi_heads
    assert isinstance(model, CascadeRCNN) and len(heads.box_head) == len(heads.predictor) == 3
    params = [{id(p) for p in m.parameters()} for m in (*heads.box_head, *heads.predictor)]
    assert all(not (a & b) for i, a in enumerate(params) for b in params[i + 1:])
    assert [s.box_coder.weights for s in heads.stages] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert [s.cfg.fg_iou_thresh for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [s.cfg.bg_iou_thresh_hi for s in heads.stages] == [0.5, 0.6, 0.7]
    # without a neck, on the backbone's own RoI head: each stage trains a copy of it
    c4 = model_of(registries, tmp_path, neck=None, box_head="backbone", roi_extractor="roi_pool")
    first, second = c4.roi_heads.box_head[0], c4.roi_heads.box_head[1]
    assert first is not second
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_the_agnostic_predictor_regresses_one_box_for_every_class(registries, tmp_path):
    from detkit_cascade.heads import SoftmaxBoxAgnostic

    predictor = SoftmaxBoxAgnostic(16, 3)
    logits, deltas = predictor(torch.randn(5, 16))
    assert logits.shape == (5, 4) and deltas.shape == (5, 16)
    per_class = deltas.view(5, 4, 4)
    assert torch.equal(per_class, per_class[:, :1].expand(-1, 4, -1))
    # a Faster R-CNN takes it too, and trains its one regression
    cfg = load_config(str(cascade_config(tmp_path / "f.yaml", tmp_path, tmp_path / "w", {
        "detector": "faster_rcnn", "box_predictor": "softmax_box_agnostic", "roi_heads": {}})))
    model = build_detector(cfg.model, registries, num_classes=3).train()
    losses = model(*batch())
    sum(losses.values()).backward()
    assert model.roi_heads.predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_training_losses_per_stage_with_the_stage_weights(registries, tmp_path):
    def losses(weights):
        torch.manual_seed(0)
        model = model_of(registries, tmp_path, roi_heads={"batch_size_per_image": 32, "stage_loss_weights": weights})
        return model.train()(*batch())

    plain, weighted = losses([1.0, 1.0, 1.0]), losses([1.0, 0.5, 0.25])
    keys = [f"roi/stage{k}/{n}" for k in (1, 2, 3) for n in ("cls", "box_reg")]
    assert set(keys) <= set(weighted) and not any(k.startswith("roi/cls") for k in weighted)
    for k, w in zip((1, 2, 3), (1.0, 0.5, 0.25)):
        for n in ("cls", "box_reg"):
            expected = w * float(plain[f"roi/stage{k}/{n}"].detach())
            assert float(weighted[f"roi/stage{k}/{n}"].detach()) == pytest.approx(expected, rel=1e-5)


def test_an_image_without_objects_trains_every_stage_on_negatives(registries, tmp_path):
    model = model_of(registries, tmp_path).train()
    images, targets = batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "sample_seed": 7}
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.roi_heads.stage_counts[:, -1].tolist() == [2, 2, 2]  # both images counted at every stage


def test_each_stage_samples_from_the_refined_boxes_of_the_one_before(registries, tmp_path, monkeypatch):
    model = model_of(registries, tmp_path).train()
    heads = model.roi_heads
    seen = []
    for k, stage in enumerate(heads.stages):
        original = stage.select_training_samples

        def spy(boxes, targets, original=original, k=k):
            out = original(boxes, targets)
            seen.append((k, [b.clone() for b in boxes], [b.clone() for b in out[0]]))
            return out

        monkeypatch.setattr(stage, "select_training_samples", spy)
    refined = []
    original_refine = heads.refine
    monkeypatch.setattr(heads, "refine", lambda *a: refined.append(original_refine(*a)) or refined[-1])
    images, targets = batch()
    model(images, targets)
    assert [k for k, _, _ in seen] == [0, 1, 2]
    for k in (1, 2):
        _, inputs, _ = seen[k]
        _, _, sampled_before = seen[k - 1]
        for given, before, made, t in zip(inputs, sampled_before, refined[k - 1], targets):
            # the refined boxes of the stage before, less the ground truth its sampling added
            gt_rows = (before[:, None] == t["boxes"][None]).all(dim=2).any(dim=1)
            assert torch.equal(given, made) and len(given) == len(before) - int(gt_rows.sum())
            assert not torch.equal(given, before[~gt_rows])  # moved by the regression


def test_refinement_decodes_with_the_stage_weights_and_clips(registries, tmp_path):
    heads = model_of(registries, tmp_path).roi_heads
    boxes = [torch.tensor([[10.0, 10.0, 30.0, 50.0], [100.0, 60.0, 126.0, 94.0]])]
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    deltas = torch.zeros(2, 16)
    deltas[0, 4:8] = torch.tensor([20.0, 0.0, 0.0, 0.0])  # class 1: dx = 20 / wx(20) = 1 box width
    deltas[1, 12:16] = torch.tensor([20.0, 0.0, 0.0, 0.0])  # class 3: one width right, past the image edge
    out = heads.refine(1, boxes, logits, deltas, None, [(96, 128)], None)[0]
    assert torch.allclose(out, torch.tensor([[30.0, 10.0, 50.0, 50.0], [126.0, 60.0, 128.0, 94.0]]))


def test_test_time_scores_are_the_mean_of_the_stages_and_boxes_the_last_stages(registries, tmp_path):
    from detkit.ops import batched_nms, clip_boxes, remove_small_boxes

    model = model_of(registries, tmp_path, roi_heads={"score_thresh": 0.0, "nms_thresh": 1.0,
                                                      "detections_per_img": 1000})
    torch.manual_seed(1)
    for p in model.roi_heads.predictor.parameters():  # untrained predictors are near-uniform: spread them
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    images, _ = batch(3, 1)
    heads = model.roi_heads
    with torch.no_grad():
        image_list, features, _ = model.features(images)
        proposals, _ = model.proposal_generator(image_list, features, None, None)
        dets, _ = heads(features, proposals, image_list.image_sizes)
        # the same by hand: each stage scores the boxes it is handed, then moves them
        boxes, probs = proposals[0], []
        for k in range(3):
            pooled = heads.roi_extractor(features, [boxes], image_list.image_sizes)
            logits, deltas = heads.predictor[k](heads.box_head[k](pooled))
            probs.append(torch.softmax(logits, dim=1))
            cls = logits[:, 1:].argmax(1) + 1
            moved = heads.stages[k].box_coder.decode(deltas.view(len(boxes), -1, 4)[torch.arange(len(boxes)), cls],
                                                     boxes)
            boxes = clip_boxes(moved, image_list.image_sizes[0])
    scores = torch.stack(probs).mean(0)[:, 1:].reshape(-1)
    final = boxes[:, None].expand(-1, 3, -1).reshape(-1, 4)
    labels = torch.arange(1, 4).repeat(len(boxes))
    keep = remove_small_boxes(final, 1e-2)
    keep = keep[batched_nms(final[keep], scores[keep], labels[keep], 1.0)]
    assert len(dets[0]["scores"]) == len(keep) > 0
    assert torch.allclose(dets[0]["scores"], scores[keep], atol=1e-6)
    assert torch.allclose(dets[0]["boxes"], final[keep], atol=1e-4)
    assert torch.equal(dets[0]["labels"], labels[keep])
    assert not torch.allclose(torch.stack(probs).mean(0), probs[-1])  # not the last stage's scores alone


def test_positives_per_stage_are_logged(registries, tmp_path, caplog):
    model = model_of(registries, tmp_path, roi_heads={"batch_size_per_image": 32, "stats_period": 2}).train()
    with caplog.at_level(logging.INFO, logger="detkit_cascade"):
        for seed in (0, 1):
            model(*batch(seed))
    lines = [r.getMessage() for r in caplog.records if r.name == "detkit_cascade.heads"]
    assert len(lines) == 1
    assert all(f"stage {k} (IoU {t})" in lines[0] for k, t in ((1, 0.5), (2, 0.6), (3, 0.7)))
    rows = model.roi_heads.stage_statistics()  # reset after the line
    assert [r["sampled_boxes"] for r in rows] == [0, 0, 0]


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("cascade")
    cfg = cascade_config(work / "cfg.yaml", data_dir, work / "run")
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return work


def test_train_eval_infer_from_the_cli(trained, data_dir, tmp_path):
    run = trained / "run"
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all({f"roi/stage{k}/cls" for k in (1, 2, 3)} <= set(r) for r in log)
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["eval", str(run / "final.pth"), "--output", str(tmp_path / "eval"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    image = sorted((data_dir / "val" / "images").iterdir())[0]
    assert main(["infer", str(run / "final.pth"), str(image), "--output", str(tmp_path / "infer"),
                 "--score-thr", "0"]) == 0
    assert json.loads((tmp_path / "infer" / "results.json").read_text())
    assert main(["infer", str(run / "final.pth"), str(image), "--output", str(tmp_path / "tiled"),
                 "--score-thr", "0", "--tile", "64", "--overlap", "0.25"]) == 0
    assert json.loads((tmp_path / "tiled" / "results.json").read_text())


def test_resume_continues_exactly(trained, data_dir):
    """A run resumed from its iteration-3 checkpoint ends bit for bit where the uninterrupted one did."""
    straight = trained / "run"
    (trained / "resumed").mkdir()
    shutil.copy(straight / "iter_0000003.pth", trained / "resumed" / "iter_0000003.pth")
    cfg = cascade_config(trained / "resume.yaml", data_dir, trained / "resumed", eval_at_end=False)
    assert main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    a = torch.load(straight / "final.pth", weights_only=True)["model"]
    b = torch.load(trained / "resumed" / "final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_is_refused_with_the_reason(trained, tmp_path, capsys):
    assert main(["export", str(trained / "run" / "final.pth"), "--format", "torchscript",
                 "--output", str(tmp_path / "m.ts")]) == 2
    err = capsys.readouterr().err
    assert "CascadeRCNN has another shape and no exported form" in err
    assert not list(tmp_path.iterdir())


def test_bf16_autocast_trains(data_dir, tmp_path):
    cfg = cascade_config(tmp_path / "amp.yaml", data_dir, tmp_path / "amp", max_iters=2, eval_at_end=False,
                         amp="bf16")
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert (tmp_path / "amp" / "final.pth").is_file()


@pytest.mark.slow
def test_torchrun_two_processes(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = cascade_config(tmp_path / "ddp.yaml", data_dir, tmp_path / "ddp", max_iters=3, eval_at_end=False,
                         scale_lr=False)
    cfg_data = yaml.safe_load(cfg.read_text())
    cfg_data["data"]["batch_size"] = 1
    cfg.write_text(yaml.safe_dump(cfg_data))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(REPO / "tools" / "train.py"), str(cfg), "--no-progress"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3] and all("roi/stage3/box_reg" in r for r in log)
    assert torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)["world_size"] == 2


def test_stats_prints_each_stages_sampled_ious(trained, data_dir, capsys):
    from detkit_cascade import stats

    ckpt = str(trained / "run" / "final.pth")
    assert stats.main([ckpt, "--data", str(data_dir / "val" / "annotations.json"), "--num-images", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["0.5", "0.6", "0.7"]
    assert stats.main([ckpt, "--num-images", "0"]) == 2
    assert "--num-images 0" in capsys.readouterr().err


def test_eval_max_detections_caps_the_last_stage_too(registries, tmp_path):
    """detkit's evaluation sets the cap of every RoIHeads a detector holds: the cascade's per-stage rules, whose
    last stage post-processes the detections, included; restored after."""
    from detkit.models.roi_heads import detections_capped

    torch.manual_seed(0)
    model = model_of(registries, tmp_path, roi_heads={"score_thresh": 0.0}).eval()
    images, _ = batch(n=1)
    with torch.no_grad():
        assert len(model(images)[0]["boxes"]) > 5
        with detections_capped(model, 5) as heads:
            assert heads == 3 and len(model(images)[0]["boxes"]) == 5
    assert [s.cfg.detections_per_img for s in model.roi_heads.stages] == [100, 100, 100]
