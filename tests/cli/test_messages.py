"""Bad input gets a message, not a traceback or a silent wrong result: config ranges, number spellings, which
source a bad value came from, unwritable outputs, unusable weights paths, unreadable image folders, VOC
classes from the checkpoint, OpenCV's own log lines, checkpoint permissions, and pictures that stay
readable (issue 15, items 5, 7, 8 and 10)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from detkit.cli import main
from detkit.config import Config, ConfigError, bind_parts, from_dict, load_config, to_dict
from detkit.engine.checkpoint import save_checkpoint
from detkit.models.loading import model_from_checkpoint

SIZE = "120x160"
SYNTH_CLASSES = ["circle", "square", "triangle", "star", "cross"]
TINY_MODEL = {
    "backbone": {"name": "tiny", "args": {"widths": [8, 16, 32, 48, 48], "hidden": 64}},
    "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128]}, "pre_nms_top_n_test": 100,
                           "post_nms_top_n_test": 20, "min_size": 2},
    "transform": {"min_size": 120, "max_size": 160},
}


def write(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for fmt in ("coco", "voc"):
        assert main(["data", "synth", "--output", str(root / fmt), "--format", fmt, "--num-images", "3", "--seed", "0",
                     "--size", SIZE]) == 0
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, registries):
    """An untrained tiny detector of the synthetic classes, as a checkpoint (what is tested needs no training)."""
    from detkit.models.assembly import build_detector

    cfg = bind_parts(from_dict({"model": {**TINY_MODEL, "num_classes": 5, "class_names": SYNTH_CLASSES}}), registries)
    torch.manual_seed(0)
    model = build_detector(cfg.model, registries, 5, SYNTH_CLASSES)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(str(path), model_state=model.state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=SYNTH_CLASSES, cat_ids=[1, 2, 3, 4, 5])
    return path


def train_config(tmp_path, data_dir, **train):
    data = {"model": TINY_MODEL,
            "data": {"train": {"name": "coco", "images": f"{data_dir}/coco/images",
                               "annotations": f"{data_dir}/coco/annotations.json"}, "num_workers": 0},
            "train": {"work_dir": str(tmp_path / "run"), "max_iters": 2, "eval_at_end": False, **train}}
    return write(tmp_path / "cfg.yaml", data)


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start (the end_to_end schedule's run is replaced): the command has to fail before."""
    import detkit_core

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input was bad")

    monkeypatch.setattr(detkit_core, "_end_to_end", refuse)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot create files in (root may write into any folder, but not into /proc)."""
    if os.geteuid() == 0:
        yield Path("/proc")
        return
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


# ----------------------------------------------------------------------------- item 5: ranges


@pytest.mark.parametrize("data, message", [
    ({"train": {"max_iters": 0}}, "train.max_iters=0: expected an integer >= 1"),
    ({"train": {"max_iters": -5}}, "train.max_iters=-5: expected an integer >= 1"),
    ({"train": {"lr": 0}}, "train.lr=0.0: expected a number > 0"),
    ({"train": {"lr": -0.01}}, "train.lr=-0.01: expected a number > 0"),
    ({"train": {"lr": float("inf")}}, "train.lr=inf: expected a number > 0"),
    ({"train": {"momentum": 1.5}}, "train.momentum=1.5: expected a number in [0, 1]"),
    ({"train": {"steps": [10, -1]}}, "train.steps[1]=-1: expected an integer >= 0"),
    ({"train": {"checkpoint_period": -1}}, "train.checkpoint_period=-1: expected an integer >= 0"),
    ({"data": {"batch_size": 0}}, "data.batch_size=0: expected an integer >= 1"),
    ({"data": {"num_workers": -1}}, "data.num_workers=-1: expected an integer >= 0"),
    ({"data": {"augment": {"hflip": 2}}}, "data.augment.hflip=2.0: expected a number in [0, 1]"),
    ({"model": {"transform": {"min_size": [400, -1]}}}, "model.transform.min_size[1]=-1: expected an integer >= 0"),
    ({"model": {"backbone": {"freeze_at": -2}}}, "model.backbone.freeze_at=-2: expected an integer >= -1"),
    ({"model": {"num_classes": 0}}, "model.num_classes=0: expected an integer >= 1"),
])
def test_out_of_range_values_name_the_key_the_value_and_the_range(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(data, "c.yaml")
    assert str(err.value) == f"c.yaml: {message}"


@pytest.mark.parametrize("part, message", [
    ({"roi_heads": {"positive_fraction": 1.5}}, "model.roi_heads.positive_fraction=1.5: expected a number in [0, 1]"),
    ({"roi_heads": {"fg_iou_thresh": -0.5}}, "model.roi_heads.fg_iou_thresh=-0.5: expected a number in [0, 1]"),
    ({"proposal_generator": {"name": "rpn", "nms_thresh": 1.5}},
     "model.proposal_generator.nms_thresh=1.5: expected a number in [0, 1]"),
    ({"proposal_generator": {"name": "rpn", "post_nms_top_n_test": 0}},
     "model.proposal_generator.post_nms_top_n_test=0: expected an integer >= 1"),
    ({"proposal_generator": {"name": "rpn", "anchors": {"sizes": [32, -8]}}},
     "model.proposal_generator.anchors.sizes[1]=-8.0: expected a number > 0"),
    ({"proposal_generator": {"name": "selective_search", "top_k": 0}},
     "model.proposal_generator.top_k=0: expected an integer >= 1"),
    ({"roi_extractor": {"name": "spp", "levels": [4, 0]}}, "model.roi_extractor.levels[1]=0: expected an integer >= 1"),
    ({"roi_extractor": {"name": "roi_align", "sampling_ratio": -1}},
     "model.roi_extractor.sampling_ratio=-1: expected an integer >= 0"),
    ({"roi_extractor": {"name": "warp", "warp_batch": 0}},
     "model.roi_extractor.warp_batch=0: expected an integer >= 1"),
    ({"neck": {"name": "fpn", "out_channels": 0}}, "model.neck.out_channels=0: expected an integer >= 1"),
    ({"box_head": {"name": "conv_fc", "num_conv": 0}}, "model.box_head.num_conv=0: expected an integer >= 1"),
    ({"box_predictor": {"name": "softmax_box", "dropout": 1.0}},
     "model.box_predictor.dropout=1.0: expected a number in [0, 1)"),
    ({"box_predictor": {"name": "svm", "C": 0}}, "model.box_predictor.C=0.0: expected a number > 0"),
])
def test_parts_settings_are_range_checked_when_bound(part, message, registries):
    cfg = from_dict({"model": part}, "c.yaml")  # the part's keys are unchecked until its settings class is known
    with pytest.raises(ConfigError) as err:
        bind_parts(cfg, registries, "c.yaml")
    assert str(err.value) == f"c.yaml: {message}"


#: numeric keys with no range: scores can be SVM margins, thresholds below 0 mean "keep all", means any value
UNBOUNDED = {"RoIHeadsSettings.score_thresh", "EvalConfig.score_thresh", "TransformConfig.mean",
             "RPNSettings.straddle_thresh", "SVMSettings.hard_thresh", "SVMSettings.evict_thresh"}


def _numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return any(a in (int, float) or typing.get_args(a) in ((int,), (float,)) for a in args)


def test_every_numeric_key_declares_its_range_and_its_default_lies_in_it(registries):
    classes, todo = [], [Config]
    for kind in registries.kinds:
        todo += [e.settings for e in registries.kind(kind).entries() if e.settings is not None]
    while todo:
        cls = todo.pop()
        if cls in classes:
            continue
        classes.append(cls)
        for f, tp in ((f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)):
            todo += [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
            if not _numeric(tp) or f"{cls.__name__}.{f.name}" in UNBOUNDED:
                continue
            bounds = f.metadata.get("range")
            assert bounds is not None, f"{cls.__name__}.{f.name} has no range"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for v in default if isinstance(default, list) else [default]:
                assert v is None or bounds.admits(v), f"{cls.__name__}.{f.name} default {v} not {bounds}"
    assert len(classes) > 15  # the core sections and every built-in part's settings were seen


def test_train_with_a_zero_iteration_count_stops_before_training(tmp_path, data_dir, no_training, capsys):
    cfg = train_config(tmp_path, data_dir)
    assert main(["train", str(cfg), "--set", "train.max_iters=0"]) == 2
    err = capsys.readouterr().err
    assert "train.max_iters=0: expected an integer >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- item 7: number spellings


def test_every_float_spelling_is_a_number(tmp_path, registries):
    path = write(tmp_path / "c.yaml", "train:\n  lr: 1e-3\n  weight_decay: 5E-4\n  momentum: '0.9'\n"
                                      "  warmup_factor: 1.5e-2\n  gamma: +1e-1\n  max_iters: 1e3\n  steps: [5e2, 800]\n"
                                      "model:\n  transform:\n    std: [1e0, 2.5E+0, 3]\n")
    cfg = load_config(path, ["train.clip_grad_norm=1E4", "train.seed=1_000", "model.roi_heads.nms_thresh=3e-1"],
                      registries)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.momentum, t.warmup_factor, t.gamma) == (1e-3, 5e-4, 0.9, 1.5e-2, 0.1)
    assert all(isinstance(v, float) for v in (t.lr, t.weight_decay, t.momentum, t.clip_grad_norm))
    assert t.clip_grad_norm == 1e4 and cfg.model.roi_heads.nms_thresh == 0.3
    assert cfg.model.transform.std == [1.0, 2.5, 3.0]
    # An integer key takes an integral spelling ("1e3" is 1000) and stays an int.
    assert (t.max_iters, t.steps, t.seed) == (1000, [500, 800], 1000)
    assert all(type(v) is int for v in (t.max_iters, *t.steps, t.seed))


@pytest.mark.parametrize("override, message", [
    ("train.max_iters=2.5", "train.max_iters: expected an integer, got 2.5"),
    ("train.max_iters=1e-3", "train.max_iters: expected an integer, got '1e-3'"),
    ("train.lr=1e-3x", "train.lr: expected a number, got '1e-3x'"),
    ("train.lr=nan", "train.lr: expected a number, got 'nan'"),
    ("train.lr=true", "train.lr: expected a number, got True"),
    ("train.lr=-1e-3", "train.lr=-0.001: expected a number > 0"),
])
def test_what_is_no_number_stays_an_error(tmp_path, override, message):
    path = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, [override])


# ----------------------------------------------------------------------------- item 10: --set is the source


def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path, registries):
    path = write(tmp_path / "c.yaml", {"train": {"lr": 0.1}, "model": {"proposal_generator": "rpn"}})
    cases = [(["train.lr=abc"], "--set train.lr=abc: train.lr: expected a number, got 'abc'"),
             (["train.lrr=1"], "--set train.lrr=1: unknown key 'train.lrr'; did you mean 'train.lr'?"),
             (["data.batch_size=0"], "--set data.batch_size=0: data.batch_size=0: expected an integer >= 1"),
             (["model.transform.min_size=[1, -2]"],
              "--set model.transform.min_size=[1, -2]: model.transform.min_size[1]=-2: expected an integer >= 0"),
             # the parts' own keys, checked later against their settings classes
             (["model.proposal_generator.nms_thresh=2"],
              "--set model.proposal_generator.nms_thresh=2: model.proposal_generator.nms_thresh=2.0: expected a number "
              "in [0, 1]"),
             (["model.proposal_generator=rnp"], "--set model.proposal_generator=rnp: model.proposal_generator.name: "),
             # the last override that wrote the key is named
             (["train.lr=0.5", "train.lr=-1"], "--set train.lr=-1: train.lr=-1.0: expected a number > 0")]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            load_config(path, overrides, registries)
        assert str(err.value).startswith(message), (overrides, str(err.value))
        assert str(path) not in str(err.value)
    # A bad key of the file is still the file's, whatever is overridden beside it.
    bad = write(tmp_path / "bad.yaml", {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: train\.lr: expected a number"):
        load_config(bad, ["train.max_iters=3"], registries)


def test_a_bad_override_of_a_checkpoints_config_is_blamed_on_the_override(checkpoint, registries):
    for override, message in [("model.roi_heads.nms_thresh=5", "model.roi_heads.nms_thresh=5.0: expected a number in"),
                              ("model.proposal_generator.post_nms_top_n_test=0",
                               "model.proposal_generator.post_nms_top_n_test=0: expected an integer >= 1")]:
        with pytest.raises(ConfigError) as err:
            model_from_checkpoint(str(checkpoint), registries, torch.device("cpu"), [override])
        assert str(err.value).startswith(f"--set {override}: {message}"), str(err.value)


# ----------------------------------------------------------------------------- item 8: outputs and weights paths


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path, checkpoint, data_dir, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    image = next((data_dir / "coco" / "images").iterdir())
    missing_ckpt = str(tmp_path / "nope.pth")  # the output is checked before the checkpoint is even read
    for argv in (["infer", missing_ckpt, str(image), "--output", str(a_file)],
                 ["infer", missing_ckpt, str(image), "--output", str(a_file / "below")],
                 ["eval", missing_ckpt, "--output", str(a_file)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--output {a_file}" in err and "is a file, not a folder" in err and "Traceback" not in err, err
        assert err.count("\n") == 1  # one paragraph
    results = tmp_path / "results.json"
    results.write_text("[]")
    assert main(["eval", "--results", str(results), "--dataset", str(data_dir / "coco" / "annotations.json"),
                 "--output", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, checkpoint, data_dir, unwritable_dir, capsys):
    out = unwritable_dir / "detkit_out"
    image = next((data_dir / "coco" / "images").iterdir())
    for argv in (["infer", str(tmp_path / "nope.pth"), str(image), "--output", str(out)],
                 ["eval", str(tmp_path / "nope.pth"), "--output", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--output {out}" in err and f"{unwritable_dir} is not writable" in err, err
    assert not out.exists()


def test_train_refuses_an_unusable_work_dir_or_weights_path_before_training(tmp_path, data_dir, no_training,
                                                                           unwritable_dir, capsys):
    cfg = train_config(tmp_path, data_dir)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "weights_dir").mkdir()
    os.symlink(tmp_path / "gone.pth", tmp_path / "dangling.pth")
    cases = [(f"train.work_dir={a_file}", f"train.work_dir {a_file}: cannot write outputs there: it is a file"),
             (f"train.work_dir={unwritable_dir / 'run'}", f"{unwritable_dir} is not writable"),
             (f"model.backbone.weights={tmp_path / 'weights_dir'}",
              f"model.backbone.weights: {tmp_path / 'weights_dir'} is a folder; expected a file"),
             (f"model.backbone.weights={tmp_path / 'missing.pth'}",
              f"model.backbone.weights: {tmp_path / 'missing.pth'}: no such file"),
             (f"model.backbone.weights={tmp_path / 'dangling.pth'}", f"a link to {tmp_path / 'gone.pth'}, which does "
                                                                     f"not exist")]
    for override, message in cases:
        assert main(["train", str(cfg), "--set", override]) == 2, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (override, err)


# ----------------------------------------------------------------------------- item 10: unreadable inputs


def test_a_folder_of_unreadable_images_is_an_error(tmp_path, checkpoint, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    (folder / "b.jpg").write_bytes(b"")
    os.symlink(tmp_path / "gone.jpg", folder / "c.jpg")
    out = tmp_path / "out"
    assert main(["infer", str(checkpoint), str(folder), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: none of its 3 images could be read" in err
    assert "a.png: not a decodable image" in err and "b.jpg: empty file" in err and "c.jpg: a link to" in err
    assert not (out / "results.json").exists()


def test_a_dangling_link_is_reported_like_an_unreadable_image(tmp_path, checkpoint, data_dir, capsys, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    image = next((data_dir / "coco" / "images").iterdir())
    (folder / image.name).write_bytes(image.read_bytes())
    os.symlink(tmp_path / "moved_away.png", folder / "link.png")
    out = tmp_path / "out"
    assert main(["infer", str(checkpoint), str(folder), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "on 1 images" in printed and f"skipped 1 unreadable images: {folder / 'link.png'}" in printed
    assert f"link.png: a link to {tmp_path / 'moved_away.png'}, which does not exist" in caplog.text


def test_eval_on_a_voc_directory_takes_the_checkpoints_classes(tmp_path, checkpoint, data_dir, capsys):
    out = tmp_path / "eval"
    voc = str(data_dir / "voc")
    assert main(["eval", str(checkpoint), "--data", voc, "--split", "test", "--output", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_class"]) == SYNTH_CLASSES
    # --classes still wins: a class list without the synthetic classes cannot read these annotations.
    assert main(["eval", str(checkpoint), "--data", voc, "--split", "test", "--classes", "dog,cat", "--output",
                 str(out), "--no-progress"]) == 2
    assert "not in the class list (dog, cat)" in capsys.readouterr().err


def test_opencv_prints_nothing_of_its_own_about_a_bad_video(tmp_path):
    from detkit.data.media import VideoSink

    bad = tmp_path / "bad.mp4"  # FFmpeg: "moov atom not found"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    unknown = tmp_path / "notes.bin"
    unknown.write_bytes(b"plain bytes" * 50)
    with VideoSink(str(tmp_path / "clip.avi"), 10, (64, 48)) as sink:
        for _ in range(12):
            sink.write(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    cut = tmp_path / "cut.avi"  # FFmpeg: "overread" while decoding the last frame
    cut.write_bytes((tmp_path / "clip.avi").read_bytes()[: (tmp_path / "clip.avi").stat().st_size // 3])
    code = ("import sys\nfrom detkit.data.media import MediaError, classify_input, open_video\n"
            "for call, spec in ((open_video, sys.argv[1]), (classify_input, sys.argv[2]), (open_video, sys.argv[3]),\n"
            "                   (open_video, '7')):\n"  # no such webcam: OpenCV's own "[ WARN:0@0.03]" lines
            "    try:\n        print(sum(1 for _ in call(spec)))\n    except MediaError as exc:\n        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(bad), str(unknown), str(cut)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{bad}: cannot be opened as a video" in done.stdout and f"{unknown}: not an image" in done.stdout
    assert "webcam 7: cannot be opened as a video" in done.stdout
    assert done.stderr == ""


# ----------------------------------------------------------------------------- item 10: outputs


def test_checkpoints_get_the_permissions_of_every_other_output(tmp_path):
    from detkit.engine.files import write_json_atomic

    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            ckpt, other = tmp_path / f"c{umask:o}.pth", tmp_path / f"o{umask:o}.json"
            save_checkpoint(str(ckpt), model_state={"w": torch.zeros(2)}, config={}, iteration=0, class_names=["a"],
                            cat_ids=[1])
            write_json_atomic(other, {})
        finally:
            os.umask(old)
        assert os.stat(ckpt).st_mode & 0o777 == os.stat(other).st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c22.pth", "c77.pth", "o22.json", "o77.json"]


@pytest.fixture
def drawn(monkeypatch):
    """What the pictures' code draws: ``texts`` (every cv2.putText) and ``tags`` (filled rectangles x, y, w, h)."""
    seen = {"texts": [], "tags": []}
    put_text, rectangle = cv2.putText, cv2.rectangle

    def record_text(image, text, *args, **kwargs):
        seen["texts"].append(text)
        return put_text(image, text, *args, **kwargs)

    def record_rectangle(image, p1, p2, colour, thickness=1, *args, **kwargs):
        if thickness < 0:
            seen["tags"].append((p1[0], p1[1], p2[0] - p1[0] + 1, p2[1] - p1[1] + 1))
        return rectangle(image, p1, p2, colour, thickness, *args, **kwargs)

    monkeypatch.setattr(cv2, "putText", record_text)
    monkeypatch.setattr(cv2, "rectangle", record_rectangle)
    return seen


class OneImageDataset:
    """An image of 30 trees (40 x 40 pixels, 50 apart) seen from above, as write_gallery reads a dataset."""

    class_names = ["tree"]
    cat_ids = [1]

    def __init__(self):
        self.boxes = np.array([[100 + 50 * c, 100 + 50 * r, 140 + 50 * c, 140 + 50 * r] for r in range(5)
                               for c in range(6)], np.float32)

    def __len__(self):
        return 1

    def image_info(self, k):
        return {"id": 7}

    def __getitem__(self, k):
        image = np.full((1000, 1000, 3), 90, np.uint8)
        return image, {"boxes": torch.from_numpy(self.boxes), "labels": torch.ones(len(self.boxes), dtype=torch.int64)}


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_gallery_ground_truth_has_no_scores_and_a_dense_scene_stays_visible(tmp_path, drawn, monkeypatch):
    from detkit.evaluation import drawing
    from detkit.evaluation.reports import write_gallery

    starts, draw = [], drawing.draw_detections  # where each picture's tags begin in drawn["tags"]
    monkeypatch.setattr(drawing, "draw_detections",
                        lambda *a, **k: starts.append(len(drawn["tags"])) or draw(*a, **k))
    dataset = OneImageDataset()
    detections = [{"image_id": 7, "category_id": 1, "bbox": [float(x1), float(y1), 40.0, 40.0], "score": 0.9 - 0.01 * k}
                  for k, (x1, y1, _, _) in enumerate(dataset.boxes)]
    write_gallery(dataset, {}, detections, {7: 0.5}, str(tmp_path / "gallery.png"), worst=True)
    assert cv2.imread(str(tmp_path / "gallery.png")) is not None
    tags = [t for t in drawn["texts"] if not t.startswith("id ")]
    truth = [t for t in tags if not re.search(r"\d\.\d\d", t)]
    assert truth and set(truth) == {"tree"}  # the ground truth's tags name the class only
    assert "tree 0.90" in tags and not any("1.00" in t for t in tags)
    # In each picture (detections, then ground truth) the tags shrank with the boxes, no two overlap and
    # together they cover at most a quarter: the detections' wider "tree 0.90" tags could not all stay.
    assert len(starts) == 2
    detected, truth = drawn["tags"][: starts[1]], drawn["tags"][starts[1]:]
    assert 0 < len(detected) < 30 and len(truth) == 30
    for rects in (detected, truth):
        assert not any(_overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1:])
        assert sum(w * h for _, _, w, h in rects) <= 0.25 * 1000 * 1000
        assert all(h <= 24 for _, _, _, h in rects)


def test_the_most_confident_detection_keeps_its_tag(drawn):
    from detkit.evaluation.drawing import draw_detections

    boxes = np.array([[10, 40, 60, 90], [12, 42, 62, 92], [14, 44, 64, 94]], np.float32)  # on top of each other
    draw_detections(np.zeros((120, 160, 3), np.uint8), boxes, [0.5, 0.95, 0.7], [1, 1, 1], ["thing"])
    assert drawn["texts"] == ["thing 0.95"]


@pytest.mark.parametrize("argv, message", [
    (["infer", "ckpt", "in", "--score-thr", "nan"], "argument --score-thr: 'nan': expected a finite number"),
    (["infer", "ckpt", "in", "--overlap", "1.5"], "argument --overlap: '1.5': expected a number in [0, 1)"),
    (["infer", "ckpt", "in", "--tile", "-1"], "argument --tile: '-1': expected an integer >= 0"),
    (["infer", "ckpt", "in", "--tile-batch", "2.5"], "argument --tile-batch: '2.5': expected an integer >= 1"),
    (["export", "ckpt", "--format", "onnx", "--output", "m.onnx", "--tolerance", "0"],
     "argument --tolerance: '0': expected a number > 0"),
    (["data", "synth", "--output", "d", "--num-images", "0"], "argument --num-images: '0': expected an integer >= 1"),
    (["data", "tile", "--in", "a.json", "--output", "d", "--keep-empty", "2"],
     "argument --keep-empty: '2': expected a number in [0, 1]"),
])
def test_numeric_options_are_refused_outside_their_range_before_anything_runs(argv, message, capsys):
    from detkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_every_numeric_option_of_every_command_has_a_range():
    import argparse

    from detkit.cli import build_parser

    unchecked, parsers = [], [("detkit", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
            elif action.type in (int, float) or (action.type is None and any(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in (action.default, action.const))):
                # int/float take any number; an untyped option with a numeric default takes any string
                unchecked.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert unchecked == []


class WideImageDataset(OneImageDataset):
    """One 5000 x 200 strip (as wide as the gallery that once came out 18725 x 10004 px)."""

    def __getitem__(self, k):
        return np.full((200, 5000, 3), 90, np.uint8), {"boxes": torch.tensor([[10.0, 10.0, 90.0, 90.0]]),
                                                       "labels": torch.ones(1, dtype=torch.int64)}


def test_gallery_rows_fit_one_cell_whatever_the_image_sizes(tmp_path):
    from detkit.evaluation.reports import GALLERY_CELL, write_gallery

    for dataset in (WideImageDataset(), OneImageDataset()):
        write_gallery(dataset, {}, [], {7: 0.5}, str(tmp_path / "g.png"), worst=True)
        assert cv2.imread(str(tmp_path / "g.png")).shape == (*GALLERY_CELL, 3)


def test_metrics_and_results_are_written_before_the_pictures(tmp_path, monkeypatch):
    """A 20000 x 200 image was OOM-killed while its gallery was drawn, leaving no metrics.json."""
    from detkit.data import COCODataset
    from detkit.data.synth import synthesize
    from detkit.evaluation import reports
    from detkit.evaluation.runner import score_and_write

    synthesize(str(tmp_path / "data"), "coco", 2, seed=0, image_size=(64, 64))
    dataset = COCODataset(str(tmp_path / "data" / "images"), str(tmp_path / "data" / "annotations.json"))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in dataset.to_coco()["annotations"]]

    def killed(*_, **__):
        raise MemoryError("drawing the gallery")

    monkeypatch.setattr(reports, "write_gallery", killed)
    with pytest.raises(MemoryError):
        score_and_write(dataset, results, str(tmp_path / "out"), "coco", "faster_coco_eval", dataset.class_names)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["AP"] == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == len(results)


def test_a_user_error_in_a_loader_worker_is_reported_without_the_workers_traceback():
    """"Caught ImageReadError in DataLoader worker process 0" and a traceback became the whole message."""
    from torch._utils import ExceptionWrapper

    from detkit.cli import _without_worker_traceback
    from detkit.data import ImageReadError

    try:
        raise ImageReadError("image id 3 of ann.json: x.png: not a decodable image (corrupt or unsupported format)")
    except ImageReadError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ImageReadError) as exc:
        wrapped.reraise()
    assert str(exc.value).startswith("Caught ImageReadError in DataLoader worker process 0")
    assert _without_worker_traceback(str(exc.value)) == (
        "image id 3 of ann.json: x.png: not a decodable image (corrupt or unsupported format)")
    assert _without_worker_traceback("plain: message") == "plain: message"


def test_a_file_that_is_not_an_onnx_model_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    from detkit.export.formats import load_exported
    from detkit.export.graph import ExportError

    for name, data in (("empty.onnx", b""), ("text.onnx", b"not a model\n"), ("cut.onnx", b"\x08\x07\x12\x04ab")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ExportError, match=f"{name}: not an ONNX model onnxruntime can load"):
            load_exported(str(tmp_path / name))
