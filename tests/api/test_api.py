"""The Python API (detkit.api, importable from detkit): a Detector on every kind of input, equal to the CLI's
results; train, evaluate, load_config and list_parts as the CLI's commands compute them; bad input refused."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import detkit
from detkit import Detections, Detector
from detkit.cli import main
from detkit.config import ConfigError
from e2e_utils import synth_splits, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_splits(tmp_path_factory.mktemp("synth"), 8, 3)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A checkpoint trained through the API (dict overrides), as detkit train would."""
    work = tmp_path_factory.mktemp("work")
    cfg = write_config(work / "cfg.yaml", data_dir, work / "run")
    result = detkit.train(cfg, overrides={"train.max_iters": 6, "train.steps": [4]}, progress=False)
    assert result["checkpoint"] == str(work / "run" / "final.pth")
    assert json.loads((work / "run" / "log.jsonl").read_text().splitlines()[-1])["iter"] == 6
    return work / "run" / "final.pth"


def images_of(data_dir):
    return sorted(str(p) for p in (data_dir / "val" / "images").iterdir())


def test_import_detkit_stays_light_and_exports_the_api():
    code = "import sys, detkit; print('torch' in sys.modules, sorted(detkit.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "Detector" in out and "list_parts" in out
    assert detkit.Detector is Detector and detkit.evaluate.__module__ == "detkit.api"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        detkit.Nope


def test_every_kind_of_image_gives_the_same_detections(trained, data_dir):
    detector = Detector.from_checkpoint(trained, device="cpu")
    path = images_of(data_dir)[0]
    found = detector(path)
    assert isinstance(found, Detections) and found.source == path and found.image_size == (120, 160)
    assert len(found) > 0 and found.boxes.dtype == torch.float32 and found.labels.dtype == torch.int64
    assert torch.all(found.scores[:-1] >= found.scores[1:])  # most confident first
    array = np.array(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    for other in (array, Image.open(path), tensor, tensor.float() / 255):
        got = detector(other)
        assert got.source is None and torch.allclose(got.boxes, found.boxes, atol=1e-4)
        assert torch.equal(got.labels, found.labels)
    assert found.class_names == [detector.class_names[i - 1] for i in found.labels.tolist()]
    numpy = found.to_numpy()
    assert numpy["boxes"].shape == (len(found), 4) and numpy["class_names"] == found.class_names
    drawn = found.draw()
    assert drawn.shape == (120, 160, 3) and drawn.dtype == np.uint8 and not np.array_equal(drawn, array)
    assert repr(found).startswith(f"Detections({len(found)}: ")


def test_lists_and_folders_and_batches_match_one_image_at_a_time(trained, data_dir):
    paths = images_of(data_dir)
    one = Detector.from_checkpoint(trained, device="cpu")
    singles = [one(p) for p in paths]
    for batched in (one(paths), one(str(data_dir / "val" / "images")),
                    Detector.from_checkpoint(trained, device="cpu", batch_size=2)(paths)):
        assert isinstance(batched, list) and [d.source for d in batched] == paths
        for a, b in zip(singles, batched):
            assert torch.allclose(a.boxes, b.boxes, atol=1e-3) and torch.equal(a.labels, b.labels)


def test_the_detector_equals_detkit_infer(trained, data_dir, tmp_path):
    """The CLI's results.json (image ids: positions in the folder) against the API's to_coco."""
    folder = str(data_dir / "val" / "images")
    assert main(["infer", str(trained), folder, "--output", str(tmp_path / "out"), "--score-thr", "0",
                 "--no-progress"]) == 0
    cli = json.loads((tmp_path / "out" / "results.json").read_text())
    api = [r for i, d in enumerate(Detector.from_checkpoint(trained, device="cpu")(folder)) for r in d.to_coco(i)]
    assert len(api) == len(cli) > 0
    for a, c in zip(api, cli):
        assert (a["image_id"], a["category_id"]) == (c["image_id"], c["category_id"])
        assert a["bbox"] == pytest.approx(c["bbox"], abs=1e-3) and a["score"] == pytest.approx(c["score"], abs=1e-5)


def test_options_score_threshold_cap_tiling_and_overrides(trained, data_dir):
    path = images_of(data_dir)[0]
    everything = Detector.from_checkpoint(trained, device="cpu", score_thresh=0.0)(path)
    assert len(everything) >= len(Detector.from_checkpoint(trained, device="cpu")(path))
    capped = Detector.from_checkpoint(trained, device="cpu", score_thresh=0.0, max_detections=3)(path)
    assert len(capped) == 3 and torch.allclose(capped.scores, everything.scores[:3])
    cut = float(everything.scores.max() + everything.scores.min()) / 2  # between scores, not on one
    above = Detector.from_checkpoint(trained, device="cpu", score_thresh=cut)(path)
    assert len(above) and bool((above.scores >= cut).all()) and len(everything.above(cut)) == len(above)
    tiled = Detector.from_checkpoint(trained, device="cpu", tile={"size": 64, "overlap": 0.25})(path)
    assert tiled.image_size == (120, 160) and bool((tiled.boxes[:, 2] <= 160.01).all())
    nms = Detector.from_checkpoint(trained, device="cpu", overrides={"model.roi_heads.nms_thresh": 0.1})(path)
    assert len(nms) <= len(Detector.from_checkpoint(trained, device="cpu")(path))


def test_an_exported_file_runs_through_the_same_interface(trained, data_dir, tmp_path):
    out = tmp_path / "model.ts"
    assert main(["export", str(trained), "--format", "torchscript", "--output", str(out)]) == 0
    path = images_of(data_dir)[1]
    eager, exported = Detector.from_checkpoint(trained, device="cpu")(path), Detector.from_export(out)(path)
    assert exported.names == eager.names and len(exported) == len(eager)
    assert torch.allclose(exported.boxes, eager.boxes, atol=1e-2)


def test_evaluate_equals_detkit_eval(trained, data_dir, tmp_path):
    metrics = detkit.evaluate(trained, output=tmp_path / "api", progress=False)
    assert main(["eval", str(trained), "--output", str(tmp_path / "cli"), "--no-progress"]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["AP"] == cli["AP"] and metrics["per_class"] == cli["per_class"]
    other = detkit.evaluate(trained, data=str(data_dir / "train" / "annotations.json"), output=tmp_path / "train",
                            max_detections=20, progress=False)
    assert other["max_detections"] == 20 and "AR20" in other
    voc = detkit.evaluate(trained, output=tmp_path / "voc", metric="voc07", progress=False)
    assert voc["metric"] == "voc07" and "mAP" in voc


def test_load_config_and_list_parts(trained, tmp_path):
    cfg_path = trained.parent / "config.yaml"
    cfg = detkit.load_config(cfg_path, {"train.lr": 0.5, "model.roi_heads.nms_thresh": 0.3})
    assert cfg.train.lr == 0.5 and cfg.model.roi_heads.nms_thresh == 0.3
    assert detkit.load_config(cfg_path, ["train.lr=0.25"]).train.lr == 0.25
    with pytest.raises(ConfigError, match="train.lrr"):
        detkit.load_config(cfg_path, {"train.lrr": 1})
    necks = detkit.list_parts("necks")
    assert [p.name for p in necks] == ["fpn"] and necks[0].settings["out_channels"] == 256
    assert {p.kind for p in detkit.list_parts()} >= {"backbones", "necks", "detectors", "datasets"}
    assert "faster_rcnn" in [p.name for p in detkit.list_parts("detector")]
    with pytest.raises(ConfigError, match="unknown"):
        detkit.list_parts("nonsense")


def test_bad_input_is_refused_naming_it(trained, tmp_path):
    detector = Detector.from_checkpoint(trained, device="cpu")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB, got shape \(10, 10\)"):
        detector(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="float tensor image holds values in \\[0, 1\\]"):
        detector(torch.full((3, 8, 8), 2.0))
    with pytest.raises(TypeError, match="expected a path, a folder"):
        detector(42)
    with pytest.raises(Exception, match="not found"):
        detector(str(tmp_path / "missing.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: no images"):  # MediaError
        detector(str(empty))
    for kwargs, match in (({"score_thresh": float("nan")}, "score_thresh=nan"), ({"batch_size": 0}, "batch_size=0"),
                          ({"tile": {"sizes": 3}}, "tile: unknown key 'sizes'"), ({"tile": -1}, "tile=-1"),
                          ({"amp": "fp8"}, "amp='fp8'"), ({"max_detections": 0}, "max_detections=0")):
        with pytest.raises(ConfigError, match=match):
            Detector.from_checkpoint(trained, device="cpu", **kwargs)
