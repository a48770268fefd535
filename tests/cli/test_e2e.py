"""End to end through the CLI: synth -> train -> eval -> infer, resume, and bad input."""
import functools
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml

from detkit.cli import main
from e2e_utils import SIZE, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--output", str(root / "train"), "--format", "coco", "--num-images", "12",
                 "--seed", "0", "--size", SIZE]) == 0
    assert main(["data", "synth", "--output", str(root / "val"), "--format", "coco", "--num-images", "4",
                 "--seed", "1", "--size", SIZE]) == 0
    assert main(["data", "synth-video", "--output", str(root / "clip.mp4"), "--frames", "6", "--seed", "2",
                 "--size", SIZE]) == 0
    return root


def data_dir_of(work_dir):
    cfg = yaml.safe_load((work_dir / "config.yaml").read_text())
    return __import__("pathlib").Path(cfg["data"]["test"]["annotations"]).parent.parent


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    cfg = write_config(work / "cfg.yaml", data_dir, work / "run")
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return work / "run"


def test_train_writes_checkpoints_logs_and_metrics(trained):
    assert (trained / "final.pth").is_file() and (trained / "iter_0000004.pth").is_file()
    lines = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 4, 6, 8]
    assert all({"lr", "rpn/objectness", "rpn/box_reg", "roi/cls", "roi/box_reg", "total"} <= set(r) for r in lines)
    # warmup then step decay at iteration 6
    assert lines[0]["lr"] < 0.01 and lines[2]["lr"] == pytest.approx(0.01) and lines[-1]["lr"] == pytest.approx(0.001)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"} <= set(metrics)
    # pictures: training curves, PR curves, error breakdown, galleries
    for name in ("training_curves.png", "pr_curves.png", "errors.png", "gallery_worst.png", "gallery_best.png"):
        assert cv2.imread(str(trained / name)) is not None, name
    counts = metrics["errors"]["counts"]
    gt = json.loads((data_dir_of(trained) / "val" / "annotations.json").read_text())
    assert counts["correct"] + counts["missed"] == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["model"]["num_classes"] == len(metrics["per_class"])


def test_eval_from_checkpoint_alone(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(trained / "final.pth"), "--output", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(json.loads((trained / "metrics.json").read_text())["AP"], abs=1e-9)
    assert "AP50" in capsys.readouterr().out
    # --data given on the command line
    out2 = tmp_path / "eval2"
    assert main(["eval", str(trained / "final.pth"), "--data", str(data_dir / "train" / "annotations.json"),
                 "--output", str(out2), "--no-progress"]) == 0
    results = json.loads((out2 / "results.json").read_text())
    gt = json.loads((data_dir / "train" / "annotations.json").read_text())
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}


def test_infer_image_folder_and_video(trained, data_dir, tmp_path, capsys):
    ckpt = str(trained / "final.pth")
    images = sorted((data_dir / "val" / "images").iterdir())
    out = tmp_path / "one"
    assert main(["infer", ckpt, str(images[0]), "--output", str(out), "--score-thr", "0.0",
                 "--no-progress"]) == 0
    written = [p for p in out.iterdir() if p.name.endswith(images[0].suffix) and "_det" in p.name]
    assert len(written) == 1 and cv2.imread(str(written[0])).shape[:2] == (120, 160)
    results = json.loads((out / "results.json").read_text())
    assert all(set(r) >= {"image_id", "category_id", "bbox", "score"} for r in results)

    folder = tmp_path / "folder_in"
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "folder_out"
    assert main(["infer", ckpt, str(folder), "--output", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "images.json").read_text())
    assert len(meta) == len(images)  # the corrupt file is reported and skipped
    # the input folder (or a folder inside it) as the output: refused before anything is read or written
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    for same in (folder, folder / "drawn"):
        assert main(["infer", ckpt, str(folder), "--output", str(same), "--no-progress"]) == 2
        assert "the input folder" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before

    out = tmp_path / "video_out"
    assert main(["infer", ckpt, str(data_dir / "clip.mp4"), "--output", str(out), "--no-progress"]) == 0
    cap_in, cap_out = cv2.VideoCapture(str(data_dir / "clip.mp4")), cv2.VideoCapture(str(out / "clip_det.mp4"))
    count = lambda cap: sum(1 for _ in iter(lambda: cap.read()[0], False))  # noqa: E731
    assert cap_out.get(cv2.CAP_PROP_FPS) == pytest.approx(cap_in.get(cv2.CAP_PROP_FPS))
    assert count(cap_out) == count(cap_in) == 6


@pytest.mark.parametrize("amp", ["none", pytest.param("fp16", marks=pytest.mark.slow)])
def test_resume_continues_exactly(data_dir, tmp_path, monkeypatch, amp):
    """A run interrupted after its iteration-4 checkpoint and resumed from it ends bit for bit where the
    uninterrupted run ends: every weight, every momentum buffer and (fp16) the gradient scaler."""
    # The scale grows after every 2 steps without overflow (instead of 2000), so within a few iterations it
    # overflows, backs off and skips steps: the checkpointed scaler then differs from a fresh one.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=2))
    straight = write_config(tmp_path / "a.yaml", data_dir, tmp_path / "a", eval_at_end=False, amp=amp)
    assert main(["train", str(straight), "--no-progress"]) == 0
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "a" / "iter_0000004.pth", resumed_dir / "iter_0000004.pth")
    again = write_config(tmp_path / "b.yaml", data_dir, resumed_dir, eval_at_end=False, amp=amp)
    assert main(["train", str(again), "--resume", "--no-progress"]) == 0
    a = torch.load(tmp_path / "a" / "final.pth", weights_only=True)
    b = torch.load(resumed_dir / "final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 8
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == len(a["optimizer"]["param_groups"][0]["params"])
    for i in state_a:
        assert torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]), i
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scaler"] == b["scaler"]
    if amp == "fp16":
        # A resume that restarted the scaler would skip other steps than the uninterrupted run.
        middle = torch.load(resumed_dir / "iter_0000004.pth", weights_only=True)
        assert middle["scaler"] != torch.amp.GradScaler("cpu").state_dict()
        # A checkpoint written before the scaler was saved still resumes (with a fresh scaler).
        del middle["scaler"]
        (tmp_path / "c").mkdir()
        torch.save(middle, tmp_path / "c" / "iter_0000004.pth")
        legacy = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "c", eval_at_end=False, amp=amp)
        assert main(["train", str(legacy), "--resume", "--no-progress"]) == 0
    else:
        assert a["scaler"] == {}  # a disabled scaler has no state
    log_b = [json.loads(x)["iter"] for x in (resumed_dir / "log.jsonl").read_text().splitlines()]
    assert log_b == [5, 6, 8]


def test_bad_inputs_get_clear_messages(trained, data_dir, tmp_path, capsys):
    not_ckpt = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, not_ckpt)
    assert main(["infer", str(not_ckpt), str(data_dir / "val" / "images")]) == 2
    assert "not a detkit checkpoint" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    assert main(["eval", str(garbage)]) == 2
    assert "garbage.pth" in capsys.readouterr().err

    bad_video = tmp_path / "bad.mp4"
    bad_video.write_text("not a video")
    assert main(["infer", str(trained / "final.pth"), str(bad_video), "--output", str(tmp_path / "o")]) == 2
    assert "bad.mp4" in capsys.readouterr().err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert main(["infer", str(trained / "final.pth"), str(empty), "--output", str(tmp_path / "o")]) == 2
    assert "empty_dir" in capsys.readouterr().err
    assert main(["infer", str(trained / "final.pth"), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err

    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "c")
    assert main(["train", str(cfg), "--set", "model.proposal_generator.nms_thres=0.5"]) == 2
    assert "model.proposal_generator.nms_thresh" in capsys.readouterr().err
    bad_data = write_config(tmp_path / "d.yaml", data_dir, tmp_path / "d")
    raw = yaml.safe_load(bad_data.read_text())
    raw["data"]["train"]["annotation"] = raw["data"]["train"].pop("annotations")
    bad_data.write_text(yaml.safe_dump(raw))
    assert main(["train", str(bad_data)]) == 2
    assert "data.train.annotation" in capsys.readouterr().err


def test_mixed_precision_and_channels_last_train(data_dir, tmp_path):
    cfg = write_config(tmp_path / "amp.yaml", data_dir, tmp_path / "amp", max_iters=2, eval_at_end=False,
                       checkpoint_period=0)
    assert main(["train", str(cfg), "--no-progress", "--set", "train.amp=bf16", "--set",
                 "train.channels_last=true", "--set", "data.augment={hflip: 0.5, scale: [0.8, 1.2], crop: 0.5, "
                 "color_jitter: 0.5}", "--set", "data.group_by_aspect_ratio=true", "--set",
                 "model.transform.min_size=[100, 120]", "--set", "data.num_workers=1"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "amp" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["total"]) for r in lines)
    # fp16 trains with a gradient scaler
    assert main(["train", str(cfg), "--no-progress", "--set", "train.amp=fp16", "--set",
                 f"train.work_dir={tmp_path / 'fp16'}"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "fp16" / "log.jsonl").read_text().splitlines()]
    assert lines and all(np.isfinite(r["total"]) for r in lines)
    assert main(["train", str(cfg), "--set", "train.amp=fp8"]) == 2


def test_eval_results_file_without_a_model(trained, data_dir, tmp_path, capsys):
    results = trained / "results.json"
    gt = str(data_dir / "val" / "annotations.json")
    out = tmp_path / "r"
    assert main(["eval", "--results", str(results), "--dataset", gt, "--output", str(out)]) == 0
    coco = json.loads((out / "metrics.json").read_text())
    assert coco["AP"] == pytest.approx(json.loads((trained / "metrics.json").read_text())["AP"], abs=1e-12)
    assert main(["eval", "--results", str(results), "--dataset", gt, "--metric", "voc07", "--output", str(out)]) == 0
    voc = json.loads((out / "metrics.json").read_text())
    assert voc["metric"] == "voc07" and "mAP" in capsys.readouterr().out
    truth = json.loads((data_dir / "val" / "annotations.json").read_text())
    per_class = [ap for ap in voc["per_class"].values() if not np.isnan(ap)]
    assert len(per_class) == len(truth["categories"])  # every class has ground truth in the synthetic set
    assert voc["mAP"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-12)
    # The ground truth itself, as detections, scores 1 in every class.
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                    "score": 1.0} for a in truth["annotations"] if not a["iscrowd"]]))
    assert main(["eval", "--results", str(perfect), "--dataset", gt, "--metric", "voc07",
                 "--output", str(tmp_path / "p")]) == 0
    voc = json.loads((tmp_path / "p" / "metrics.json").read_text())
    # (exactly 1 up to the 11-point sum: 11 * (1/11) is 1 + 2e-16)
    assert voc["per_class"] and all(ap == pytest.approx(1.0, abs=1e-12) for ap in voc["per_class"].values())
    assert voc["mAP"] == pytest.approx(1.0, abs=1e-12)
    # Detections made on another dataset whose image ids (1-4) all exist in this one (ids 1-12) cannot be
    # told apart from detections on it: they are scored.
    assert main(["eval", "--results", str(results), "--dataset", str(data_dir / "train" / "annotations.json"),
                 "--output", str(out)]) == 0
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    assert main(["eval", "--results", str(foreign), "--dataset", gt]) == 2
    assert "image_id 999" in capsys.readouterr().err


def test_max_detections_caps_the_detector_and_the_metric(trained, data_dir, tmp_path, capsys, caplog):
    """eval --max-detections (eval.max_detections) is the detector's output cap and COCO's maxDets, recorded in
    metrics.json; infer --max-detections caps the detector; images with more objects than the cap are named
    (issue 23, item 13)."""
    from collections import Counter

    ckpt = str(trained / "final.pth")
    most = lambda results: max(Counter(r["image_id"] for r in results).values())  # noqa: E731
    assert most(json.loads((trained / "results.json").read_text())) > 10  # the end-of-training run, cap 100
    out = tmp_path / "eval10"
    assert main(["eval", ckpt, "--output", str(out), "--no-progress", "--max-detections", "10"]) == 0
    assert most(json.loads((out / "results.json").read_text())) == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_detections"] == 10 and "AR10" in metrics and "AR100" not in metrics
    assert "maxDets=10" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # argparse's range check
        main(["eval", ckpt, "--max-detections", "9"])
    assert exc.value.code == 2
    assert "--max-detections" in capsys.readouterr().err

    image = str(sorted((data_dir / "val" / "images").iterdir())[0])
    for cap in ([], ["--max-detections", "3"]):
        assert main(["infer", ckpt, image, "--output", str(tmp_path / f"infer{len(cap)}"), "--score-thr", "0",
                     "--no-progress", *cap]) == 0
    assert len(json.loads((tmp_path / "infer0" / "results.json").read_text())) > 3
    assert len(json.loads((tmp_path / "infer2" / "results.json").read_text())) == 3

    # A scene with 14 objects, found perfectly: COCO at 10 detections misses 4 of them, and says so.
    truth = json.loads((data_dir / "val" / "annotations.json").read_text())
    first = truth["images"][0]
    truth["annotations"] = [a for a in truth["annotations"] if a["image_id"] != first["id"]]
    for k in range(14):
        truth["annotations"].append({"id": 10_000 + k, "image_id": first["id"], "iscrowd": 0, "area": 100.0,
                                     "category_id": truth["categories"][0]["id"],
                                     "bbox": [11.0 * k, 11.0 * (k % 3), 10.0, 10.0]})
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "annotations.json").write_text(json.dumps(truth))
    (dense / "images").symlink_to(data_dir / "val" / "images")
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                    "score": 1.0 - a["id"] / 1e6} for a in truth["annotations"]]))
    scored, warned = {}, {}
    for cap in (10, 20):
        caplog.clear()
        assert main(["eval", "--results", str(perfect), "--dataset", str(dense / "annotations.json"),
                     "--max-detections", str(cap), "--output", str(tmp_path / f"m{cap}")]) == 0
        scored[cap] = json.loads((tmp_path / f"m{cap}" / "metrics.json").read_text())
        warned[cap] = " ".join(r.getMessage() for r in caplog.records if "eval.max_detections" in r.getMessage())
    assert f"1 of {len(truth['images'])} images have more objects of one class than eval.max_detections=10" in warned[10]
    assert first["file_name"] in warned[10] and not warned[20]
    assert scored[10]["AP"] < 0.99 and scored[10]["AR10"] < 0.99 and scored[20]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert main(["eval", "--results", str(perfect), "--dataset", str(dense / "annotations.json"), "--metric", "voc",
                 "--max-detections", "10", "--output", str(tmp_path / "voc")]) == 2
    assert "COCO's maxDets" in capsys.readouterr().err



def test_a_checkpoint_finds_its_data_from_any_directory(data_dir, tmp_path, monkeypatch, capsys):
    """Data paths given relative to the directory training ran from are recorded absolute, so eval and export
    (which takes its verification images from data.test) work from elsewhere (issue 25, item 4)."""
    shutil.copytree(data_dir / "train", tmp_path / "project" / "data" / "train")
    shutil.copytree(data_dir / "val", tmp_path / "project" / "data" / "val")
    monkeypatch.chdir(tmp_path / "project")
    cfg = write_config(tmp_path / "project" / "cfg.yaml", "data", "run", max_iters=2, steps=[1],
                       checkpoint_period=2)
    assert yaml.safe_load(cfg.read_text())["data"]["test"]["images"] == "data/val/images"  # relative as given
    assert main(["train", "cfg.yaml", "--no-progress"]) == 0
    recorded = yaml.safe_load((tmp_path / "project" / "run" / "config.yaml").read_text())
    assert recorded["data"]["test"]["annotations"] == str(tmp_path / "project" / "data" / "val" / "annotations.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = str(tmp_path / "project" / "run" / "final.pth")
    assert main(["eval", ckpt, "--output", "ev", "--no-progress"]) == 0
    assert json.loads((elsewhere / "ev" / "metrics.json").read_text())["metric"] == "coco"
    # (a 2-iteration model scores near-ties that batching may reorder: the check here is that data.test is found)
    assert main(["export", ckpt, "--format", "torchscript", "--output", "m.ts",
                 "--set", "model.roi_heads.score_thresh=0.5"]) == 0
    assert "verified against the eager model" in capsys.readouterr().out


def test_infer_results_score_like_eval_through_their_file_names(trained, data_dir, tmp_path, capsys):
    """infer's results.json held only the detections drawn (score >= 0.5) and numbered images by folder position,
    so eval --results scored it AP 0.000 without a word. Now it holds every detection, and images.json beside it
    maps its ids onto the dataset's by file name (issue 25, item 5)."""
    ckpt = str(trained / "final.pth")
    out = tmp_path / "infer"
    assert main(["infer", ckpt, str(data_dir / "val" / "images"), "--output", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    drawn = int(said.split(" detections scoring at least 0.5 drawn")[0].rsplit("\n", 1)[-1])
    assert len(results) > drawn and min(r["score"] for r in results) < 0.5
    assert main(["eval", "--results", str(out / "results.json"), "--data", str(data_dir / "val" / "annotations.json"),
                 "--output", str(tmp_path / "scored")]) == 0
    assert "mapped to the dataset's by file name" in capsys.readouterr().err
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert scored["AP"] == pytest.approx(json.loads((trained / "metrics.json").read_text())["AP"], abs=1e-6)
    # the detections themselves: those of the end-of-training evaluation, image for image
    from detkit.evaluation.runner import results_by_file_name

    truth = json.loads((data_dir / "val" / "annotations.json").read_text())
    mapped = results_by_file_name(results, json.loads((out / "images.json").read_text()), truth["images"], "index")
    by_eval = json.loads((trained / "results.json").read_text())
    key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
    assert len(mapped) == len(by_eval) > 0
    for a, b in zip(sorted(mapped, key=key), sorted(by_eval, key=key)):
        assert a["image_id"] == b["image_id"] and a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
    assert main(["infer", ckpt, str(data_dir / "val" / "images"), "--output", str(tmp_path / "cut"), "--no-progress",
                 "--results-thr", "0.5"]) == 0
    assert len(json.loads((tmp_path / "cut" / "results.json").read_text())) == drawn
    # results of images the dataset does not have are refused, naming them
    index = json.loads((out / "images.json").read_text())
    index[0]["file_name"] = "/elsewhere/holiday.png"
    (out / "images.json").write_text(json.dumps(index))
    assert main(["eval", "--results", str(out / "results.json"), "--data",
                 str(data_dir / "val" / "annotations.json"), "--output", str(tmp_path / "bad")]) == 2
    assert "are not in the dataset by file name: holiday.png" in capsys.readouterr().err
