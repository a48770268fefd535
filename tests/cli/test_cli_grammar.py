"""One command-line grammar: --version, help text on every argument, the same option names for the same things
across commands (--data, --device, --output, --set, --no-progress), renamed options kept as hidden deprecated
aliases, ranged numbers, train --device, and --no-progress training that logs one line per train.log_period."""
import argparse
import json
import logging

import pytest
import yaml

import detkit
from detkit.cli import build_parser, main
from e2e_utils import SIZE, write_config


def _parsers():
    """(command, parser) for the top level and every command and subcommand."""
    found, todo = [], [("detkit", build_parser())]
    while todo:
        name, parser = todo.pop(0)
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


def _commands():
    """The parsers that run something (no subcommands of their own), by command."""
    return {name.removeprefix("detkit "): p for name, p in _parsers()
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)}


def _options(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_version_prints_the_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"detkit {detkit.__version__}"


def test_every_argument_of_every_command_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, parser in _parsers()
               for a in parser._actions if not (a.help and a.help.strip())]
    assert missing == []


# Commands that run a model or train, and those that show progress bars.
RUN_A_MODEL = {"train", "pretrain", "eval", "infer", "eval-cls", "proposals eval"}
SHOW_PROGRESS = RUN_A_MODEL | {"proposals compute", "data tile"}


def test_the_same_option_names_mean_the_same_thing_across_commands():
    commands = _commands()
    assert RUN_A_MODEL | SHOW_PROGRESS <= set(commands)
    for name in RUN_A_MODEL:
        device = _options(commands[name]).get("--device")
        assert device is not None and device.dest == "device" and device.help, name
    for name in SHOW_PROGRESS:
        assert _options(commands[name])["--no-progress"].dest == "no_progress", name
    # export runs on the CPU by design and says so instead of taking --device
    assert "--device" not in _options(commands["export"])
    assert "on the CPU by design" in commands["export"].description
    seen: dict[str, tuple[str, str]] = {}
    for name, parser in commands.items():
        options = _options(parser)
        for option, dest in (("--set", "overrides"), ("--output", "output"), ("--data", "data"),
                             ("--overwrite", "overwrite"), ("--no-progress", "no_progress"), ("--device", "device")):
            if option in options:
                assert options[option].dest == dest, (name, option)
                if option == "--device":  # one reading of a device name everywhere
                    seen.setdefault(option, (name, options[option].type))
                    assert options[option].type is seen[option][1], (name, seen[option])
        # an output folder or file is --output everywhere; --out and --dataset are hidden aliases
        visible = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
        assert not visible & {"--out", "--dataset"}, name


@pytest.mark.parametrize("argv, message", [
    (["eval", "ckpt", "--device", "gpu"], "argument --device: 'gpu': expected auto (CUDA when available, else the "
                                          "CPU), cpu, cuda or cuda:N"),
    (["train", "cfg.yaml", "--device", "cuda:x"], "argument --device: 'cuda:x': expected auto"),
    (["data", "synth", "--output", "d", "--size", "16x320"],
     "argument --size: '16x320': expected HEIGHTxWIDTH with each at least 32, e.g. 240x320"),
    (["data", "synth-video", "--output", "v.mp4", "--size", "240"], "argument --size: '240': expected HEIGHTxWIDTH"),
    (["summary", "tiny", "--input-size", "3,0,224"], "argument --input-size: '3,0,224': expected C,H,W with each "
                                                     "at least 1"),
    (["eval", "ckpt", "--svd", "1024,0"], "argument --svd: '1024,0': expected comma-separated ranks >= 1"),
    (["data", "synth", "--format", "coco"], "the arguments --output is required"),
])
def test_bad_option_values_are_one_line_naming_the_option_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err


def test_renamed_options_still_work_and_say_they_are_deprecated(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num-images", "1", "--size", "64x64"]) == 0
    assert (tmp_path / "d" / "annotations.json").is_file()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out is deprecated; use --output" in err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for split, count, seed in (("train", "4", "0"), ("val", "2", "1")):
        assert main(["data", "synth", "--output", str(root / split), "--num-images", count, "--seed", seed,
                     "--size", SIZE]) == 0
    return root


def test_eval_of_a_results_file_takes_data_and_still_takes_dataset_with_a_note(data_dir, tmp_path, capsys):
    gt = json.loads((data_dir / "val" / "annotations.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    annotations = str(data_dir / "val" / "annotations.json")
    for option, out in (("--data", "a"), ("--dataset", "b")):
        capsys.readouterr()
        assert main(["eval", "--results", str(tmp_path / "dets.json"), option, annotations,
                     "--output", str(tmp_path / out)]) == 0
        assert json.loads((tmp_path / out / "metrics.json").read_text())["AP"] == pytest.approx(1.0)
        err = capsys.readouterr().err
        assert ("--dataset is deprecated; use --data" in err) == (option == "--dataset")
        assert "deprecated" not in err or err.count("deprecated") == 1


def test_train_takes_device_and_no_progress_logs_one_line_per_log_period(data_dir, tmp_path, caplog, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", data_dir, tmp_path / "run", max_iters=3, log_period=2,
                       checkpoint_period=0, eval_at_end=False)
    with caplog.at_level(logging.INFO, logger="detkit"):
        assert main(["train", str(cfg), "--device", "cpu", "--no-progress"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["device"] == "cpu"
    logged = [json.loads(line)["iter"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # the first iteration, every log_period, the last
    lines = [r.getMessage() for r in caplog.records if r.name == "detkit.training.loop"
             and r.getMessage().startswith("iter ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    for line in lines:
        for word in ("loss ", "rpn/objectness ", "roi/cls ", "lr ", " s/it", "ETA "):
            assert word in line, line
    assert lines[-1].endswith("ETA 0:00:00")
    assert "train:" not in capsys.readouterr().err  # no progress bar
