"""tools/budget.py: a detkit config and torchvision's ResNet18-FPN Faster R-CNN trained for the same few seconds.

No speed assertions: only that each run calibrates, trains a positive number of iterations for about the
budget (0.3x-3x), is scored, and reports what the tool promises; and that bad specs stop it before training.
"""
import json

import pytest
from tool_utils import load_tool

from detkit.benchmarks import budget
from detkit.data.synth import synthesize

BUDGET = 6.0
TINY_CONFIG = """
model:
  backbone: {name: tiny}
  proposal_generator:
    name: rpn
    anchors: {sizes: [16, 32, 64], aspect_ratios: [0.5, 1.0, 2.0]}
    pre_nms_top_n_train: 300
    post_nms_top_n_train: 100
    pre_nms_top_n_test: 300
    post_nms_top_n_test: 50
  roi_heads: {batch_size_per_image: 32}
  transform: {min_size: 96, max_size: 128}
data: {num_workers: 0}
train: {warmup_iters: 10, log_period: 5}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    for split, seed in (("train", 0), ("test", 1)):
        synthesize(str(root / split), "coco", 6, seed=seed, image_size=(96, 128))
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    return root


def test_run_config_scales_the_schedule_to_the_iterations(data, registries):
    train, test = (budget.coco_dataset(str(data / s / "annotations.json"), s) for s in ("train", "test"))
    tiny, tv = budget.parse_specs([f"tiny={data / 'tiny.yaml'}", "tv=torchvision:resnet50_fpn"],
                                  ["train.lr=0.01"], train, test, registries)
    cfg = budget.run_config(tiny, "w", 50)
    assert (cfg.train.max_iters, cfg.train.steps, cfg.train.warmup_iters) == (50, [40], 10)
    assert budget.run_config(tiny, "w", 5).train.warmup_iters == 4  # warmup ends by the step
    assert cfg.data.train == train and cfg.train.lr == 0.01 and not cfg.train.eval_at_end
    calibration = budget.run_config(tv, "w", 12, calibrate=True)
    assert calibration.train.steps == [] and calibration.train.log_period == 1
    # torchvision's defaults: batch 2, lr 0.02 unless --set, images at the training set's size
    assert (tv.cfg.data.batch_size, tv.cfg.train.lr, tv.cfg.train.weight_decay) == (2, 0.01, 1e-4)
    assert (tv.cfg.model.transform.min_size, tv.cfg.model.transform.max_size) == (96, 128)


@pytest.mark.slow
def test_same_budget_for_detkit_and_torchvision(data, tmp_path, monkeypatch, capsys):
    # A shorter calibration keeps the test short; the budget arithmetic is the same.
    monkeypatch.setattr(budget, "CALIBRATION_WARMUP", 1)
    monkeypatch.setattr(budget, "CALIBRATION_ITERS", 3)
    out = tmp_path / "budget.json"
    argv = ["--budget", str(BUDGET), "--train", str(data / "train" / "annotations.json"),
            "--test", str(data / "test" / "annotations.json"), f"tiny={data / 'tiny.yaml'}",
            "tv=torchvision:resnet18_fpn", "--set", "data.batch_size=2", "--set", "train.lr=0.01",
            "--set", "data.num_workers=0", "--set", "train.device=cpu", "--output", str(out), "--markdown"]
    assert load_tool("budget").main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["budget_s"] == BUDGET and report["calibration"] == {"warmup_iters": 1, "timed_iters": 3}
    assert [r["name"] for r in report["rows"]] == ["tiny", "tv"]
    for row in report["rows"]:
        assert row["iterations"] > 0 and row["calibrated_seconds_per_iter"] > 0
        assert 0.3 * BUDGET <= row["train_seconds"] <= 3 * BUDGET, row
        assert row["seconds_per_iter"] == pytest.approx(row["train_seconds"] / row["iterations"])
        for key in budget.METRICS:
            assert row[key] == -1 or 0 <= row[key] <= 1, (key, row[key])
    tiny, tv = report["rows"]
    assert tiny["kind"] == "detkit" and tv["kind"] == "torchvision"
    assert tiny["settings"]["train"]["max_iters"] == tiny["iterations"]
    assert tiny["settings"]["train"]["lr"] == 0.01 and tiny["settings"]["model"]["backbone"]["name"] == "tiny"
    assert {k: tv["settings"][k] for k in ("backbone", "batch_size", "lr", "min_size", "max_size", "max_iters")} == {
        "backbone": "resnet18", "batch_size": 2, "lr": 0.01, "min_size": 96, "max_size": 128,
        "max_iters": tv["iterations"]}
    assert "| name | iterations | s/iter | train time (s) | AP | AP50 | APs |" in printed
    assert "Machine: " in printed and "Command: `python tools/budget.py --budget 6.0" in printed


def test_a_diverging_run_is_reported_not_raised(data, tmp_path, registries):
    train, test = (budget.coco_dataset(str(data / s / "annotations.json"), s) for s in ("train", "test"))
    spec, = budget.parse_specs([f"tiny={data / 'tiny.yaml'}"], ["train.lr=1.0e+12", "train.warmup_iters=0"], train,
                               test, registries)
    row = budget.run_on_budget(spec, 1.0, registries, str(tmp_path), log=lambda *a, **k: None)
    assert "training diverged" in row["error"] and row["AP"] is None
    assert "| tiny | diverged |" in budget.table([row])


@pytest.mark.parametrize("spec, message", [
    ("tv=torchvision:resnet34_fpn", "unknown torchvision model 'resnet34_fpn'"),
    ("mine=no/such/config.yaml", "no such config file"),
    ("mine=BAD", "model.backbone.name: unknown backbone 'nosuch'"),
])
def test_bad_specs_exit_2_naming_the_spec(data, capsys, spec, message):
    (data / "bad.yaml").write_text(TINY_CONFIG.replace("name: tiny", "name: nosuch"))
    spec = spec.replace("BAD", str(data / "bad.yaml"))
    argv = ["--budget", "5", "--train", str(data / "train" / "annotations.json"),
            "--test", str(data / "test" / "annotations.json"), "ok=torchvision:resnet18_fpn", spec]
    assert load_tool("budget").main(argv) == 2
    err = capsys.readouterr().err
    assert repr(spec) in err and message in err
