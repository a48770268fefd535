"""The benchmark compares like with like: torchvision's FasterRCNN built around detkit's modules and weights.

No timing assertions: only that the two models share or copy weights faithfully, agree where they should,
and that a benchmark run reports positive throughputs, ratios and memory; that the helpers every harness
measures with (detkit.benchmarks.common) interleave, take medians and write tables as they say; and that
nothing in the library imports the benchmarks.
"""
import ast
import json
import math
import os

import pytest
import torch
from tool_utils import load_tool

from detkit.benchmarks import common
from detkit.benchmarks import torchvision_pair as pair
from detkit.benchmarks import torchvision_parity as parity

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pair_shares_trunk_and_box_head_and_copies_heads(registries):
    torch.manual_seed(0)
    ours, theirs = pair.build_pair(pair.Setup(image_size=(64, 96), anchor_sizes=(32.0, 64.0)), registries)
    assert theirs.backbone.body is ours.trunk
    assert theirs.roi_heads.box_head is ours.roi_heads.box_head
    ours.eval()
    theirs.eval()
    features = ours.trunk(torch.rand(2, 3, 64, 96))
    a_obj, a_box = ours.proposal_generator.head(features)
    b_obj, b_box = theirs.rpn.head([features])
    assert torch.equal(a_obj, b_obj[0]) and torch.equal(a_box, b_box[0])
    x = torch.randn(5, ours.roi_heads.predictor.cls_score.in_features)
    for a, b in zip(ours.roi_heads.predictor(x), theirs.roi_heads.box_predictor(x)):
        assert torch.equal(a, b)
    # Settings that are not weights reach torchvision too.
    assert theirs.roi_heads.box_roi_pool.output_size == ours.roi_heads.roi_extractor.output_size
    assert theirs.roi_heads.box_coder.weights == tuple(ours.roi_heads.box_coder.weights)
    assert theirs.transform.size_divisible == ours.transform.size_divisible == 16
    assert theirs.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}


def test_centred_anchors_equal_detkit_anchors_and_stock_ones_are_shifted(registries):
    image_list_size, grid = (64, 96), (4, 6)
    ours, theirs = pair.build_pair(pair.Setup(image_size=image_list_size, anchors="detkit"), registries)
    stride = [torch.tensor(16), torch.tensor(16)]
    gen = theirs.rpn.anchor_generator
    gen.set_cell_anchors(torch.float32, CPU)
    expected = ours.proposal_generator.anchor_generators[0].grid_anchors(grid)
    assert torch.equal(gen.grid_anchors([grid], [stride])[0], expected)
    _, stock = pair.build_pair(pair.Setup(image_size=image_list_size), registries)
    stock.rpn.anchor_generator.set_cell_anchors(torch.float32, CPU)
    shifted = stock.rpn.anchor_generator.grid_anchors([grid], [stride])[0]
    # Corner-centred (half a stride up-left) and rounded to whole pixels.
    assert torch.allclose(shifted, expected - 8.0, atol=0.5) and not torch.equal(shifted, expected - 8.0)


def test_same_anchors_give_the_same_detections(registries):
    torch.manual_seed(0)
    setup = pair.Setup(image_size=(96, 128), anchor_sizes=(32.0, 64.0), anchors="detkit")
    ours, theirs = pair.build_pair(setup, registries)
    images, _ = pair.synthetic_batch(setup, 2, CPU, seed=3)
    a = pair.agreement(ours, theirs, images)
    assert a["input_max_abs_diff"] == 0.0
    assert a["rpn_objectness_max_abs_diff"] == 0.0 and a["rpn_deltas_max_abs_diff"] == 0.0
    assert a["top_proposal_iou"] > 0.999 and a["top_detection_iou"] > 0.999
    assert a["top_score_abs_diff"] < 1e-5 and a["top_label_agree"] == 1.0 and a["matched_fraction"] == 1.0


TINY_FPN = (["0", "1", "2", "pool"], ((16.0,), (32.0,), (64.0,), (128.0,)), 32)  # no stride-32 map: C2-C4
R18_FPN = (["0", "1", "2", "3", "pool"], ((16.0,), (32.0,), (64.0,), (128.0,), (256.0,)), 64)


@pytest.mark.parametrize("backbone, anchors, names, sizes, padding", [
    ("tiny", "torchvision", *TINY_FPN), ("tiny", "detkit", *TINY_FPN), ("resnet18", "torchvision", *R18_FPN)])
def test_fpn_pair_shares_the_pyramid_and_gives_the_same_detections(registries, backbone, anchors, names, sizes,
                                                                   padding):
    torch.manual_seed(0)
    setup = pair.Setup(backbone=backbone, image_size=(64, 64), neck="fpn", anchors=anchors)
    ours, theirs = pair.build_pair(setup, registries)
    assert theirs.backbone.body is ours.trunk and theirs.roi_heads.box_head is ours.roi_heads.box_head
    assert theirs.backbone.map_names == names and theirs.roi_heads.box_roi_pool.featmap_names == names[:-1]
    assert theirs.rpn.anchor_generator.sizes == sizes
    assert theirs.roi_heads.box_roi_pool.output_size == (7, 7) and ours.roi_heads.box_head[1].out_features == 1024
    assert theirs.transform.size_divisible == ours.transform.size_divisible == padding
    images, _ = pair.synthetic_batch(setup, 1, CPU, seed=3)
    a = pair.agreement(ours, theirs, images)  # the same anchor placement in both
    assert a["rpn_objectness_max_abs_diff"] == 0.0 and a["rpn_deltas_max_abs_diff"] == 0.0
    assert a["top_detection_iou"] == pytest.approx(1.0) and a["matched_fraction"] == 1.0
    assert a["detection_box_max_abs_diff"] < 1e-4 and a["detection_labels_equal"] == 1.0


def test_run_reports_throughputs_ratios_and_memory(registries):
    setup = pair.Setup(image_size=(64, 96), anchor_sizes=(32.0,))
    r = parity.run(setup, registries, CPU, batch_sizes=(1, 2), train_batch=1, warmup=0, iters=1)
    assert set(r) == {"setup", "inference", "train", "memory", "memory_kind", "agreement"}
    for v in [*r["inference"].values(), r["train"]]:
        assert set(v) == {"detkit", "torchvision", "ratio"}
        assert v["detkit"] > 0 and v["torchvision"] > 0
        assert v["ratio"] == pytest.approx(v["detkit"] / v["torchvision"])
    assert set(r["inference"]) == {1, 2}
    for phase in ("inference", "train"):
        assert all(v >= 0 for v in r["memory"][phase].values()) and set(r["memory"][phase]) == {"detkit", "torchvision"}
    assert r["agreement"]["rpn_objectness_max_abs_diff"] == 0.0
    text = parity.markdown([r], 12.5, "cmd")
    assert "| tiny | 64x96 | cpu | none | infer b2 (img/s) |" in text and "12.5 images/s" in text


def test_cli_writes_json_and_rejects_bad_sizes(tmp_path, capsys):
    tool = load_tool("benchmark")
    out = tmp_path / "bench.json"
    assert tool.main(["faster_rcnn", "--image-size", "48x64", "--batch-sizes", "1", "--train-batch", "1",
                      "--iters", "1", "--warmup", "0", "--device", "cpu", "--no-loader", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["results"][0]["setup"]["image_size"] == [48, 64] and data["loader_images_per_s"] is None
    assert math.isfinite(data["results"][0]["train"]["ratio"])
    with pytest.raises(SystemExit):
        tool.main(["faster_rcnn", "--image-size", "48by64"])
    assert "expected HxW" in capsys.readouterr().err
    assert tool.main(["faster_rcnn", "--backbone", "no_such_net", "--no-loader"]) == 2


def test_cli_with_fpn_names_the_neck_in_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert load_tool("benchmark").main([
        "faster_rcnn", "--neck", "fpn", "--image-size", "48x64", "--batch-sizes", "1", "--train-batch", "1",
        "--iters", "1", "--warmup", "0", "--device", "cpu", "--no-loader", "--markdown", "--output", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["setup"]["neck"] == "fpn" and r["setup"]["anchor_sizes"] == [16.0, 32.0, 64.0, 128.0]
    assert r["agreement"]["detection_box_max_abs_diff"] < 1e-4 and r["agreement"]["detection_labels_equal"] == 1.0
    text = capsys.readouterr().out
    assert "| tiny + fpn | 48x64 | cpu | none | infer b1 (img/s) |" in text and "- tiny + fpn: RPN" in text
    with pytest.raises(ValueError, match="Setup.neck: expected None or 'fpn'"):
        pair.Setup(neck="bifpn")


def test_loader_throughput_is_positive(registries):
    ips = parity.loader_throughput(registries, image_size=(48, 64), num_images=4, batch_size=2, num_workers=0,
                                      batches=2)
    assert ips > 0


def test_pipelines_times_untrained_configs_and_rejects_bad_entries(tmp_path, capsys):
    tool = load_tool("benchmark")
    out = tmp_path / "pipelines.json"
    config = os.path.join(ROOT, "configs", "fast_rcnn_tiny_synth.yaml")
    assert tool.main(["pipelines", f"Fast={config}", "--synthetic", "64x96", "--images", "1", "--warmup", "0",
                      "--set", "model.proposal_generator.top_k=50", "--device", "cpu", "--output", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["untrained"] and "map50" not in row and row["seconds"]["proposal"] > 0
    assert "| Fast |" in capsys.readouterr().out
    assert tool.main(["pipelines", f"Fast={tmp_path / 'missing.yaml'}", "--synthetic", "64x96"]) == 2
    assert "missing.yaml is not a file" in capsys.readouterr().err
    assert tool.main(["pipelines", "no-equals-sign", "--synthetic", "64x96"]) == 2
    assert tool.main(["pipelines", f"Fast={config}", "--images", "0"]) == 2


@pytest.mark.slow
def test_tuned_detkit_is_timed_beside_torchvision_and_bad_tuned_settings_exit_2(tmp_path, capsys):
    out = tmp_path / "bench.json"
    common = ["faster_rcnn", "--neck", "fpn", "--image-size", "48x64", "--batch-sizes", "1", "--train-batch", "1",
              "--iters", "1", "--warmup", "0", "--device", "cpu", "--no-loader"]
    assert load_tool("benchmark").main([*common, "--tuned-set", "model.proposal_generator.post_nms_top_n_test=50",
                                        "--tuned-channels-last", "--markdown", "--output", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["setup"]["tuned"] == {"overrides": ["model.proposal_generator.post_nms_top_n_test=50"],
                                   "channels_last": True, "compile": False}
    v = r["inference"]["1"]
    assert v["tuned"] > 0 and v["tuned_ratio"] == pytest.approx(v["tuned"] / v["torchvision"])
    text = capsys.readouterr().out
    assert "| tiny + fpn | 48x64 | cpu | none | infer b1, detkit tuned (img/s) |" in text
    assert "detkit tuned (tiny + fpn): model.proposal_generator.post_nms_top_n_test=50, channels-last" in text
    # An override that changes a weight's shape, one outside model.*, a misspelt key: exit 2, named.
    for bad, says in (("model.box_head.fc_dim=64", "change the model's weights"),
                      ("train.lr=0.1", "expected a model.* override"),
                      ("model.proposal_generator.post_nms_top_n_tst=5", "post_nms_top_n_test")):
        assert load_tool("benchmark").main([*common, "--tuned-set", bad]) == 2
        assert says in capsys.readouterr().err


def test_interleaving_alternates_abba_and_reports_medians():
    assert list(common.abba(["a", "b"], 3)) == ["a", "b", "b", "a", "a", "b"]
    calls = []
    values = common.interleaved({"a": lambda: calls.append("a") or len(calls),
                                 "b": lambda: calls.append("b") or len(calls)}, 4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert values == {"a": [1, 4, 5, 8], "b": [2, 3, 6, 7]}
    assert common.medians(values) == {"a": 4.5, "b": 4.5}
    counts = {"a": 0, "b": 0}
    seconds = common.time_interleaved({k: (lambda k=k: counts.__setitem__(k, counts[k] + 1)) for k in counts},
                                      warmup=2, iters=3, device=CPU)
    assert counts == {"a": 5, "b": 5} and set(seconds) == {"a", "b"} and all(v >= 0 for v in seconds.values())
    with pytest.raises(ValueError, match="iters=0"):
        common.time_interleaved({"a": lambda: None}, warmup=0, iters=0, device=CPU)


def test_markdown_table_writes_the_rule_and_checks_the_rows():
    text = common.markdown_table(("name", "ms"), [("a", 1.5), ("b", "2")], align="lr")
    assert text == "| name | ms |\n| --- | ---: |\n| a | 1.5 |\n| b | 2 |"
    assert common.markdown_table(("x", "y"), []).splitlines()[1] == "| --- | --- |"
    with pytest.raises(ValueError, match="table row 1: 1 cells for 2 columns"):
        common.markdown_table(("x", "y"), [(1, 2), (3,)])
    with pytest.raises(ValueError, match="align 'lc'"):
        common.markdown_table(("x", "y"), [], align="lc")


def _imported_modules(path: str) -> set[str]:
    """The absolute module names a source file imports (relative imports resolved against its package)."""
    package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


def test_only_tools_and_tests_import_the_benchmarks():
    """detkit.benchmarks is tooling: no library module (nor a built-in plugin) may depend on it."""
    offenders = []
    for top in ("detkit", "plugins"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if os.path.relpath(folder, ROOT).replace(os.sep, "/").startswith("detkit/benchmarks"):
                continue
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".py") and any(m == "detkit.benchmarks" or m.startswith("detkit.benchmarks.")
                                                for m in _imported_modules(path)):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_loggers_benchmark_reports_the_share_of_the_loggers_calls(tmp_path, capsys):
    """tools/benchmark.py loggers: a short run with TensorBoard and CSV, the time in the loggers' calls reported
    (no budget asserted)."""
    pytest.importorskip("tensorboard")
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from e2e_utils import synth_splits, write_config

    data = synth_splits(tmp_path / "data", 4, 2)
    config = write_config(tmp_path / "c.yaml", data, tmp_path / "unused", log_period=1)
    tool = load_tool("benchmark")
    assert tool.main(["loggers", str(config), "--iters", "3", "--work-dir", str(tmp_path / "run")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["loggers"] == ["jsonl", "tensorboard", "csv"] and report["iters"] == 3
    assert report["logger_calls"] >= 4 and 0 <= report["share_percent"] < 100 and report["train_seconds"] > 0
    assert (tmp_path / "run" / "log.csv").is_file() and (tmp_path / "run" / "tensorboard").is_dir()
