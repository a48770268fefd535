"""Loggers, a kind of part (issue 26, item 1): TensorBoard events read back with TensorBoard's own reader, CSV
rows, a resumed run that logs no step twice, a plugin's logger, a misspelt logger refused."""
import csv
import json
import sys

import pytest

from detkit.cli import main
from e2e_utils import synth_splits, write_config

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_splits(tmp_path_factory.mktemp("synth"), 6, 2)


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def csv_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iter", "name", "value"]
    return [(int(i), name, float(value)) for i, name, value in rows[1:]]


def test_tensorboard_and_csv_get_every_number_once_also_across_a_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    loggers = [{"name": "tensorboard"}, {"name": "csv"}]
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, run, max_iters=4, steps=[3], checkpoint_period=2,
                       log_period=1, eval_period=2, loggers=loggers)
    assert main(["train", str(cfg), "--no-progress"]) == 0
    tb = events(run / "tensorboard")
    tags = tb.Tags()
    assert {"total", "lr", "roi/cls", "rpn/objectness", "val/AP", "sec_per_iter", "data_sec", "eta_sec",
            "images_per_sec", "peak_mem_mb"} <= set(tags["scalars"])
    assert [e.step for e in tb.Scalars("total")] == [1, 2, 3, 4] and [e.step for e in tb.Scalars("val/AP")] == [2]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]  # jsonl: always there
    totals = {r["iter"]: r["total"] for r in log if "total" in r}
    assert [round(e.value, 4) for e in tb.Scalars("total")] == [round(totals[i], 4) for i in (1, 2, 3, 4)]
    assert {"report/pr_curves", "report/gallery_best", "report/training_curves"} <= set(tags["images"])
    assert {"val/pr_curves", "val/errors", "val/gallery_worst"} <= set(tags["images"])  # at each validation
    assert [e.step for e in tb.Images("val/pr_curves")] == [2]
    assert "config/text_summary" in tags["tensors"]
    rows = csv_rows(run / "log.csv")
    assert [i for i, name, _ in rows if name == "total"] == [1, 2, 3, 4]
    assert [i for i, name, _ in rows if name == "val/AP"] == [2]

    # Resume from iteration 2: what the loggers held after it (3, 4) is dropped, then logged again, once.
    assert main(["train", str(cfg), "--no-progress", "--resume", str(run / "iter_0000002.pth")]) == 0
    tb = events(run / "tensorboard")
    assert [e.step for e in tb.Scalars("total")] == [1, 2, 3, 4]
    rows = csv_rows(run / "log.csv")
    assert [i for i, name, _ in rows if name == "total"] == [1, 2, 3, 4]
    assert [json.loads(x)["iter"] for x in (run / "log.jsonl").read_text().splitlines() if "total" in x] == [1, 2, 3, 4]


PLUGIN = '''
from detkit.hookspecs import hookimpl

SEEN = []


class Recorder:
    def log_scalars(self, step, values):
        SEEN.append((step, dict(values)))

    def log_images(self, step, images):
        SEEN.append((step, sorted(images)))

    def log_config(self, config):
        SEEN.append(("config", config["train"]["max_iters"]))

    def close(self):
        SEEN.append("closed")


@hookimpl
def detkit_register_loggers(register):
    register("recorder", lambda settings, context: Recorder())
'''


def test_a_plugin_registers_a_logger_of_its_own(data_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "recorder_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DETKIT_PLUGINS", "recorder_plugin")
    assert main(["list", "loggers"]) == 0
    assert "recorder" in capsys.readouterr().out
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, tmp_path / "run", max_iters=2, log_period=1,
                       checkpoint_period=0, loggers=["recorder"])
    assert main(["train", str(cfg), "--no-progress"]) == 0
    seen = sys.modules["recorder_plugin"].SEEN
    assert seen[0] == ("config", 2) and seen[-1] == "closed"
    assert [s for s, v in seen[1:-1] if isinstance(v, dict) and "total" in v] == [1, 2]
    assert (tmp_path / "run" / "log.jsonl").is_file()  # jsonl is kept beside a logger of one's own


def test_an_unknown_logger_is_refused_before_training(data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, tmp_path / "run", max_iters=2, loggers=["tensorbord"])
    assert main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.loggers[0].name" in err and "tensorboard" in err
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, tmp_path / "run", max_iters=2,
                       loggers=[{"name": "csv", "files": "x.csv"}])
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "train.loggers[0].files" in capsys.readouterr().err


def test_a_redirected_run_logs_plain_lines_without_carriage_returns(data_dir, tmp_path):
    """The progress bar filled redirected logs with carriage returns (issue 26, item 3): without a terminal,
    training logs one line per log period, as --no-progress does, and the evaluation draws no bar."""
    import subprocess

    cfg = write_config(tmp_path / "cfg.yaml", data_dir, tmp_path / "run", max_iters=4, log_period=2,
                       checkpoint_period=0)
    done = subprocess.run([sys.executable, "-m", "detkit", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr and "\r" not in done.stdout
    lines = [x for x in done.stderr.splitlines() if "detkit.training.loop: iter " in x]
    assert [x.split("iter ")[1].split("/")[0] for x in lines] == ["1", "2", "4"] and all("ETA" in x for x in lines)
