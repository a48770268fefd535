"""Training and checkpoints that fail early and clearly and lose nothing (issue 15, items 1-4, 6, 9): divergence,
poisoned checkpoints, paths checked before the work starts, unreadable images, finished runs, pretrained
weights that fit nothing, stale temporaries, and files that are not checkpoints."""
import json
import logging
import os
import pickle
import re
import shutil
import signal
import types
import warnings
import zipfile

import pytest
import torch
import yaml
from torch import nn

from detkit.cli import main
from detkit.engine.checkpoint import NonFiniteCheckpointError, load_checkpoint, save_checkpoint
from detkit.engine.distributed import DistInfo
from detkit.engine.state_dict import WeightsError, read_state_dict
from detkit.training.loop import FiniteGuard, TrainingDiverged
from detkit.training.trainer import Trainer
from e2e_utils import synth_splits, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_splits(tmp_path_factory.mktemp("synth"), 12, 4)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished run: iter_0000002.pth, iter_0000004.pth and final.pth (iteration 6), not evaluated."""
    work = tmp_path_factory.mktemp("trained")
    cfg = write_config(work / "cfg.yaml", data_dir, work / "run", max_iters=6, steps=[5], checkpoint_period=2,
                       eval_at_end=False)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    return work / "run"


def copy_data(data_dir, dest):
    """A private copy of the synthetic dataset (the tests damage its images)."""
    shutil.copytree(data_dir, dest)
    return dest


def image_of(data, split="train", index=0):
    """``(image id, path)`` of an image of ``split`` that has objects (so training samples it)."""
    coco = json.loads((data / split / "annotations.json").read_text())
    with_objects = sorted({a["image_id"] for a in coco["annotations"]})
    image = next(i for i in coco["images"] if i["id"] == with_objects[index])
    return image["id"], data / split / "images" / image["file_name"]


def poison(path, key=None):
    """Write NaN into one weight of the checkpoint at ``path`` (as an older detkit saved diverged runs)."""
    ckpt = torch.load(path, weights_only=True)
    key = key or next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    torch.save(ckpt, path)
    return key


# ----------------------------------------------------------------------------- item 1: divergence


def fake_trainer(**train):
    settings = dict(log_period=5, checkpoint_period=4, max_iters=20, lr=0.01, work_dir="w") | train
    return types.SimpleNamespace(cfg=types.SimpleNamespace(train=types.SimpleNamespace(**settings)), start_iter=0,
                                 info=DistInfo(), model=nn.Linear(2, 2), last_checkpoint=None)


def test_guard_reads_the_device_flag_only_on_logging_and_checkpoint_iterations(monkeypatch):
    guard = FiniteGuard(fake_trainer())
    checked = []
    check = guard.check
    monkeypatch.setattr(guard, "check", lambda done, weights=False: (checked.append((done, weights)),
                                                                     check(done, weights)))
    finite = {"rpn/objectness": torch.tensor(0.7), "roi/cls": torch.tensor(1.2)}
    for done in range(1, 13):
        guard.after_step(done, finite)
    # the first iteration, every log_period and (with the weights) every checkpoint_period: no host read between
    assert checked == [(1, False), (4, True), (5, False), (8, True), (10, False), (12, True)]
    guard.after_step(13, {"rpn/objectness": torch.tensor(0.7), "roi/cls": torch.tensor(float("nan"))})
    guard.after_step(14, finite)  # a later finite loss does not hide the first non-finite one
    with pytest.raises(TrainingDiverged) as caught:
        guard.after_step(15, finite)
    message = str(caught.value)
    assert "not finite at iteration 13" in message and "found at iteration 15" in message and "roi/cls=nan" in message
    assert "rpn/objectness=0.7" in message and "no good checkpoint" in message and "train.lr" in message
    # finite losses but non-finite weights are caught before a checkpoint
    guard = FiniteGuard(fake_trainer())
    guard.trainer.last_checkpoint = "w/iter_0000004.pth"
    with torch.no_grad():
        guard.trainer.model.weight.fill_(float("inf"))
    for done in range(1, 4):
        guard.after_step(done, finite)
    with pytest.raises(TrainingDiverged, match=r"at iteration 4 the weights hold non-finite values \(1 of 2 "
                                               r"tensors: weight\).*w/iter_0000004.pth"):
        guard.after_step(4, finite)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only on CUDA")
def test_guard_adds_no_host_sync_between_logging_iterations():
    trainer = fake_trainer()
    trainer.model = trainer.model.cuda()
    guard = FiniteGuard(trainer)
    losses = {"rpn/objectness": torch.tensor(0.7, device="cuda"), "roi/cls": torch.tensor(1.2, device="cuda")}
    guard.after_step(1, losses)  # the first iteration is a logging one: it reads the flag back
    torch.cuda.set_sync_debug_mode("error")
    try:
        for done in (2, 3, 6, 7):  # neither logging (every 5) nor checkpoint (every 4) iterations
            guard.after_step(done, {k: v * done for k, v in losses.items()})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.after_step(5, losses)  # a logging iteration: checks, and all is finite


def test_divergence_stops_before_a_poisoned_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    steps = []
    original = Trainer.step

    def diverging(self):
        steps.append(1)
        if len(steps) < 3:
            return original(self)
        with torch.no_grad():  # from iteration 3 on the weights and the losses are NaN
            next(self.model.parameters()).fill_(float("nan"))
        return {"rpn/objectness": torch.tensor(0.5), "roi/cls": torch.tensor(float("nan"))}

    monkeypatch.setattr(Trainer, "step", diverging)
    work = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, work, max_iters=8, checkpoint_period=2, log_period=5,
                       eval_at_end=False)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training diverged: the loss is not finite at iteration 3" in err and "roi/cls=nan" in err
    assert "found at iteration 4" in err and f"{work / 'iter_0000002.pth'}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one paragraph
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_0000002.pth"]
    load_checkpoint(str(work / "iter_0000002.pth"))  # finite: it loads


def test_a_real_divergence_is_one_paragraph_and_exit_2(data_dir, tmp_path, capsys):
    work = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, work, lr=1e6, max_iters=6, steps=[5], checkpoint_period=1,
                       log_period=100)
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detkit train: error: training diverged: ") and "Traceback" not in err  # losses or weights
    assert "train.lr (now 1e+06)" in err and not (work / "final.pth").exists()
    for path in work.glob("*.pth"):  # whatever was written before it holds finite weights
        assert f"last good checkpoint is {path}" in err or load_checkpoint(str(path))


def test_save_checkpoint_never_writes_non_finite_weights(tmp_path):
    state = {"a.weight": torch.ones(2), "b.weight": torch.tensor([1.0, float("nan")]),
             "b.num_batches_tracked": torch.tensor(3)}
    with pytest.raises(NonFiniteCheckpointError, match=r"1 of 3 tensors: b.weight"):
        save_checkpoint(str(tmp_path / "x.pth"), model_state=state, config={}, iteration=1, class_names=["a"],
                        cat_ids=[1])
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_eval_infer_and_resume_refuse_poisoned_checkpoints(trained, data_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    key = poison(work / "final.pth")
    poison(work / "iter_0000004.pth")
    assert main(["eval", str(work / "final.pth"), "--output", str(tmp_path / "e"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "final.pth" in err and "non-finite" in err and key in err and "diverged" in err
    assert main(["infer", str(work / "final.pth"), str(data_dir / "val" / "images"), "--output",
                 str(tmp_path / "i"), "--no-progress"]) == 2
    assert key in capsys.readouterr().err
    cfg = write_config(tmp_path / "c.yaml", data_dir, work, max_iters=6, steps=[5], checkpoint_period=2,
                       eval_at_end=False)
    assert main(["train", str(cfg), "--resume", str(work / "iter_0000004.pth"), "--no-progress"]) == 2
    assert "iter_0000004.pth" in capsys.readouterr().err
    # --resume alone skips the poisoned checkpoints, saying so, and continues from the newest good one
    assert main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume skips")]
    assert len(skipped) == 2 and "final.pth" in skipped[0] and "iter_0000004.pth" in skipped[1]
    assert any(f"resumed from {work / 'iter_0000002.pth'} at iteration 2" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(str(work / "final.pth"))["iteration"] == 6


# ----------------------------------------------------------------------------- item 2: paths, images, outputs


def test_missing_test_set_is_reported_before_training(data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    cfg.write_text(cfg.read_text().replace(str(data_dir / "val" / "annotations.json"), str(tmp_path / "nope.json")))
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.test" in err and "nope.json" in err
    assert not (tmp_path / "run" / "log.jsonl").exists() and not list((tmp_path / "run").glob("*.pth"))


def test_missing_and_empty_images_are_named_before_the_first_iteration(data_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path / "data")
    (gone_id, gone), (empty_id, empty) = image_of(data, index=0), image_of(data, index=3)
    gone.unlink()
    empty.write_bytes(b"")
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run")
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.train: 2 of 12 image files are missing or empty" in err
    assert f"image id {gone_id}: {gone} (not found)" in err and f"image id {empty_id}: {empty} (empty)" in err
    assert not (tmp_path / "run" / "log.jsonl").exists()
    # the test set's images are checked before training too (when the run ends with an evaluation)
    data = copy_data(data_dir, tmp_path / "data2")
    test_id, test_image = image_of(data, "val")
    test_image.unlink()
    cfg = write_config(tmp_path / "c2.yaml", data, tmp_path / "run2")
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "data.test: 1 of 4 image files are missing or empty" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "log.jsonl").exists()


def test_corrupt_training_image_is_skipped_named_and_counted(data_dir, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    data = copy_data(data_dir, tmp_path / "data")
    bad_id, bad = image_of(data, index=2)
    bad.write_bytes(b"\x89PNG but not really an image")
    # 6 iterations of 2 images: one pass over the 12 training images, the corrupt one among them
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", max_iters=6, steps=[5], checkpoint_period=0,
                       eval_at_end=False)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    named = [w for w in warnings if w.startswith("skipped an unreadable training image")]
    assert len(named) == 1 and f"image id {bad_id}" in named[0] and str(bad) in named[0]
    assert any(w.startswith("skipped 1 unreadable training images") and str(bad) in w for w in warnings)
    # past train.max_bad_images the run stops, naming the image
    assert main(["train", str(cfg), "--no-progress", "--overwrite", "--set", "train.max_bad_images=0"]) == 2
    err = capsys.readouterr().err
    assert "train.max_bad_images=0" in err and f"image id {bad_id}: {bad}" in err


def test_unwritable_work_dir_and_bad_weights_paths_are_named_before_anything(data_dir, tmp_path, monkeypatch,
                                                                              registries):
    """Through the library (``train``), as tools and schedules call it, not only through the CLI."""
    from detkit.config import ConfigError, load_config
    from detkit.data.media import MediaError
    from detkit.training import train

    def config(work, *overrides):
        return load_config(write_config(tmp_path / "c.yaml", data_dir, work), list(overrides))

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    built = []
    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: built.append(a))  # nothing may get that far
    for work in (blocker, blocker / "run"):
        with pytest.raises(MediaError, match=f"train.work_dir {blocker}"):
            train(config(work), registries, progress=False)
    with pytest.raises(MediaError, match="model.backbone.weights: .*w.pth"):
        train(config(tmp_path / "run", f"model.backbone.weights={tmp_path / 'w.pth'}"), registries)
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="model.backbone.weights: .*w.pth: the file is empty"):
        train(config(tmp_path / "run", f"model.backbone.weights={tmp_path / 'w.pth'}"), registries)
    assert not built and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- items 3 and 6: the work dir


def test_finished_run_is_refused_unless_resumed_or_overwritten(data_dir, tmp_path, capsys):
    work = tmp_path / "run"
    work.mkdir()
    (work / ".tmp-killed.pth").write_bytes(b"half a checkpoint")  # a write that was killed
    cfg = write_config(tmp_path / "c.yaml", data_dir, work, max_iters=3, steps=[2], checkpoint_period=1,
                       eval_at_end=False)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert not list(work.glob(".tmp-*"))  # removed at the start
    assert sorted(p.name for p in work.glob("*.pth")) == ["final.pth", "iter_0000001.pth", "iter_0000002.pth"]
    before = os.path.getmtime(work / "final.pth")
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"train.work_dir={work} holds a finished run" in err
    assert "--resume" in err and "--overwrite" in err and "train.work_dir=NEW_DIR" in err
    assert os.path.getmtime(work / "final.pth") == before
    assert main(["train", str(cfg), "--no-progress", "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    # --overwrite replaces the run: no checkpoint of the old one is left beside the new ones
    assert main(["train", str(cfg), "--no-progress", "--overwrite", "--set", "train.checkpoint_period=0"]) == 0
    assert sorted(p.name for p in work.glob("*.pth")) == ["final.pth"]
    assert [json.loads(x)["iter"] for x in (work / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_overwrite_clears_the_run_and_its_stages_and_nothing_else(tmp_path):
    from detkit.training.preflight import clear_run

    run = tmp_path / "run"
    kept = ["notes.txt", "config.yaml", "proposals/rpn-step1/000001.npy", "step1_rpn/config.yaml"]
    gone = ["final.pth", "iter_0000002.pth", ".tmp-x1.pth", "log.jsonl", "metrics.json", "results.json",
            "step1_rpn/final.pth", "step1_rpn/iter_0000010.pth", "step1_rpn/log.jsonl"]
    for name in kept + gone:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert sorted(clear_run(str(run))) == sorted(str(run / name) for name in gone)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(kept)


def test_image_read_errors_name_the_image_id_and_file(data_dir, tmp_path, registries):
    from detkit.data.images import ImageReadError
    from detkit.data.loading import build_dataset

    data = copy_data(data_dir, tmp_path / "data")
    image_id, path = image_of(data, index=1)
    path.write_bytes(b"garbage")
    dataset = build_dataset({"name": "coco", "images": str(data / "train" / "images"),
                             "annotations": str(data / "train" / "annotations.json")}, registries, "train")
    index = next(i for i in range(len(dataset)) if dataset.image_info(i)["id"] == image_id)
    with pytest.raises(ImageReadError, match=f"image id {image_id} of .*annotations.json: {path}: not a decodable"):
        dataset[index]


# ----------------------------------------------------------------------------- item 4: pretrained weights


def test_pretrained_weights_that_fit_nothing_are_refused(registries, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tiny = registries.backbones.build("tiny", num_classes=5)
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11), "features.0.bias": torch.zeros(64)}, other)
    with pytest.raises(WeightsError, match=r"other.pth: none of the \d+ trunk parameters of TinyNet is in the file "
                                           r"\(it holds 2 tensors such as features.0.weight"):
        tiny.load_pretrained(other)
    narrow = tmp_path / "narrow.pth"
    torch.save(registries.backbones.build("tiny", widths=[8, 16, 32, 48, 48]).state_dict(), narrow)
    shapes = r"stem.0.weight \(file \[8, 3, 3, 3\], model \[16, 3, 3, 3\]\)"
    with pytest.raises(WeightsError, match=rf"narrow.pth: \d+ tensors of the trunk or RoI head have other shapes "
                                           rf"than TinyNet's: {shapes}"):
        tiny.load_pretrained(narrow)
    imagenet = tmp_path / "imagenet.pth"
    torch.save(registries.backbones.build("tiny").state_dict(), imagenet)
    caplog.clear()
    assert tiny.load_pretrained(imagenet) == ["classifier.weight", "classifier.bias"]
    total = len(tiny.state_dict())
    assert (f"loaded {total - 2} of {total} tensors of TinyNet (2 missing, 0 unexpected, 2 skipped for their shape: "
            f"classifier.weight, classifier.bias)") in caplog.text


def test_train_with_weights_of_another_architecture_exits_2(data_dir, tmp_path, capsys):
    weights = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, weights)
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    assert main(["train", str(cfg), "--no-progress", "--set", f"model.backbone.weights={weights}"]) == 2
    err = capsys.readouterr().err
    assert "model.backbone.weights:" in err and "vgg.pth: none of the" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- item 9: not a checkpoint


class RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_files_that_are_not_checkpoints_say_what_they_are_not(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "detkit-checkpoint", "model": RunsCode(marker)}, evil)
    assert main(["eval", str(evil)]) == 2
    err = capsys.readouterr().err
    assert f"{evil}: not a detkit checkpoint: it is a pickle that asks for {os.system.__module__}.system" in err
    assert "never unpickles arbitrary objects" in err and "weights_only" not in err and not marker.exists()
    text = tmp_path / "notes.pth"
    text.write_text("hello, these are my notes\n")
    assert main(["infer", str(text), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "notes.pth: not a detkit checkpoint: not a torch file at all (it begins with the text 'hello" in err
    assert "pop from empty list" not in err
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert main(["eval", str(empty)]) == 2
    assert "empty.pth: not a detkit checkpoint: the file is empty" in capsys.readouterr().err
    archive = tmp_path / "other.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "not torch")
    assert main(["eval", str(archive)]) == 2
    assert "other.pth: not a detkit checkpoint: torch cannot read it" in capsys.readouterr().err
    # the same words for a pretrained weights file
    with pytest.raises(WeightsError, match="evil.pth: not a pretrained weights file: it is a pickle that asks for"):
        read_state_dict(evil, "pretrained weights file")
    assert not marker.exists()
    # A plain pickle (protocol 4, not torch's format): refused without torch's own protocol warning.
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps(RunsCode(marker), protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(WeightsError, match="plain.pth: not a state dict: it is a pickle that asks for"):
            read_state_dict(plain, "state dict")
    assert not marker.exists()


def test_a_second_run_into_a_work_dir_in_use_is_refused_naming_the_first(data_dir, tmp_path, capsys):
    """Two trainings into one work_dir at once interleaved their checkpoints and logs; the second is refused
    (even with --overwrite, which would have cleared the first's files), and the lock goes with the first."""
    import socket

    from detkit.cli import main
    from detkit.engine.files import directory_lock

    work = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, work, max_iters=1, eval_at_end=False)
    work.mkdir()
    (work / "log.jsonl").write_text("the first run's log\n")
    with directory_lock(work, "train.work_dir"):  # the first run, as another process would hold it
        for extra in ([], ["--overwrite"]):
            assert main(["train", str(cfg), "--no-progress", *extra]) == 2
            err = capsys.readouterr().err
            assert f"train.work_dir={work} is in use by another run (pid {os.getpid()} on host " \
                   f"{socket.gethostname()}, since " in err
        assert (work / "log.jsonl").read_text() == "the first run's log\n"
    assert main(["train", str(cfg), "--no-progress", "--overwrite"]) == 0  # released: the next run takes it
    assert (work / "final.pth").is_file()


def test_resume_refuses_a_checkpoint_of_other_classes_or_another_model_naming_what_differs(trained, data_dir,
                                                                                            tmp_path, capsys, caplog):
    """Resuming with the same number of classes under other names went on silently (star weights labelled
    "sun"); another backbone gave a raw size-mismatch traceback. Both are refused before the weights load,
    naming what differs; a test-time setting that differs is logged and the run goes on."""
    ckpt = trained / "iter_0000004.pth"
    renamed = copy_data(data_dir, tmp_path / "renamed")
    coco = json.loads((renamed / "train" / "annotations.json").read_text())
    for c in coco["categories"]:
        c["name"] = "sun" if c["name"] == "star" else c["name"]
    (renamed / "train" / "annotations.json").write_text(json.dumps(coco))
    cfg = write_config(tmp_path / "a.yaml", renamed, tmp_path / "a", max_iters=6, eval_at_end=False)
    assert main(["train", str(cfg), "--resume", str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint was trained on other classes (4: 'star' there, 'sun' here)" in err
    assert not (tmp_path / "a" / "final.pth").exists()

    cfg = write_config(tmp_path / "b.yaml", data_dir, tmp_path / "b", max_iters=6, eval_at_end=False)
    assert main(["train", str(cfg), "--resume", str(ckpt), "--no-progress",
                 "--set", "model.backbone.args.hidden=32"]) == 2
    err = capsys.readouterr().err
    assert "its weights do not fit this config's model" in err and "model.backbone.args.hidden=64 there, 32 here" in err
    assert "Traceback" not in err

    with caplog.at_level(logging.WARNING):
        assert main(["train", str(cfg), "--resume", str(ckpt), "--no-progress",
                     "--set", "model.roi_heads.nms_thresh=0.4"]) == 0
    assert "model.roi_heads.nms_thresh=0.3 there, 0.4 here" in caplog.text
    assert torch.load(tmp_path / "b" / "final.pth", weights_only=True)["iteration"] == 6


def test_test_classes_the_model_lacks_are_refused_before_training(data_dir, tmp_path, capsys):
    """The end-of-run evaluation found them after final.pth was written (exit 2 after the whole run)."""
    other = copy_data(data_dir, tmp_path / "other")
    coco = json.loads((other / "val" / "annotations.json").read_text())
    coco["categories"].append({"id": 9, "name": "moon"})
    (other / "val" / "annotations.json").write_text(json.dumps(coco))
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", max_iters=2)
    data = yaml.safe_load(cfg.read_text())
    data["data"]["test"]["annotations"] = str(other / "val" / "annotations.json")
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.test: the evaluation dataset's classes ['moon'] are not among the model's 5 classes" in err
    assert not list((tmp_path / "run").glob("*.pth"))


def test_overwrite_keeps_the_earlier_run_when_the_new_training_set_is_refused(data_dir, tmp_path, capsys):
    """--overwrite removed the earlier run before the trainer read the training set: a refused training set (here
    two categories of one name) left no run at all. The training set is now checked first."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "final.pth").write_bytes(b"the earlier run")
    other = copy_data(data_dir, tmp_path / "other")
    coco = json.loads((other / "train" / "annotations.json").read_text())
    coco["categories"][1]["name"] = coco["categories"][0]["name"]
    (other / "train" / "annotations.json").write_text(json.dumps(coco))
    cfg = write_config(tmp_path / "c.yaml", other, run, max_iters=2)
    data = yaml.safe_load(cfg.read_text())
    data["data"]["test"]["annotations"] = str(data_dir / "val" / "annotations.json")
    data["data"]["test"]["images"] = str(data_dir / "val" / "images")
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg), "--no-progress", "--overwrite"]) == 2
    assert "data.train" in capsys.readouterr().err
    assert (run / "final.pth").read_bytes() == b"the earlier run"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_finish_the_step_save_a_checkpoint_and_say_how_to_resume(data_dir, tmp_path, signum,
                                                                                   code):
    """Both ended training with the work since the last periodic checkpoint lost (SIGTERM: exit 143 and no
    word). The step finishes, a resumable checkpoint is written, the message says how to go on."""
    import subprocess
    import sys
    import time

    work = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, work, max_iters=100000, steps=[99999], checkpoint_period=0,
                       log_period=1, eval_at_end=False)
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train.py")
    proc = subprocess.Popen([sys.executable, tool, str(cfg), "--no-progress"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, not a time budget
        while not ((work / "log.jsonl").exists() and len((work / "log.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signum)
        err = proc.communicate(timeout=600)[1]
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    match = re.search(rf"stopped by {name} after iteration (\d+) of 100000: saved (\S+); continue the run with "
                      rf"--resume", err)
    assert match, err[-3000:]
    done, path = int(match.group(1)), match.group(2)
    assert path == str(work / f"iter_{done:07d}.pth") and load_checkpoint(path)["iteration"] == done
    assert not list(work.glob(".tmp-*")) and not (work / "final.pth").exists()
    resumed = write_config(tmp_path / "r.yaml", data_dir, work, max_iters=done + 2, steps=[99999],
                           checkpoint_period=0, log_period=1, eval_at_end=False)
    assert main(["train", str(resumed), "--resume", "--no-progress"]) == 0
    assert load_checkpoint(str(work / "final.pth"))["iteration"] == done + 2


@pytest.mark.slow
def test_a_write_failure_is_one_message_naming_the_file_and_leaves_nothing_half_written(data_dir, tmp_path):
    """A full disk (here a file-size limit, as `ulimit -f` sets) gave torch's 'unexpected pos' traceback."""
    import resource
    import subprocess
    import sys

    work = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, work, max_iters=4, checkpoint_period=2, eval_at_end=False)
    limit = 64 * 1024  # the log and config fit; a checkpoint does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train.py")
    run = subprocess.run([sys.executable, tool, str(cfg), "--no-progress"], preexec_fn=cap, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("detkit train: error: ") and "iter_0000002.pth: could not be written (" in last, last
    assert "Traceback" not in run.stderr
    assert not list(work.glob(".tmp-*")) and not list(work.glob("*.pth"))


def test_a_write_error_in_the_one_atomic_write_names_the_file(tmp_path, monkeypatch):
    import errno

    from detkit.engine.files import WriteError, write_text_atomic

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(WriteError, match=r"a.txt: could not be written \(No space left on device\)"):
        write_text_atomic(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []
