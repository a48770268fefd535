"""Selective search proposals, the on-disk proposal cache, proposal recall and `detkit proposals`."""
import functools
import json
import logging
import os

import cv2
import numpy as np
import pytest
import yaml

from detkit.cli import main
from detkit.data import COCODataset
from detkit.data.synth import render, synthesize
from detkit.proposals import (ProposalCache, ProposalCacheError, fill_cache, format_recall_table,
                              plot_recall, proposal_recall, selective_search, selective_search_cache)
from detkit.proposals import cache as cache_module


def synth_image(h=96, w=128, seed=0):
    image, _, _ = render(np.random.default_rng([seed, 0]), np.random.default_rng([seed, 0, 1]), h, w)
    return image


def assert_valid_boxes(boxes, h, w):
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) >= 1
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)  # no duplicates


# ----------------------------------------------------------------------------- selective search


def test_boxes_in_original_coordinates_after_resize():
    image = synth_image(96, 128)
    full = selective_search(image, max_side=None)
    small = selective_search(image, max_side=64)  # searched at 48x64, boxes scaled back by 2
    assert_valid_boxes(full, 96, 128)
    assert_valid_boxes(small, 96, 128)
    # Boxes reach the far borders of the original image, not of the shrunk one.
    assert small[:, 2].max() == pytest.approx(128) and small[:, 3].max() == pytest.approx(96)
    area = lambda b: np.median((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    assert 0.25 < area(small) / area(full) < 4
    # A search at the shrunk size and its boxes times 2 are what max_side gives.
    half = cv2.resize(image, (64, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(selective_search(half, max_side=None) * 2, small)


@pytest.mark.parametrize("mode", ["fast", "quality", "rcnn"])
def test_every_mode_runs_and_is_reproducible(mode):
    image = synth_image(48, 64)
    boxes = selective_search(image, mode=mode)
    assert_valid_boxes(boxes, 48, 64)
    np.testing.assert_array_equal(boxes, selective_search(image, mode=mode))  # OpenCV's rand() is re-seeded


def test_mode_and_knob_errors():
    image = synth_image(48, 64)
    with pytest.raises(ValueError, match="mode='slow'"):
        selective_search(image, mode="slow")
    with pytest.raises(ValueError, match="base_k"):
        selective_search(image, mode="rcnn", base_k=100)
    with pytest.raises(ValueError, match="float32"):
        selective_search(image.astype(np.float32))
    assert_valid_boxes(selective_search(image, base_k=50, inc_k=50, sigma=0.5), 48, 64)


def test_top_k_and_min_size():
    image = synth_image(96, 128)
    every = selective_search(image, max_side=None, min_size=10)
    first = selective_search(image, max_side=None, min_size=10, top_k=5)
    np.testing.assert_array_equal(first, every[:5])  # the first top_k in the search's ranking
    assert (every[:, 2:] - every[:, :2] >= 10).all()
    assert len(every) < len(selective_search(image, max_side=None))


def test_uniform_gray_and_rgba_images(caplog):
    uniform = np.full((40, 50, 3), 128, np.uint8)
    np.testing.assert_array_equal(selective_search(uniform), [[0, 0, 50, 40]])
    gray = synth_image(48, 64)[:, :, 0]
    assert_valid_boxes(selective_search(gray), 48, 64)
    rgba = np.dstack([synth_image(48, 64), np.full((48, 64), 255, np.uint8)])
    np.testing.assert_array_equal(selective_search(rgba), selective_search(rgba[:, :, :3]))
    with caplog.at_level(logging.WARNING):  # nothing survives min_size: the whole image, and a warning
        boxes = selective_search(uniform, min_size=1000, name="blank.png")
    np.testing.assert_array_equal(boxes, [[0, 0, 50, 40]])
    assert "blank.png" in caplog.text


def test_missing_ximgproc_says_how_to_install(monkeypatch):
    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(RuntimeError, match="pip install --force-reinstall --no-deps opencv-contrib-python-headless"):
        selective_search(synth_image(48, 64))


# ----------------------------------------------------------------------------- recall


def test_recall_exact_numbers():
    gt = [np.array([[0, 0, 10, 10]], np.float32), np.array([[20, 20, 30, 30], [0, 0, 4, 4]], np.float32)]
    proposals = [
        np.array([[50, 50, 60, 60],    # rank 1: IoU 0
                  [0, 0, 5, 10],       # rank 2: IoU 0.5
                  [0, 0, 10, 8]],      # rank 3: IoU 0.8
                 np.float32),
        np.array([[20, 20, 30, 30]], np.float32),  # rank 1: IoU 1 with the first gt; the second never found
    ]
    r = proposal_recall(gt, proposals, counts=[1, 2, 3, 10])
    assert r["counts"] == [1, 2, 3, 10] and r["num_gt"] == 3 and r["num_images"] == 2
    assert r["recall"]["0.5"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r["recall"]["0.7"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert r["mean_proposals"] == 2.0 and r["mean_proposals_used"] == [1.0, 1.5, 2.0, 2.0]
    empty = proposal_recall(gt, [np.zeros((0, 4)), np.zeros((0, 4))], counts=[5])
    assert empty["recall"]["0.5"] == [0.0]
    with pytest.raises(ValueError, match="2 ground-truth lists but 1"):
        proposal_recall(gt, proposals[:1])


def test_recall_table_and_plot(tmp_path):
    gt = [np.array([[0, 0, 10, 10]], np.float32)]
    results = {"ss": proposal_recall(gt, [np.array([[0, 0, 10, 10]], np.float32)], counts=[1, 10]),
               "rpn": proposal_recall(gt, [np.array([[0, 0, 5, 10]], np.float32)], counts=[1, 10])}
    table = format_recall_table(results)
    assert "R0.5@1" in table and "R0.7@10" in table
    rows = table.splitlines()
    assert rows[2].split()[:4] == ["ss", "1.0", "1.000", "1.000"]
    assert rows[3].split()[:4] == ["rpn", "1.0", "1.000", "0.000"]
    plot_recall(results, tmp_path / "recall.png")
    assert cv2.imread(str(tmp_path / "recall.png")) is not None
    assert os.listdir(tmp_path) == ["recall.png"]


# ----------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssdata")
    synthesize(str(root / "a"), "coco", 4, seed=0, image_size=(48, 64))
    # b: a's files, but its first image is another file (same sizes and ids: another image list)
    coco = json.loads((root / "a" / "annotations.json").read_text())
    coco["images"][0]["file_name"] = "000003.png"
    (root / "b").mkdir()
    (root / "b" / "annotations.json").write_text(json.dumps(coco))
    os.symlink(root / "a" / "images", root / "b" / "images")
    synthesize(str(root / "c"), "coco", 3, seed=0, image_size=(48, 64))
    return root


def dataset(root, name="a"):
    return COCODataset(str(root / name / "images"), str(root / name / "annotations.json"))


SS = functools.partial(selective_search, mode="fast", max_side=None)


class CountingFn:
    """Selective search that records which images it was called on (in-process runs only)."""

    def __init__(self):
        self.names = []

    def __call__(self, image, name=None):
        self.names.append(os.path.basename(name))
        return SS(image, name=name)


def no_tmp_files(directory):
    return not [f for _, _, files in os.walk(directory) for f in files if f.endswith(".tmp")]


def test_cache_in_process_and_pool_agree(synth_dir, tmp_path):
    ds = dataset(synth_dir)
    one = fill_cache(ds, ProposalCache(str(tmp_path / "one"), ds, "ss", {"x": 1}), SS, num_workers=1,
                            progress=False)
    two = fill_cache(ds, ProposalCache(str(tmp_path / "two"), ds, "ss", {"x": 1}), SS, num_workers=2,
                            progress=False)
    assert one.complete and two.complete and one.missing() == [] and len(one) == 4
    for i in range(len(ds)):
        np.testing.assert_array_equal(one.get(i), two.get(i))
        np.testing.assert_array_equal(one.get(i), SS(cv2.cvtColor(cv2.imread(ds.image_info(i)["file_name"]),
                                                                  cv2.COLOR_BGR2RGB)))
    assert os.path.basename(one.directory) == f"ss-{one.fingerprint[:12]}"
    meta = json.loads(open(os.path.join(one.directory, "meta.json")).read())
    assert {k: meta[k] for k in ("version", "method", "settings", "num_images", "complete")} == \
        {"version": cache_module.CACHE_VERSION, "method": "ss", "settings": {"x": 1}, "num_images": 4,
         "complete": True}
    assert sorted(os.listdir(os.path.join(one.directory, "boxes"))) == [f"{i:08d}.npy" for i in range(4)]
    assert no_tmp_files(tmp_path)


def test_cache_resumes_only_missing_images(synth_dir, tmp_path):
    ds = dataset(synth_dir)
    fn = CountingFn()
    cache = fill_cache(ds, ProposalCache(str(tmp_path), ds, "ss", {}), fn, num_workers=1, progress=False)
    assert fn.names == ["000000.png", "000001.png", "000002.png", "000003.png"]
    kept = cache.get(0)
    os.remove(cache.path(1))
    os.remove(cache.path(3))
    reopened = ProposalCache(str(tmp_path), ds, "ss", {})  # same directory: the fingerprint names it
    assert reopened.directory == cache.directory and reopened.missing() == [1, 3] and not reopened.has(1)
    assert reopened.complete and not reopened.refresh_complete() and not reopened.complete
    with pytest.raises(ProposalCacheError, match=r"no proposals for image 1 .*ss-"):
        reopened.get(1)
    fn.names.clear()
    fill_cache(ds, reopened, fn, num_workers=1, progress=False)
    assert fn.names == ["000001.png", "000003.png"] and reopened.complete
    np.testing.assert_array_equal(reopened.get(0), kept)
    fn.names.clear()
    fill_cache(ds, reopened, fn, num_workers=1, progress=False)
    assert fn.names == []
    with pytest.raises(ProposalCacheError, match="index 4 out of range"):
        reopened.get(4)


def test_cache_rejects_other_dataset_version_and_settings(synth_dir, tmp_path, monkeypatch):
    ds = dataset(synth_dir)
    cache = ProposalCache(str(tmp_path), ds, "ss", {"mode": "fast", "min_size": 0.0})
    assert ProposalCache(str(tmp_path), ds, "ss", {"mode": "fast", "min_size": 0}).directory == cache.directory
    assert ProposalCache(str(tmp_path), ds, "ss", {"mode": "fast", "min_size": 5}).directory != cache.directory
    assert ProposalCache.open(cache.directory, ds).settings == {"mode": "fast", "min_size": 0}
    with pytest.raises(ProposalCacheError, match=r"another image list \(first differing image: index 0, "
                                                 r"file 000003.png.*'images'"):
        ProposalCache.open(cache.directory, dataset(synth_dir, "b"))
    with pytest.raises(ProposalCacheError, match="computed for dataset with 4 images.*'num_images'"):
        ProposalCache.open(cache.directory, dataset(synth_dir, "c"))
    monkeypatch.setattr(cache_module, "CACHE_VERSION", cache_module.CACHE_VERSION + 1)
    with pytest.raises(ProposalCacheError, match=f"{cache.directory}.*'version'"):
        ProposalCache.open(cache.directory, ds)
    monkeypatch.undo()
    meta_path = os.path.join(cache.directory, "meta.json")
    meta = json.loads(open(meta_path).read())
    with open(meta_path, "w") as f:
        json.dump({**meta, "settings": {"mode": "quality", "min_size": 0}}, f)
    with pytest.raises(ProposalCacheError, match="'settings'"):
        ProposalCache(str(tmp_path), ds, "ss", {"mode": "fast", "min_size": 0.0})
    with open(meta_path, "w") as f:
        f.write("{not json")
    with pytest.raises(ProposalCacheError, match="corrupted meta.json"):
        ProposalCache(str(tmp_path), ds, "ss", {"mode": "fast", "min_size": 0.0})


def test_corrupt_image_gets_whole_image_box(synth_dir, tmp_path, caplog):
    import shutil

    shutil.copytree(synth_dir / "a", tmp_path / "a")
    (tmp_path / "a" / "images" / "000002.png").write_bytes(b"not a png")
    ds = dataset(tmp_path)
    with caplog.at_level(logging.WARNING):
        cache = selective_search_cache(str(tmp_path / "cache"), ds, mode="fast", max_side=None, num_workers=1,
                                       progress=False)
    assert cache.complete
    np.testing.assert_array_equal(cache.get(2), [[0, 0, 64, 48]])
    assert len(cache.get(1)) > 1
    assert "000002.png" in caplog.text and "1 unreadable images" in caplog.text
    assert no_tmp_files(tmp_path)


# ----------------------------------------------------------------------------- CLI


RPN = {"name": "rpn", "anchors": {"sizes": [16, 32, 64]}, "pre_nms_top_n_test": 200, "post_nms_top_n_test": 50,
       "min_size": 2}


def write_config(path, data_dir, work_dir, cache_dir, test=True, generator=None):
    ss = {"name": "selective_search", "mode": "fast", "max_side": 500, "top_k": 100, "cache_dir": str(cache_dir)}
    cfg = {
        "model": {
            "backbone": {"name": "tiny", "args": {"widths": [8, 16, 32, 48, 48], "hidden": 64}},
            "proposal_generator": generator or ss,
            "transform": {"min_size": 48, "max_size": 64},
        },
        "data": {"train": {"name": "coco", "images": f"{data_dir}/a/images",
                           "annotations": f"{data_dir}/a/annotations.json"}},
        "train": {"work_dir": str(work_dir)},
    }
    if test:
        cfg["data"]["test"] = {"name": "coco", "images": f"{data_dir}/c/images",
                               "annotations": f"{data_dir}/c/annotations.json"}
    path.write_text(yaml.safe_dump(cfg))
    return path


def untrained_checkpoint(cfg_path, path, registries):
    from detkit.config import load_config, to_dict
    from detkit.data.synth import CLASSES
    from detkit.engine.checkpoint import save_checkpoint
    from detkit.models.assembly import build_detector

    cfg = load_config(cfg_path)
    model = build_detector(cfg.model, registries, len(CLASSES), list(CLASSES))
    save_checkpoint(str(path), model_state=model.state_dict(), config=to_dict(cfg), iteration=0,
                    class_names=list(CLASSES), cat_ids=list(range(1, len(CLASSES) + 1)))
    return path


def test_cli_compute_and_eval(synth_dir, tmp_path, capsys, registries):
    cfg = write_config(tmp_path / "cfg.yaml", synth_dir, tmp_path / "work", tmp_path / "proposals")
    assert main(["proposals", "compute", str(cfg), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    caches = sorted(os.listdir(tmp_path / "proposals"))
    assert len(caches) == 2 and all(c.startswith("selective_search-") for c in caches)
    assert "train: " in out and "test: " in out and "4 images; boxes per image: mean" in out
    assert main(["proposals", "compute", str(cfg), "--split", "test", "--no-progress",
                 "--set", "model.proposal_generator.top_k=10"]) == 0
    assert "max 10" in capsys.readouterr().out and len(os.listdir(tmp_path / "proposals")) == 3

    faster = write_config(tmp_path / "faster.yaml", synth_dir, tmp_path / "work", tmp_path / "proposals",
                          generator=RPN)
    assert main(["proposals", "compute", str(faster), "--no-progress"]) == 2  # an RPN config has no search settings
    assert "model.proposal_generator.name is 'rpn'" in capsys.readouterr().err
    ckpt = untrained_checkpoint(faster, tmp_path / "ckpt.pth", registries)
    assert main(["proposals", "eval", str(cfg), "--checkpoint", str(ckpt), "--device", "cpu",
                 "--no-progress"]) == 0
    out_dir = tmp_path / "work" / "proposals_eval"
    table = capsys.readouterr().out
    assert "selective_search (fast)" in table and "rpn (ckpt.pth)" in table
    recall = json.loads((out_dir / "recall.json").read_text())["results"]
    assert set(recall) == {"selective_search (fast)", "rpn (ckpt.pth)"}
    ss = recall["selective_search (fast)"]
    assert ss["num_images"] == 3 and 0 < ss["recall"]["0.5"][-1] <= 1 and ss["mean_proposals"] <= 100
    assert recall["rpn (ckpt.pth)"]["mean_proposals"] <= 50
    assert (out_dir / "recall.txt").read_text() in table and (out_dir / "recall.png").is_file()


def test_cli_missing_split_names_the_key(synth_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", synth_dir, tmp_path / "work", tmp_path / "proposals", test=False)
    assert main(["proposals", "compute", str(cfg), "--no-progress"]) == 2
    assert "data.test" in capsys.readouterr().err
    assert main(["proposals", "eval", str(cfg), "--no-progress"]) == 2
    assert "data.test" in capsys.readouterr().err
    assert not (tmp_path / "proposals").exists()  # nothing computed before the config was checked
    assert main(["proposals", "compute", str(cfg), "--split", "train", "--no-progress",
                 "--set", "model.proposal_generator.mode=slow"]) == 2
    assert "model.proposal_generator.mode='slow'" in capsys.readouterr().err


def test_the_default_cache_root_follows_the_xdg_rule_not_the_working_directory(synth_dir, tmp_path, monkeypatch,
                                                                               caplog):
    """Caches went to ./work_dirs/proposals of whatever directory a command ran in; with no cache_dir they go to
    the cache root, found again from anywhere, and the log says where."""
    from detkit.proposals.precomputed import SelectiveSearchProposals, SelectiveSearchSettings

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("DETKIT_CACHE_DIR", raising=False)
    assert cache_module.default_cache_root() == str(home / ".cache" / "detkit" / "proposals")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.default_cache_root() == str(tmp_path / "xdg" / "detkit" / "proposals")
    monkeypatch.setenv("DETKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_module.default_cache_root() == str(tmp_path / "mine" / "proposals")

    settings = SelectiveSearchSettings(top_k=20)
    assert settings.cache_dir is None
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        cache = SelectiveSearchProposals(settings).dataset_proposals(dataset(synth_dir), progress=False,
                                                                     num_workers=1)
    assert cache.directory.startswith(str(tmp_path / "mine" / "proposals")) and len(cache) == len(dataset(synth_dir))
    assert cache.directory in caplog.text and not (tmp_path / "work_dirs").exists()
