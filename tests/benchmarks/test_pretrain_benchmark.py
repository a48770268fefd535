"""``tools/benchmark.py pretrain``: detkit's pretraining against the plain PyTorch loop runs end to end.

No timing assertions: only that both sides train the same initial weights on the same images, report positive
throughputs, and that a training set the plain side cannot read is refused before anything is built.
"""
import json
import os

import pytest
from tool_utils import load_tool

from detkit.benchmarks.pretrain import check_comparable, plain_transform
from detkit.config import ClassifierConfig, ClassifierAugmentConfig, from_dict
from detkit.data.synth_cls import synthesize_classification

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "pretrain_tiny_synth_cls.yaml")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("scls") / "data"
    synthesize_classification(str(out), per_class=4, val_per_class=0, size=32)
    return str(out / "train")


def test_pretrain_benchmark_runs_both_sides(folder, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = load_tool("benchmark").main([
        "pretrain", CONFIG, "--set", f"data.train.root={folder}", "--set", "model.input_size=32", "--set",
        "data.batch_size=4", "--set", "data.num_workers=1", "--iters", "2", "--warmup", "1", "--runs", "1",
        "--device", "cpu", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "detkit img/s" in printed and "plain img/s" in printed and "median" in printed
    result = json.loads(out.read_text())
    assert result["same_initial_weights"] is True
    assert result["setup"]["images"] == 20 and result["setup"]["input_size"] == 32
    for side in ("detkit", "plain"):
        assert len(result["runs"][side]) == 1 and result["median"][side] > 0
    assert result["ratio"] == pytest.approx(result["median"]["detkit"] / result["median"]["plain"])
    assert result["last_plain_step"]["loss"] > 0


def test_pretrain_benchmark_refuses_other_datasets(tmp_path, capsys):
    code = load_tool("benchmark").main(["pretrain", CONFIG, "--set", "data.train={name: digits}", "--iters", "1",
                                        "--runs", "1", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.train.name='digits'" in err and "image_folder" in err
    cfg = from_dict({"data": {"train": {"name": "image_list", "file": "x.csv"}}}, schema=ClassifierConfig)
    with pytest.raises(ValueError, match="ImageFolder"):
        check_comparable(cfg)


def test_other_crops_are_refused_and_resized_crop_maps_to_torchvision():
    cfg = from_dict({"data": {"train": {"name": "image_folder", "root": "d"}, "augment": {"crop": "scale_jitter"}}},
                    schema=ClassifierConfig)
    with pytest.raises(ValueError, match="data.augment.crop='scale_jitter'"):
        check_comparable(cfg)
    augment = ClassifierAugmentConfig(area=[0.35, 1.0], hflip=0.25, color_jitter=0.4)
    names = [type(t).__name__ for t in plain_transform(augment, 32, [0.5], [0.25], 1).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "Grayscale", "ToTensor", "Normalize"]
    crop = plain_transform(augment, 32, [0.5] * 3, [0.25] * 3, 3).transforms[0]
    assert crop.size == (32, 32) and crop.scale == (0.35, 1.0)
