"""Validation while training (train.eval_period), best.pth and train.keep_checkpoints (issue 26, item 2)."""
import json

import pytest
import torch

from detkit.cli import main
from detkit.engine.checkpoint import load_checkpoint
from e2e_utils import synth_splits, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_splits(tmp_path_factory.mktemp("synth"), 8, 3)


def test_validation_logs_keeps_the_best_weights_and_the_newest_checkpoints(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, run, max_iters=8, steps=[6], checkpoint_period=2,
                       eval_period=4, keep_checkpoints=1)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    # every periodic checkpoint but the newest removed as the next was written; final and best kept
    assert sorted(p.name for p in run.glob("*.pth")) == ["best.pth", "final.pth", "iter_0000006.pth"]
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    validations = [r for r in lines if "val/AP" in r]
    assert [r["iter"] for r in validations] == [4] and {"val/AP50", "val/AR100"} <= set(validations[0])
    best = load_checkpoint(str(run / "best.pth"), task="detection")
    final = load_checkpoint(str(run / "final.pth"), task="detection")
    end = json.loads((run / "metrics.json").read_text())["AP"]
    assert final["best"]["metric"] == "AP" and final["best"]["iteration"] == best["iteration"]
    if end > validations[0]["val/AP"]:  # the end-of-run evaluation was the best: best.pth holds the final weights
        assert best["iteration"] == 8 and all(torch.equal(best["model"][k], final["model"][k]) for k in final["model"])
    else:
        assert best["iteration"] == 4 and final["best"]["value"] == validations[0]["val/AP"]
    # best.pth scores what was recorded for it
    capsys.readouterr()
    assert main(["eval", str(run / "best.pth"), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["AP"] == pytest.approx(final["best"]["value"],
                                                                                              abs=1e-9)


def test_a_resumed_run_keeps_comparing_with_the_best_so_far(data_dir, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, run, max_iters=4, steps=[6], checkpoint_period=2,
                       eval_period=2)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    before = load_checkpoint(str(run / "final.pth"), task="detection")["best"]
    assert main(["train", str(cfg), "--no-progress", "--resume", "--set", "train.max_iters=8"]) == 0
    after = load_checkpoint(str(run / "final.pth"), task="detection")["best"]
    assert after["value"] >= before["value"] and after["iteration"] in (before["iteration"], 6, 8)
    if after["value"] == before["value"]:  # not beaten after the resume: the best is still the one before it
        assert after["iteration"] == before["iteration"]
    vals = [json.loads(x)["iter"] for x in (run / "log.jsonl").read_text().splitlines() if "val/AP" in x]
    assert vals == [2, 6]  # validated at 2 before the resume (4 was its end), at 6 after it (8 is the end)


def test_validation_settings_are_checked_before_training(data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, tmp_path / "run", max_iters=2, eval_period=1,
                       best_metric="mAP")
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "train.best_metric='mAP': eval.metric=coco gives AP, AP50" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.pth"))


def test_compare_two_real_runs(data_dir, tmp_path, capsys):
    """detkit compare (issue 26, item 4): the curves in one figure, the final metrics in a table, the config keys
    that differ."""
    import cv2

    for name, lr in (("slow", 0.001), ("fast", 0.01)):
        cfg = write_config(tmp_path / f"{name}.yaml", data_dir, tmp_path / name, max_iters=4, steps=[3],
                           checkpoint_period=0, log_period=1, eval_period=2, lr=lr)
        assert main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "slow"), str(tmp_path / "fast"), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["run", "iters", "AP", "AP50"]
    assert lines[2].split()[:2] == ["slow", "4"] and lines[3].split()[:2] == ["fast", "4"]
    assert "config keys that differ:" in text and "train.lr: slow=0.001 | fast=0.01" in text
    assert "train.work_dir" not in text
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 400  # two panels: losses and val/AP
    assert main(["compare", str(tmp_path / "slow")]) == 2
    assert "two run directories or more" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "slow"), str(data_dir), "--output", str(out)]) == 2
    assert "no log.jsonl" in capsys.readouterr().err
