"""detkit export (detkit.export): the exported graph of each detector layout (C4 with a ResNet res5 head, a
fully connected head, FPN) in each format gives the eager detector's detections on images of several sizes
and aspect ratios and on a batch; an image without detections gives empty outputs; `detkit export` end to end,
its bad inputs (exit 2, naming the option), and a mismatch that keeps no file; the graph's batched NMS and
per-image top-N.

The detectors have random weights and a score threshold of 0, so that they detect something; the images are
noise, not constant (a constant image gives exactly tied scores, and backends break NMS ties differently)."""
import os
from pathlib import Path

import cv2
import pytest
import torch

from detkit.cli import main
from detkit.config import load_config, to_dict
from detkit.engine.checkpoint import save_checkpoint
from detkit.export.formats import FORMATS, export_detector, load_exported
from detkit.export.graph import _batched_nms, _first_per_image
from detkit.export.verify import compare, format_comparisons
from detkit.models.assembly import build_detector

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLASSES = ["circle", "square", "triangle"]
LAYOUTS = {"c4": "faster_rcnn_r18_c4_synth.yaml", "fc": "faster_rcnn_tiny_synth.yaml",
           "fpn": "faster_rcnn_tiny_fpn_synth.yaml"}
SMALL = ["model.transform.min_size=96", "model.transform.max_size=160",
         "model.proposal_generator.pre_nms_top_n_test=200", "model.proposal_generator.post_nms_top_n_test=40",
         "model.roi_heads.score_thresh=0.0"]
TOLERANCE = 1e-3


def noise(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# The example the graph is exported on has a size none of the test images has. 96x128 is kept at its size,
# 150x100 is scaled down by the shorter side (96/100), 80x200 by the longer side's cap (160/200).
EXAMPLE = torch.stack([noise(112, 112, 0), noise(112, 112, 1)])
SINGLES = {"96x128": noise(96, 128, 2), "150x100": noise(150, 100, 3), "80x200": noise(80, 200, 4)}
BATCH = {"96x128 #1 (batch)": SINGLES["96x128"], "96x128 #2 (batch)": noise(96, 128, 5)}


def build(registries, layout: str, *overrides: str):
    cfg = load_config(CONFIGS / LAYOUTS[layout], [*SMALL, *overrides], registries)
    torch.manual_seed(0)
    return build_detector(cfg.model, registries, len(CLASSES), CLASSES).eval(), cfg


@pytest.fixture(scope="module")
def detectors(registries):
    """One detector per layout, built on first use."""
    cache: dict = {}

    def get(layout: str):
        if layout not in cache:
            cache[layout] = build(registries, layout)[0]
        return cache[layout]

    return get


def export(model, fmt: str, folder: Path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path = folder / f"model{FORMATS[fmt]}"
    export_detector(model, fmt, str(path), EXAMPLE, {"class_names": CLASSES, "cat_ids": [1, 2, 3]})
    exported = load_exported(str(path))
    assert exported.format == fmt and exported.class_names == CLASSES and exported.cat_ids == [1, 2, 3]
    assert exported.max_detections == model.roi_heads.cfg.detections_per_img  # the cap the graph was written with
    return exported


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout, fmt", [
    pytest.param("c4", "torchscript", marks=pytest.mark.slow), pytest.param("c4", "exported", marks=pytest.mark.slow),
    ("fc", "torchscript"), pytest.param("fc", "exported", marks=pytest.mark.slow),
    pytest.param("fc", "onnx", marks=pytest.mark.slow),
    # roi_align from the level each region picks; the ONNX file is made through torch.export, so .pt2 is left
    # out here (loading an FPN program takes 12-20 s of the suite)
    ("fpn", "torchscript"), pytest.param("fpn", "onnx", marks=pytest.mark.slow),
])
def test_the_exported_file_detects_what_the_eager_detector_detects(layout, fmt, detectors, tmp_path):
    model = detectors(layout)
    exported = export(model, fmt, tmp_path)
    with torch.no_grad():
        eager = {name: model([image])[0] for name, image in {**SINGLES, **BATCH}.items()}
    got = {name: exported([image])[0] for name, image in SINGLES.items()}
    got.update(zip(BATCH, exported(list(BATCH.values()))))
    rows = [compare(name, eager[name], got[name], TOLERANCE) for name in eager]
    assert all(r.eager > 0 for r in rows), "the detector should detect something on every image"
    assert all(r.ok and r.score_diff < 1e-4 for r in rows), format_comparisons(rows, TOLERANCE)
    # A list of mixed sizes is cut into runs of one size; each image keeps its own detections.
    mixed = exported([SINGLES["150x100"], *BATCH.values(), SINGLES["80x200"]])
    for name, det in zip(["150x100", *BATCH, "80x200"], mixed):
        assert torch.equal(det["labels"], got[name]["labels"])
        assert torch.allclose(det["boxes"], got[name]["boxes"], atol=TOLERANCE)


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.slow) if f in ("onnx", "exported") else f
                                 for f in FORMATS])
def test_an_image_without_detections_gives_empty_outputs(fmt, tmp_path, registries):
    model, _ = build(registries, "fc", "model.roi_heads.score_thresh=0.999")
    exported = export(model, fmt, tmp_path)
    images = [*BATCH.values(), SINGLES["80x200"]]
    with torch.no_grad():
        assert all(len(model([image])[0]["boxes"]) == 0 for image in images)
    for det in exported(images):
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, registries):
    model, cfg = build(registries, "fc")
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(str(path), model_state=model.state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=CLASSES, cat_ids=[1, 2, 3])
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three PNGs: two of one size (verified alone and as a batch) and one of another shape."""
    folder = tmp_path_factory.mktemp("images")
    for i, (height, width) in enumerate([(96, 128), (96, 128), (150, 100)]):
        cv2.imwrite(str(folder / f"{i}.png"), noise(height, width, 10 + i).permute(1, 2, 0).numpy())
    return str(folder)


def test_export_writes_a_verified_file_with_the_class_names(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out" / "model.ts"
    out.parent.mkdir()
    assert main(["export", checkpoint, "--format", "torchscript", "--output", str(out), "--images", images]) == 0
    assert "5 of 5 comparisons match" in capsys.readouterr().out  # three alone, two as a batch
    exported = load_exported(str(out))
    assert exported.class_names == CLASSES and exported.cat_ids == [1, 2, 3]
    assert exported.metadata["format"] == "torchscript" and exported.metadata["checkpoint"] == checkpoint
    assert os.listdir(out.parent) == ["model.ts"]
    image = noise(120, 90, 20)
    assert len(exported([image])[0]["boxes"]) > 0


@pytest.mark.parametrize("args, messages", [
    (["--format", "onnx", "--output", "{tmp}/x.ts"], ["--output {tmp}/x.ts", "*.onnx"]),
    (["--format", "exported", "--output", "{tmp}/x.onnx"], ["--output {tmp}/x.onnx", "*.pt2"]),
    (["--format", "torchscript", "--output", "{tmp}/kept.ts"], ["--output {tmp}/kept.ts exists", "--overwrite"]),
    (["--format", "torchscript", "--output", "{tmp}/missing/x.ts"], ["--output {tmp}/missing/x.ts", "folder"]),
])
def test_bad_requests_exit_2_naming_the_option_before_the_model_is_built(args, messages, tmp_path, monkeypatch,
                                                                          capsys):
    def build_model(*_):
        raise AssertionError("the model was built before the request was checked")

    monkeypatch.setattr("detkit.models.loading.model_from_checkpoint", build_model)
    kept = tmp_path / "kept.ts"
    kept.write_bytes(b"an earlier export")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["export", str(tmp_path / "model.pth"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detkit export: error: ") and all(m.format(tmp=tmp_path) in err for m in messages)
    assert kept.read_bytes() == b"an earlier export" and sorted(os.listdir(tmp_path)) == ["kept.ts"]


def test_a_missing_images_path_exits_2(checkpoint, tmp_path, capsys):
    missing = tmp_path / "nowhere.png"
    assert main(["export", checkpoint, "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
                 "--images", str(missing)]) == 2
    assert f"--images {missing}: no such file or folder" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_detector_on_selective_search_cannot_be_exported(images, tmp_path, capsys, registries):
    cfg = load_config(CONFIGS / "fast_rcnn_tiny_synth.yaml", registries=registries)
    model = build_detector(cfg.model, registries, len(CLASSES), CLASSES)
    path = tmp_path / "fast_rcnn.pth"
    save_checkpoint(str(path), model_state=model.state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=CLASSES, cat_ids=[1, 2, 3])
    assert main(["export", str(path), "--format", "torchscript", "--output", str(tmp_path / "m.ts"),
                 "--images", images]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detkit export: error: ") and "proposals" in err and "RPN" in err
    assert sorted(os.listdir(tmp_path)) == ["fast_rcnn.pth"]


class Shifted:
    """An exported detector whose boxes are off by ``shift`` pixels (a backend that computes differently)."""

    def __init__(self, exported, shift: float):
        self.exported, self.shift = exported, shift

    def __call__(self, images):
        return [{**det, "boxes": det["boxes"] + self.shift} for det in self.exported(images)]


def test_a_mismatch_fails_and_keeps_no_file(checkpoint, images, tmp_path, monkeypatch, capsys):
    import detkit.export.run

    real = detkit.export.run.load_exported
    monkeypatch.setattr(detkit.export.run, "load_exported", lambda path: Shifted(real(path), 0.01))
    out = tmp_path / "model.ts"
    command = ["export", checkpoint, "--format", "torchscript", "--output", str(out), "--images", images]
    assert main([*command, "--tolerance", "1e-3"]) == 1  # 1: the export is wrong, not the request
    err = capsys.readouterr().err
    assert "differ from the eager model's" in err and "0 of 5 comparisons match" in err
    assert os.listdir(tmp_path) == []  # neither the file nor a .export-* temporary
    # The same difference within a looser tolerance is a match: --tolerance reaches the comparison.
    assert main([*command, "--tolerance", "0.05"]) == 0
    assert os.listdir(tmp_path) == ["model.ts"]


# ----------------------------------------------------------------------------- the graph's batched steps


def test_first_per_image_keeps_the_first_entries_of_each_image():
    image = torch.tensor([0, 1, 0, 0, 2, 1, 1, 0])
    assert _first_per_image(image, 3, 2).tolist() == [True, True, True, False, True, True, False, False]
    assert _first_per_image(image, 3, 0).tolist() == [False] * 8
    assert _first_per_image(torch.zeros(0, dtype=torch.int64), 2, 5).shape == (0,)


def test_batched_nms_suppresses_within_a_group_only():
    box = [10.0, 10.0, 50.0, 50.0]
    boxes = torch.tensor([box, [12.0, 10.0, 52.0, 50.0], box, [60.0, 60.0, 70.0, 70.0], box])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])
    groups = torch.tensor([0, 0, 1, 0, 2])
    # 1 overlaps 0 in group 0 and goes; 2 and 4 are the same box as 0, in groups of their own, and stay.
    assert _batched_nms(boxes, scores, groups, 0.5).tolist() == [3, 0, 2, 4]
    assert _batched_nms(boxes, scores, torch.zeros(5, dtype=torch.int64), 0.5).tolist() == [3, 0]
    empty = _batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.shape == (0,)


def test_sigterm_during_export_leaves_no_temporary_and_stale_ones_are_removed(checkpoint, images, tmp_path):
    """SIGTERM while the file is written: exit 143, a message, the earlier file untouched and no temporary left
    (before, the process died at once and left a 0-byte .tmp beside it); a temporary that a killed export left
    (its pid no longer runs) is removed by the next export, a running writer's is not (issue 23, item 14)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "model.pt2"
    out.write_bytes(b"an earlier export")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.pt2.{int(dead.stdout)}.x1y2.tmp.pt2"
    live = tmp_path / f".model.pt2.{os.getpid()}.a3b4.tmp.pt2"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-m", "detkit", "export", checkpoint, "--format", "exported",
                             "--output", str(out), "--images", images, "--overwrite"],
                            stderr=subprocess.PIPE, text=True)
    own = f".model.pt2.{proc.pid}."
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(own) for p in tmp_path.iterdir()) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not stale.exists()  # removed before the new temporary was made
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "left as it was, no temporary left" in err and "Traceback" not in err
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])


def test_a_signal_raises_stopped_and_the_atomic_write_cleans_up(tmp_path):
    import signal

    from detkit.engine.files import atomic_path
    from detkit.engine.signals import Stopped, stop_on_signals

    before = signal.getsignal(signal.SIGINT)
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with pytest.raises(Stopped) as stopped, stop_on_signals(), atomic_path(tmp_path / "f.onnx") as tmp:
            Path(tmp).write_bytes(b"half")
            os.kill(os.getpid(), signum)
        assert stopped.value.exit_code == code and isinstance(stopped.value, KeyboardInterrupt)
        assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
