"""Classification pretraining (``detkit pretrain``, ``detkit eval-cls``): that one variant of each backbone family
learns (GoogLeNet with its auxiliary classifiers in the loss, not in inference), that ``backbone.pth`` is a
detector's ``model.backbone.weights``, exact resuming with augmentation, bad class folders and images named in
the errors, the evaluation report, the image lists, the cosine schedule and the shipped pretrain configs.

The data are a few 40x40 images of four colours (two per class), so each run is a handful of small steps.
"""
import glob
import json
import logging
import math
import multiprocessing
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from detkit.classification.datasets import DigitsDataset, digits, image_list
from detkit.classification.loading import build_classification_dataset
from detkit.classification.model import Classifier, build_classifier
from detkit.classification.transforms import check_augment
from detkit.cli import main
from detkit.config import ClassifierConfig, TrainConfig, check_kwargs, from_dict, load_config
from detkit.data.dataset import DatasetError
from detkit.data.loading import dataset_entry
from detkit.models.assembly import build_detector
from detkit.training.base import check_train_settings, lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ("c0", "c1", "c2", "c3")
COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40))  # distinct in luminance too (LeNet-5)
SMALL_TINY = {"widths": [8, 16, 32, 48, 48], "hidden": 64}
SMALL_TINY_SETS = ["model.backbone.args.widths=[8, 16, 32, 48, 48]", "model.backbone.args.hidden=64"]
AUGMENT = {"crop": "resized", "area": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.2, "test_resize": 1.0}
FIXED_VIEW = {"crop": "center", "hflip": 0.0, "test_resize": 1.0}


def write_images(root, classes=CLASSES, per_class=2, side=40, seed=0):
    """``root/<class>/<i>.png``: class k is colour k with pixel noise; returns the paths in sorted order."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(per_class):
            image = np.array(COLOURS[k % len(COLOURS)])[None, None] + rng.normal(0, 25, (side, side, 3))
            path = root / name / f"{i}.png"
            assert cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8)[:, :, ::-1])
            paths.append(path)
    return paths


def write_config(path, work_dir, train, test=None, backbone="tiny", args=None, augment=None, data=None, **train_keys):
    """A pretrain config: 32x32 inputs, batch 8, no workers, constant learning rate, CPU, logging every step."""
    cfg = {"model": {"backbone": {"name": backbone, "args": dict(SMALL_TINY if args is None else args)},
                     "input_size": 32},
           "data": {"train": train, "test": test, "batch_size": 8, "num_workers": 0,
                    "augment": dict(FIXED_VIEW if augment is None else augment), **(data or {})},
           "train": {"work_dir": str(work_dir), "max_iters": 4, "lr": 0.05, "steps": [1000], "warmup_iters": 0,
                     "checkpoint_period": 0, "log_period": 1, "eval_at_end": test is not None, "device": "cpu",
                     **train_keys}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def folder_spec(root):
    return {"name": "image_folder", "root": str(root)}


def pretrain_argv(config, *sets, resume=False):
    argv = ["pretrain", str(config), "--no-progress", *(a for s in sets for a in ("--set", s))]
    return argv + (["--resume"] if resume else [])


def run_pretrain(config, *sets, resume=False):
    try:
        return main(pretrain_argv(config, *sets, resume=resume))
    finally:
        stop_loader_workers()


def stop_loader_workers():
    """End any data-loader worker still alive (a run that failed mid-way; a finished run ends its own, see
    test_finished_run_leaves_no_loader_workers), so that no later test pays for collecting it."""
    for process in multiprocessing.active_children():
        process.terminate()
        process.join()


def logged(work_dir, key="cls/loss"):
    """``{iteration: value}`` of ``key`` in the run's log.jsonl."""
    with open(work_dir / "log.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["iter"]: r[key] for r in records if key in r}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight training images, two per class."""
    root = tmp_path_factory.mktemp("images") / "train"
    write_images(root)
    return root


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """A finished pretrain run of the small ``tiny`` backbone (6 iterations, evaluated on the training images)."""
    work = tmp_path_factory.mktemp("pretrained")
    config = write_config(work / "cfg.yaml", work / "run", folder_spec(images), folder_spec(images), max_iters=6)
    assert run_pretrain(config) == 0
    return work / "run"


@pytest.fixture(scope="module")
def detector_run(pretrained, tmp_path_factory):
    """``detkit train`` of configs/faster_rcnn_tiny_synth.yaml for 2 iterations from the pretrained
    backbone.pth, every trunk stage frozen (so its weights stay the pretrained ones)."""
    work = tmp_path_factory.mktemp("detector")
    assert main(["data", "synth", "--output", str(work / "data"), "--format", "coco", "--num-images", "4",
                 "--size", "120x160"]) == 0
    data = work / "data"
    sets = [f"model.backbone.weights={pretrained / 'backbone.pth'}", *SMALL_TINY_SETS, "model.backbone.freeze_at=-1",
            f"data.train.images={data / 'images'}", f"data.train.annotations={data / 'annotations.json'}",
            "data.test=null", "data.num_workers=0", "model.transform.min_size=120", "model.transform.max_size=160",
            f"train.work_dir={work / 'run'}", "train.max_iters=2", "train.warmup_iters=0", "train.eval_at_end=false",
            "train.checkpoint_period=0", "train.device=cpu"]
    assert main(["train", os.path.join(ROOT, "configs", "faster_rcnn_tiny_synth.yaml"), "--no-progress",
                 *(a for s in sets for a in ("--set", s))]) == 0
    return work / "run"


def trunk_of_pretrained(pretrained, registries) -> dict:
    """The trunk tensors of backbone.pth, by their names inside the trunk (BatchNorm's counters left out)."""
    backbone = registries.backbones.build("tiny", num_classes=len(CLASSES), **SMALL_TINY)
    backbone.load_state_dict(torch.load(pretrained / "backbone.pth", weights_only=True))  # strict: all of it
    state = backbone.detection_parts().trunk.state_dict()
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# ----------------------------------------------------------------------------- 1. each family learns


FAMILIES = [("lenet5", {}, 0.05), ("googlenet", {"aux_logits": True}, 0.01), ("resnet18", {}, 0.05),
            ("densenet121", {}, 0.05)]


@pytest.mark.parametrize("name,args,lr", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_overfits_eight_images(name, args, lr, images, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(images), backbone=name, args=args,
                          lr=lr, max_iters=15)
    assert run_pretrain(config) == 0
    losses = logged(tmp_path / "run")
    assert sorted(losses) == list(range(1, 16)) and all(math.isfinite(v) for v in losses.values())
    late = np.mean([losses[i] for i in (13, 14, 15)])
    assert late < 0.5 * losses[1], losses
    if args.get("aux_logits"):
        # Near-zero initial logits: each cross-entropy starts at ln 4, so main + 0.3 (aux1 + aux2) is 1.6 ln 4.
        assert losses[1] == pytest.approx(1.6 * math.log(4), abs=0.15)
    assert (tmp_path / "run" / "backbone.pth").is_file()


# ----------------------------------------------------------------------------- 2. auxiliary classifiers


def classifier(name, registries, **args) -> Classifier:
    cfg = from_dict({"model": {"backbone": {"name": name, "args": args}}}, schema=ClassifierConfig)
    return build_classifier(cfg.model, registries, len(CLASSES))


def test_googlenet_training_forward_has_two_auxiliary_outputs_in_the_loss(registries):
    torch.manual_seed(0)
    model = classifier("googlenet", registries, aux_logits=True).train()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([1, 3])
    outputs = model(images)
    assert isinstance(outputs, tuple) and len(outputs) == 3
    assert all(o.shape == (2, len(CLASSES)) for o in outputs)
    main_loss = F.cross_entropy(outputs[0], labels)
    aux = F.cross_entropy(outputs[1], labels) + F.cross_entropy(outputs[2], labels)
    assert torch.allclose(model.loss(outputs, labels), main_loss + 0.3 * aux)
    assert aux > 0


@pytest.mark.parametrize("name,side", [("googlenet", 32), ("inception_v3", 75)])
def test_auxiliary_outputs_are_dropped_at_inference(name, side, registries):
    model = classifier(name, registries, aux_logits=True)
    images = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    with torch.no_grad():
        assert isinstance(model.train()(images), tuple)
        logits = model.eval()(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, len(CLASSES))


# ----------------------------------------------------------------------------- 3. backbone.pth into a detector


def test_backbone_pth_is_the_trunk_of_a_faster_rcnn(pretrained, registries):
    path = pretrained / "backbone.pth"
    cfg = load_config(os.path.join(ROOT, "configs", "faster_rcnn_tiny_synth.yaml"),
                      [f"model.backbone.weights={path}", *SMALL_TINY_SETS], registries)
    detector = build_detector(cfg.model, registries, num_classes=5)
    expected = trunk_of_pretrained(pretrained, registries)
    got = detector.trunk.state_dict()
    assert set(expected) <= set(got), sorted(set(expected) - set(got))
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_detkit_train_starts_from_backbone_pth(pretrained, detector_run, registries):
    model = torch.load(detector_run / "final.pth", weights_only=True)["model"]
    expected = trunk_of_pretrained(pretrained, registries)
    assert all(f"trunk.{k}" in model for k in expected)
    assert all(torch.equal(model[f"trunk.{k}"], v) for k, v in expected.items())  # frozen: unchanged by training


# ----------------------------------------------------------------------------- 4. exact resuming


@pytest.fixture(scope="module")
def straight_run(images, tmp_path_factory):
    """Six iterations without a break: random crops, flips and colour jitter, warmup, a step at 4, one
    epoch every 2 iterations."""
    work = tmp_path_factory.mktemp("straight")
    config = write_config(work / "cfg.yaml", work / "run", folder_spec(images), augment=AUGMENT, max_iters=6,
                          warmup_iters=2, steps=[4], data={"batch_size": 4})
    assert run_pretrain(config) == 0
    return work / "run"


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_equals_the_straight_run(workers, straight_run, images, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(images), augment=AUGMENT,
                          max_iters=6, warmup_iters=2, steps=[4], data={"batch_size": 4, "num_workers": workers})
    assert run_pretrain(config, "train.max_iters=3") == 0
    assert run_pretrain(config, resume=True) == 0
    straight = torch.load(straight_run / "final.pth", weights_only=True)
    resumed = torch.load(tmp_path / "run" / "final.pth", weights_only=True)
    assert resumed["iteration"] == straight["iteration"] == 6
    assert straight["model"].keys() == resumed["model"].keys()
    different = [k for k, v in straight["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not different, different
    assert logged(tmp_path / "run") == pytest.approx(logged(straight_run), abs=1e-6)


def test_finished_run_leaves_no_loader_workers(images, tmp_path):
    """The trainer drops its loader's iterator when the loop ends: left to the cycle collector (the hooks
    hold the trainer), the workers would live on and cost ~10 s (5 s per worker) wherever it runs."""
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(images), max_iters=1,
                          data={"num_workers": 2})
    try:
        assert main(pretrain_argv(config)) == 0
        assert multiprocessing.active_children() == []
    finally:
        stop_loader_workers()


# ----------------------------------------------------------------------------- 5. bad folders and images


def test_empty_class_folder_is_named(images, tmp_path, capsys):
    root = tmp_path / "train"
    shutil.copytree(images, root)
    os.mkdir(root / "zebra")
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(root))
    assert run_pretrain(config) == 2
    err = capsys.readouterr().err
    assert "detkit pretrain: error:" in err and str(root) in err and "zebra" in err


def test_missing_and_empty_listed_images_are_named(images, tmp_path, capsys):
    (tmp_path / "blank.png").write_bytes(b"")
    rows = [f"{images / c / '0.png'},{c}" for c in CLASSES] + [f"{tmp_path / 'gone.png'},c0", "blank.png,c1"]
    (tmp_path / "list.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    listed = {"name": "image_list", "file": str(tmp_path / "list.csv")}
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", listed)
    assert run_pretrain(config) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gone.png") in err and "not found" in err
    assert str(tmp_path / "blank.png") in err and "empty file" in err
    assert str(images / "c0" / "0.png") not in err


def with_corrupt_images(images, root, count):
    shutil.copytree(images, root)
    bad = [root / CLASSES[k] / "bad.png" for k in range(count)]
    for path in bad:
        path.write_bytes(b"this is not a PNG file")
    return bad


def test_corrupt_training_image_is_skipped_and_named(images, tmp_path, caplog):
    [bad] = with_corrupt_images(images, tmp_path / "train", 1)
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(tmp_path / "train"), max_iters=2)
    with caplog.at_level(logging.WARNING):
        assert run_pretrain(config) == 0  # 16 samples: the 9 images' first epoch and more
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in w and "skipped" in w for w in warnings), warnings


def test_more_corrupt_images_than_allowed_stop_training(images, tmp_path, capsys):
    bad = with_corrupt_images(images, tmp_path / "train", 2)
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(tmp_path / "train"), max_iters=2,
                          max_bad_images=1)
    assert run_pretrain(config) == 2
    err = capsys.readouterr().err
    assert "train.max_bad_images=1" in err and all(str(p) in err for p in bad)
    assert not (tmp_path / "run" / "final.pth").exists()


# ----------------------------------------------------------------------------- 6. eval-cls


def test_pretrain_writes_its_evaluation(pretrained):
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["count"] == 8 and metrics["class_names"] == list(CLASSES)
    assert (pretrained / "confusion_matrix.png").stat().st_size > 0


@pytest.mark.parametrize("ten_crop", [False, True], ids=["centre", "ten_crop"])
def test_eval_cls_report(ten_crop, pretrained, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval-cls", str(pretrained / "final.pth"), "--output", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv + (["--ten-crop"] if ten_crop else [])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ten_crop"] is ten_crop and metrics["count"] == 8
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1 and metrics["top5_k"] == 4
    assert metrics["top5"] == 1.0  # top-4 of 4 classes
    assert set(metrics["per_class"]) == set(CLASSES)
    confusion = np.array(metrics["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == 8 and (confusion.sum(1) == 2).all()
    assert metrics["top1"] == pytest.approx(np.trace(confusion) / 8)
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert "top-1" in capsys.readouterr().out


def test_eval_cls_refuses_data_of_other_classes(pretrained, tmp_path, capsys):
    write_images(tmp_path / "other", classes=("cat", "dog"))
    assert main(["eval-cls", str(pretrained / "final.pth"), "--data", str(tmp_path / "other"),
                 "--output", str(tmp_path / "eval"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "detkit eval-cls: error: --data" in err and "cat, dog" in err


def test_checkpoints_of_the_other_task_are_refused_by_kind(pretrained, detector_run, tmp_path, capsys):
    assert main(["eval-cls", str(detector_run / "final.pth"), "--output", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "detkit eval-cls: error:" in err and "holds a detector" in err
    assert main(["eval", str(pretrained / "final.pth"), "--output", str(tmp_path / "b"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "detkit eval: error:" in err and "holds a classifier" in err


# ----------------------------------------------------------------------------- 7. image lists


def test_csv_and_json_image_lists_give_the_same_items(images, tmp_path):
    files = [(f"{c}/{i}.png", c) for c in CLASSES for i in range(2)]
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,label\n" + "".join(f"{f},{c}\n" for f, c in files))
    json_path = tmp_path / "list.json"
    entries = [{"image": f, "label": c if k % 2 else CLASSES.index(c)} for k, (f, c) in enumerate(files)]
    json_path.write_text(json.dumps({"classes": list(CLASSES), "images": entries}))
    from_csv = image_list(str(csv_path), root=str(images))
    from_json = image_list(str(json_path), root=str(images))
    assert from_csv.class_names == from_json.class_names == list(CLASSES)
    assert from_csv.items == from_json.items == [(str(images / f), CLASSES.index(c)) for f, c in files]
    assert np.array_equal(from_csv[3][0], from_json[3][0]) and from_csv[3][1] == {"label": 1}


def test_a_label_outside_the_classes_is_named(tmp_path, registries, capsys):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,label\na.png,c0\nb.png,c1\nc.png,zebra\n")
    with pytest.raises(DatasetError, match=r"list\.csv: entry 3: label 'zebra' is not one of the 2 classes"):
        image_list(str(csv_path), classes=["c0", "c1"])
    json_path = tmp_path / "list.json"
    json_path.write_text(json.dumps({"classes": ["c0", "c1"], "images": [{"image": "a.png", "label": 7}]}))
    with pytest.raises(DatasetError, match=r"list\.json: entry 1: label 7 is not one of the 2 classes \(c0, c1\)"):
        build_classification_dataset({"name": "image_list", "file": str(json_path)}, registries, "train")
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", {"name": "image_list", "file": str(json_path)})
    assert run_pretrain(config) == 2
    assert f"data.train: {json_path}: entry 1: label 7" in capsys.readouterr().err


def test_digits_are_a_stratified_split_of_lenet_sized_images():
    train, test = digits("train"), digits("test")
    assert isinstance(train, DigitsDataset) and (len(train), len(test)) == (1347, 450)
    image, target = test[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image[:2].max() == 0  # the 2-pixel frame
    assert train.class_names == [str(d) for d in range(10)] and np.bincount(test.labels).min() >= 43


# ----------------------------------------------------------------------------- 8. learning-rate schedule


def test_cosine_schedule_after_the_warmup():
    cfg = TrainConfig(lr_policy="cosine", warmup_iters=10, warmup_factor=0.001, max_iters=110)
    factors = [lr_factor(i, cfg) for i in range(111)]
    assert factors[0] == pytest.approx(0.001) and factors[10] == 1.0
    assert factors[60] == pytest.approx(0.5) and factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # the warmup rises
    assert all(a > b for a, b in zip(factors[10:110], factors[11:]))  # then the cosine falls to 0


def test_unknown_schedule_is_refused_before_training(images, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(images))
    assert run_pretrain(config, "train.lr_policy=linear") == 2
    err = capsys.readouterr().err
    assert "detkit pretrain: error: train.lr_policy='linear': expected one of step, cosine" in err
    assert not (tmp_path / "run").exists()


def test_input_below_the_backbones_smallest_is_refused(images, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(images), backbone="inception_v3",
                          args={})
    assert run_pretrain(config, "model.input_size=48") == 2
    assert "model.input_size=48: inception_v3 takes inputs of at least 75x75" in capsys.readouterr().err


def test_detection_schedule_is_refused_before_training(images, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yaml", tmp_path / "run", folder_spec(images))
    assert run_pretrain(config, "train.schedule=four_step") == 2
    assert "train.schedule='four_step': pretraining is one run of SGD" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 9. the shipped configs


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain_*.yaml"))),
                         ids=os.path.basename)
def test_pretrain_config_names_registered_parts(path, registries):
    cfg = load_config(path, schema=ClassifierConfig)
    backbone = registries.backbones.get(cfg.model.backbone.name)
    check_kwargs(backbone.builder, {"num_classes": 10, **cfg.model.backbone.args}, "model.backbone.args")
    for key in ("train", "test"):
        spec = getattr(cfg.data, key)
        if key == "train" or spec is not None:
            entry, kwargs = dataset_entry(spec, registries.classification_datasets, key, "", ("transform",))
            check_kwargs(entry.builder, kwargs, f"data.{key}")
    check_augment(cfg.data.augment)
    check_train_settings(cfg.train)


def test_validation_classes_other_than_the_training_classes_and_a_single_class_are_refused(images, tmp_path,
                                                                                           capsys):
    """Pretraining took a validation folder of other classes (and scored misaligned labels) and a one-class
    folder; eval-cls refused the same folder. Both are refused before training."""
    other = tmp_path / "val"
    shutil.copytree(images, other)
    shutil.move(str(other / CLASSES[-1]), str(other / "zebra"))  # same count, another name
    config = write_config(tmp_path / "a.yaml", tmp_path / "a", folder_spec(images), folder_spec(other))
    assert run_pretrain(config) == 2
    err = capsys.readouterr().err
    assert "data.test: its classes (" in err and "zebra" in err and "are not data.train's" in err
    assert not (tmp_path / "a" / "final.pth").exists()
    single = tmp_path / "single"
    shutil.copytree(images / CLASSES[0], single / CLASSES[0])
    config = write_config(tmp_path / "b.yaml", tmp_path / "b", folder_spec(single))
    assert run_pretrain(config) == 2
    assert f"data.train: one class ({CLASSES[0]})" in capsys.readouterr().err


def test_periodic_validation_keeps_the_best_top1_in_best_pth(images, tmp_path):
    """eval.period in pretraining keeps best.pth by top-1, the detection trainer's mechanism (issue 26, item 2)."""
    from detkit.engine.checkpoint import load_checkpoint

    config = write_config(tmp_path / "c.yaml", tmp_path / "run", folder_spec(images), test=folder_spec(images),
                          max_iters=4)
    assert run_pretrain(config, "eval.period=2") == 0
    top1 = logged(tmp_path / "run", "top1/val")
    final = load_checkpoint(str(tmp_path / "run" / "final.pth"), task="classification")
    best = load_checkpoint(str(tmp_path / "run" / "best.pth"), task="classification")
    assert set(top1) == {2, 4} and final["best"]["metric"] == "top1"
    assert final["best"]["value"] == max(top1.values()) and best["iteration"] == final["best"]["iteration"]
    assert top1[best["iteration"]] == max(top1.values()) and (best["iteration"] == 2 or top1[4] > top1[2])
