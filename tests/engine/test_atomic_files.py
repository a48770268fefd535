"""Atomic file writes (detkit.engine.files): the helper itself (content, no temporary left, the target untouched
when the writer fails, permissions from the umask) and the permissions of what the commands really write:
checkpoints, exported files, synthetic datasets, caches, evaluation reports, pictures and videos.

The outputs are checked under umask 027, which gives 0640: neither mkstemp's 0600 (a temporary renamed as it
is) nor a hard-coded 0644 passes."""
import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.cli import main
from detkit.engine.files import (atomic_path, atomic_write, new_file_mode, replace_directory, write_bytes_atomic,
                                 write_json_atomic, write_text_atomic)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def umask():
    """``os.umask``, to set the process umask in a test; the one before the test is restored after it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def files_under(folder) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def modes_under(folder) -> dict[str, int]:
    """``{path relative to folder: permission bits}`` of every file below ``folder``."""
    return {str(p.relative_to(folder)): mode(p) for p in files_under(folder)}


# ----------------------------------------------------------------------------- the helper


def test_each_form_writes_its_content_and_leaves_no_temporary(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "b.txt", "h\u00e9\n")
    write_json_atomic(tmp_path / "c.json", {"x": [1, 2]}, indent=1)
    with atomic_write(tmp_path / "sub" / "d.bin") as f:  # the folder is created
        f.write(b"one")
        f.write(b"two")
    with atomic_path(tmp_path / "e.npy") as tmp:
        assert tmp.endswith(".npy") and os.path.dirname(tmp) == str(tmp_path)  # beside it, same extension
        np.save(tmp, np.arange(3))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "h\u00e9\n".encode("utf-8")
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "sub" / "d.bin").read_bytes() == b"onetwo"
    assert np.load(tmp_path / "e.npy").tolist() == [0, 1, 2]
    assert [p.name for p in files_under(tmp_path)] == ["a.bin", "b.txt", "c.json", "e.npy", "d.bin"]


def test_a_failing_writer_leaves_the_target_untouched_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})  # fails while serialising
    with pytest.raises(OSError, match="the writer failed"):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise OSError("the writer failed")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        write_bytes_atomic(tmp_path / "folder", b"x")  # the rename itself fails: the temporary goes too
    with pytest.raises(ValueError, match="mode 'a'"):
        with atomic_write(target, "a"):
            pass
    assert target.read_text() == "previous" and not os.listdir(tmp_path / "folder")
    assert sorted(os.listdir(tmp_path)) == ["folder", "out.json"]


@pytest.mark.parametrize("value, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_file_gets_the_permissions_the_umask_gives_a_new_file(tmp_path, umask, value, expected):
    umask(value)
    assert new_file_mode() == expected and os.umask(value) == value  # reading it leaves it as it was
    write_bytes_atomic(tmp_path / "a.bin", b"x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        # a writer that makes its own file, private as mkstemp's: the final file still follows the umask
        os.remove(tmp)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    (tmp_path / "c.bin").write_bytes(b"old")
    os.chmod(tmp_path / "c.bin", 0o666)
    write_bytes_atomic(tmp_path / "c.bin", b"new")  # a replaced file gets a new file's permissions too
    assert [mode(tmp_path / n) for n in ("a.bin", "b.bin", "c.bin")] == [expected] * 3


def test_replace_directory_swaps_folders_and_clears_a_stale_trash(tmp_path):
    staged, target = tmp_path / ".out.partial", tmp_path / "out"
    staged.mkdir()
    (staged / "new").write_text("1")
    replace_directory(staged, target)  # nothing there yet
    assert os.listdir(target) == ["new"] and sorted(os.listdir(tmp_path)) == ["out"]
    staged.mkdir()
    (staged / "newer").write_text("2")
    (tmp_path / ".out.partial.old").mkdir()  # left by a run killed between the renames
    (tmp_path / ".out.partial.old" / "junk").write_text("x")
    replace_directory(staged, target)
    assert os.listdir(target) == ["newer"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_killed_checkpoint_write_leaves_a_temporary_the_next_run_removes(tmp_path, monkeypatch):
    from detkit.engine.checkpoint import TEMPORARY_PATTERN, atomic_torch_save, remove_stale_temporaries

    names, save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: names.append(os.path.basename(f.name)) or save(obj, f))
    atomic_torch_save({"w": torch.zeros(1)}, str(tmp_path / "final.pth"))
    assert len(names) == 1 and fnmatch.fnmatch(names[0], TEMPORARY_PATTERN)
    (tmp_path / names[0]).write_bytes(b"half a checkpoint")  # what a kill during that write would leave
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / names[0])]
    assert os.listdir(tmp_path) == ["final.pth"]


# ----------------------------------------------------------------------------- real outputs


def tiny_detector(registries):
    from detkit.config import load_config
    from detkit.models.assembly import build_detector

    cfg = load_config(CONFIGS / "faster_rcnn_tiny_synth.yaml",
                      ["model.transform.min_size=96", "model.transform.max_size=128",
                       "model.proposal_generator.post_nms_top_n_test=20", "model.roi_heads.score_thresh=0.0"],
                      registries)
    torch.manual_seed(0)
    return build_detector(cfg.model, registries, 2, ["circle", "square"]).eval(), cfg


def test_a_checkpoint_and_its_torchscript_export_follow_the_umask(tmp_path, umask, registries):
    import cv2

    from detkit.config import to_dict
    from detkit.engine.checkpoint import save_checkpoint

    umask(0o027)
    # noise, not a picture with flat areas: tied scores could make the eager and the exported NMS differ
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "0.png"), np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8))
    model, cfg = tiny_detector(registries)
    checkpoint = tmp_path / "model.pth"
    save_checkpoint(str(checkpoint), model_state=model.state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=["circle", "square"], cat_ids=[1, 2])
    out = tmp_path / "export" / "model.ts"
    out.parent.mkdir()
    assert main(["export", str(checkpoint), "--format", "torchscript", "--output", str(out),
                 "--images", str(tmp_path / "images")]) == 0
    assert mode(checkpoint) == mode(out) == 0o640
    assert os.listdir(out.parent) == ["model.ts"]


def test_a_synthetic_dataset_and_video_follow_the_umask(tmp_path, umask):
    umask(0o027)
    for fmt in ("coco", "voc"):
        assert main(["data", "synth", "--output", str(tmp_path / fmt), "--format", fmt, "--num-images", "2",
                     "--size", "64x64"]) == 0
    assert main(["data", "synth-video", "--output", str(tmp_path / "clip.mp4"), "--frames", "3",
                 "--size", "64x64"]) == 0
    written = modes_under(tmp_path)
    assert {"coco/annotations.json", "voc/Annotations/000001.xml", "voc/ImageSets/Main/trainval.txt",
            "clip.mp4"} <= set(written)
    assert written == dict.fromkeys(written, 0o640)


def test_caches_follow_the_umask(tmp_path, umask):
    from detkit.data import COCODataset
    from detkit.data.synth import synthesize
    from detkit.models.feature_cache import FeatureCache
    from detkit.proposals import ProposalCache

    umask(0o027)
    synthesize(str(tmp_path / "data"), "coco", 2, seed=0, image_size=(64, 64))
    dataset = COCODataset(str(tmp_path / "data" / "images"), str(tmp_path / "data" / "annotations.json"))
    proposals = ProposalCache(str(tmp_path / "proposals"), dataset, "ss", {})
    for index in range(len(dataset)):
        proposals.put(index, np.array([[0, 0, 10, 10]], np.float32))
    with FeatureCache.create(tmp_path / "features", {"fc7": 2}, "float32", num_classes=1, fingerprint="f") as w:
        w.append(0, {"fc7": np.ones((1, 2))}, np.array([[0, 0, 5, 5]]), np.zeros(1), np.zeros((1, 1)),
                 np.zeros((1, 4)), np.zeros(1), np.zeros(1))
    written = modes_under(tmp_path / "proposals") | modes_under(tmp_path / "features")
    assert {os.path.join(os.path.basename(proposals.directory), name) for name in
            ("meta.json", "images.json", os.path.join("boxes", "00000001.npy"))} | {"meta.json"} <= set(written)
    assert written == dict.fromkeys(written, 0o640)


def test_an_evaluation_report_follows_the_umask(tmp_path, umask):
    from detkit.data.synth import synthesize

    umask(0o027)
    synthesize(str(tmp_path / "data"), "coco", 2, seed=0, image_size=(64, 64))
    gt = json.loads((tmp_path / "data" / "annotations.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "eval"
    assert main(["eval", "--results", str(tmp_path / "results.json"), "--dataset",
                 str(tmp_path / "data" / "annotations.json"), "--output", str(out)]) == 0
    written = modes_under(out)
    assert {"metrics.json", "pr_curves.png", "errors.png", "gallery_worst.png"} <= set(written)
    assert written == dict.fromkeys(written, 0o640)


def test_pictures_and_videos_follow_the_umask(tmp_path, umask):
    from detkit.data.media import VideoSink, write_image_atomic

    umask(0o027)
    write_image_atomic(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    with VideoSink(str(tmp_path / "b.avi"), 5, (16, 16)) as sink:
        sink.write(np.zeros((16, 16, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.avi"]
    assert mode(tmp_path / "a.png") == mode(tmp_path / "b.avi") == 0o640
