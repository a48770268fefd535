"""One plugin's mistake is that plugin's problem: third-party plugins with each kind of mistake installed
beside the built-ins are skipped as a whole and reported once, by name, distribution and reason, while
every other plugin keeps working; ``detkit list plugins``, ``DETKIT_DISABLE_PLUGINS``; and the plugins page's
(docs/plugins.md) "Writing a plugin" example package (tests/fixtures/example_plugin), installed from its own pyproject.toml,
listed and trained."""
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
import torch
import yaml

from detkit.cli import main
from detkit.plugins import NameConflictError, PluginWarning, UnknownNameError, get_plugin_manager, get_registries

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "fixtures", "example_plugin")
PLUGINS_PAGE = os.path.join(HERE, "..", "..", "docs", "plugins.md")


def install(site, dist: str, ep_name: str, module: str, source: str, version: str = "0.1") -> None:
    """A distribution with one ``detkit`` entry point, as pip leaves it, in the directory ``site``."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[detkit]\n{ep_name} = {module}\n")


HEAD = "from detkit.hookspecs import hookimpl\n"
BROKEN = {  # plugin name -> (module source, what its reason says)
    "dup": (HEAD + "@hookimpl\ndef detkit_register_backbones(register):\n"
                   "    register('dupnet', lambda num_classes=1000: None)\n"
                   "    register('resnet18', lambda num_classes=1000: None)\n",
            "registered backbone 'resnet18', which built-in plugin 'resnet' provides"),
    "typo": (HEAD + "@hookimpl\ndef detkit_register_backbone(register):\n"
                    "    register('typonet', lambda num_classes=1000: None)\n",
             "hook detkit_register_backbone matches no hook specification (did you mean "
             "detkit_register_backbones?)"),
    "boom": (HEAD + "@hookimpl\ndef detkit_register_necks(register):\n"
                    "    register('boomneck', lambda settings, **_: None)\n"
                    "    raise ValueError('no config file found')\n",
             "its hook detkit_register_necks raised ValueError: no config file found ("),
    "noimport": ("import detkit_missing_dependency\n", "ModuleNotFoundError: No module named "
                                                      "'detkit_missing_dependency'"),
    "unmarked": ("def detkit_register_backbones(register):\n    register('plainnet', lambda num_classes=1000: None)\n",
                 "function detkit_register_backbones is not marked @hookimpl"),
    "badargs": (HEAD + "@hookimpl\ndef detkit_register_backbones(reg):\n    reg('argnet', lambda: None)\n",
                "Argument(s) {'reg'} are declared in the hookimpl but can not be found in the hookspec"),
    "invalid": (HEAD + "@hookimpl\ndef detkit_register_heads(register):\n    register('nohead', 'not callable')\n",
                "registered box_predictor 'nohead' with a non-callable builder 'not callable'"),
}
GOOD = HEAD + ("@hookimpl\ndef detkit_register_backbones(register):\n"
               "    register('goodnet', lambda num_classes=1000: None, family='good')\n"
               "@hookimpl\ndef detkit_register_necks(register):\n"
               "    register('goodneck', lambda settings, **_: None)\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Every broken plugin and a good one installed beside the built-ins."""
    site = tmp_path / "site"
    site.mkdir()
    for name, (source, _) in BROKEN.items():
        install(site, f"detkit-{name}", name, f"detkit_{name}_plugin", source)
    install(site, "detkit-good", "good", "detkit_good_plugin", GOOD, version="2.3")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_each_broken_plugin_is_skipped_whole_and_the_others_work(site):
    with pytest.warns(PluginWarning) as caught:
        reg = get_registries(get_plugin_manager())
    for name, (_, reason) in BROKEN.items():
        record = reg.plugins[name]
        assert record.status == "failed" and reason in record.error, (name, record.error)
        assert (record.distribution, record.version) == (f"detkit-{name}", "0.1")
        assert [str(w.message) for w in caught].count(record.failure) == 1, name
        assert record.failure.startswith(f"plugin {name!r} failed to load and was skipped (detkit-{name} 0.1): ")
    assert reg.load_errors.keys() == BROKEN.keys()
    assert reg.plugins["boom"].error.endswith("detkit_boom_plugin.py:5)")  # the plugin's own line
    # none of a failed plugin's registrations are kept, every other plugin's are
    for kind, name in [("backbones", "dupnet"), ("backbones", "typonet"), ("necks", "boomneck"),
                       ("backbones", "plainnet"), ("backbones", "argnet"), ("heads", "nohead")]:
        assert name not in reg.kind(kind)
    assert reg.backbones.get("resnet18").plugin == "resnet" and reg.backbones.get("tiny").plugin == "tiny"
    assert reg.backbones.get("goodnet").plugin == "good" and reg.necks.get("goodneck").plugin == "good"
    assert reg.plugins["good"].registered == {"backbones": ["goodnet"], "necks": ["goodneck"]}
    assert reg.plugins["resnet"].builtin and reg.plugins["resnet"].distribution == "detkit"


def test_a_name_its_failed_plugin_would_have_registered_says_so(site):
    with pytest.warns(PluginWarning):
        reg = get_registries(get_plugin_manager())
    for kind, name, plugin in [("backbones", "dupnet", "dup"), ("backbones", "typonet", "typo"),
                               ("necks", "boomneck", "boom"), ("backbones", "plainnet", "unmarked")]:
        with pytest.raises(UnknownNameError) as err:
            reg.kind(kind).get(name)
        assert str(err.value).startswith(f"unknown {kind[:-1]} {name!r}: plugin {plugin!r} failed to load "
                                         f"(detkit-{plugin} 0.1): "), str(err.value)
        assert BROKEN[plugin][1] in str(err.value)
    # a plugin that failed to import could have provided any name: it is named with its reason
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'mobilenet_v1'; did you mean 'googlenet_v1'\?; "
                                               r"(.*; )?plugin 'noimport' failed to load \(detkit-noimport 0.1\), so "
                                               r"nothing it registers is available: ModuleNotFoundError.* "
                                               r"\(registered: alexnet, .*\)$"):
        reg.backbones.get("mobilenet_v1")


def test_commands_on_built_ins_survive_broken_plugins_and_report_each_once(site, tmp_path):
    """Run as a user runs it: each skipped plugin is one clean line on stderr, no warning machinery."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "detkit", "list", "necks"], env=env, capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"fpn +plugin=core", out.stdout) and re.search(r"goodneck +plugin=good", out.stdout)
    lines = out.stderr.splitlines()
    for name, (_, reason) in BROKEN.items():
        mine = [line for line in lines if f"plugin {name!r}" in line]
        assert len(mine) == 1 and mine[0].startswith(f"warning: plugin {name!r} failed to load and was skipped "
                                                     f"(detkit-{name} 0.1): ") and reason in mine[0], mine
    assert len(lines) == len(BROKEN), out.stderr  # nothing else: no source lines, no "warnings.warn(...)"


def test_list_plugins_shows_each_plugin_what_it_registered_and_why_one_failed(site, capsys):
    assert main(["list", "plugins"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # the failures are in the table, not repeated on stderr
    out = captured.out
    assert re.search(r"^plugins \(\d+ loaded, 7 failed, 0 disabled\):$", out, re.M)
    assert re.search(r"^  tiny +detkit [\d.]+, built-in\n +backbones: tiny$", out, re.M)
    assert re.search(r"^  good +detkit-good 2\.3\n +backbones: goodnet\n +necks: goodneck$", out, re.M)
    flat = re.sub(r"\s+", " ", out)  # long lines are wrapped
    for name, (_, reason) in BROKEN.items():
        assert f" {name} detkit-{name} 0.1 FAILED, skipped: " in flat and reason in flat, name


def test_disabled_plugins_are_not_loaded_and_the_built_in_switch_still_works(site, monkeypatch, capsys):
    monkeypatch.setenv("DETKIT_DISABLE_PLUGINS", "noimport, timm,dup,nosuchplugin")
    with pytest.warns(PluginWarning) as caught:
        reg = get_registries(get_plugin_manager())
    assert {n: reg.plugins[n].status for n in ("noimport", "timm", "dup", "tiny")} == {
        "noimport": "disabled", "timm": "disabled", "dup": "disabled", "tiny": "loaded"}
    assert "noimport" not in reg.load_errors and "tiny" in reg.backbones
    assert any("DETKIT_DISABLE_PLUGINS names 'nosuchplugin', which is no plugin (plugins: " in str(w.message)
               for w in caught)
    with pytest.raises(UnknownNameError, match=r"disabled by DETKIT_DISABLE_PLUGINS: timm, dup, noimport "
                                               r"\(registered: "):
        reg.backbones.get("mobilenet_v1")
    assert main(["list", "plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  noimport +detkit-noimport 0\.1\n +disabled \(DETKIT_DISABLE_PLUGINS\)$", out, re.M)
    assert "note: DETKIT_DISABLE_PLUGINS names 'nosuchplugin'" in out

    monkeypatch.delenv("DETKIT_DISABLE_PLUGINS")
    monkeypatch.setenv("DETKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # the older switch: no entry point at all
    monkeypatch.setenv("DETKIT_PLUGINS", "detkit_tiny")
    reg = get_registries(get_plugin_manager())
    assert list(reg.backbones) == ["tiny"] and reg.plugins["detkit_tiny"].builtin


def test_a_name_two_third_party_plugins_register_is_an_error_naming_both(tmp_path, monkeypatch, capsys):
    for name in ("left", "right"):
        install(tmp_path, f"detkit-{name}", name, f"detkit_{name}_plugin", HEAD + textwrap.dedent(f"""
            @hookimpl
            def detkit_register_backbones(register):
                register("sharednet", lambda num_classes=1000: None)
                register("{name}net", lambda num_classes=1000: None)
            """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match="backbone 'sharednet' is registered by plugin 'left' and by plugin "
                                           "'right': a command that asks for it fails"):
        reg = get_registries(get_plugin_manager())
    assert reg.load_errors == {} and "leftnet" in reg.backbones and "rightnet" in reg.backbones
    assert "sharednet" in reg.backbones and "sharednet" not in list(reg.backbones)
    with pytest.raises(NameConflictError, match=r"backbone 'sharednet' is registered by more than one plugin: "
                                                r"plugin 'left' \(detkit-left 0.1\) and by plugin 'right' "
                                                r"\(detkit-right 0.1\)"):
        reg.backbones.get("sharednet")
    assert main(["summary", "sharednet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: backbone 'sharednet' is registered by plugin 'left' and by plugin 'right'")
    assert err[1].startswith("detkit summary: error: backbone 'sharednet' is registered by more than one plugin: "
                             "plugin 'left' (detkit-left 0.1) and by plugin 'right' (detkit-right 0.1)"), err
    assert main(["list", "plugins"]) == 0
    assert "sharednet (also registered by 'right': asking for it is an error)" in \
        re.sub(r"\s+", " ", capsys.readouterr().out)


# ----------------------------------------------------------------------------- the plugins page's example plugin


@pytest.fixture
def mobilenet(tmp_path, monkeypatch):
    """tests/fixtures/example_plugin installed as pip installs it: the package, and a dist-info whose name,
    version and entry points come from its pyproject.toml."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(EXAMPLE, "detkit_mobilenet"), site / "detkit_mobilenet")
    with open(os.path.join(EXAMPLE, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("[detkit]\n" + "".join(
        f"{name} = {value}\n" for name, value in project["entry-points"]["detkit"].items()))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_example_plugin_is_listed_and_states_its_shapes_truly(mobilenet, capsys, monkeypatch):
    monkeypatch.setenv("DETKIT_DISABLE_PLUGINS", "classic,inception,resnet,densenet,timm")  # a short list
    assert main(["list", "backbones"]) == 0
    assert re.search(r"mobilenet_v1 +plugin=mobilenet +params= +[\d,]+ +stride=16 +channels=512 +"
                     r"family=mobilenet, paper=Howard et al. 2017", capsys.readouterr().out)
    assert main(["list", "plugins"]) == 0
    assert re.search(r"^  mobilenet +detkit-mobilenet 0\.1\.0\n +backbones: mobilenet_v1$", capsys.readouterr().out,
                     re.M)

    model = get_registries().backbones.build("mobilenet_v1", num_classes=5, width=0.25).eval()
    parts, image = model.detection_parts(), torch.rand(1, 3, 64, 96)
    assert model(image).shape == (1, 5)
    features = parts.trunk(image)
    assert features.shape == (1, parts.out_channels, 64 // parts.stride, 96 // parts.stride)
    size = model.defaults.roi_output_size
    assert parts.box_head(torch.rand(3, parts.out_channels, size, size)).shape == (3, parts.head_channels)
    stages = model.feature_stages()
    x = image
    for stage, info in zip(stages.stages, stages.info):
        x = stage(x)
        assert x.shape[1:] == (info.channels, 64 // info.stride, 96 // info.stride), info
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared for p in [*parts.trunk.parameters(), *parts.box_head.parameters()])


def test_example_plugin_trains_from_its_starting_config(mobilenet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's paths are relative to where detkit runs
    assert main(["data", "synth", "--output", "data/synth/train", "--num-images", "4", "--size", "96x128"]) == 0
    assert sorted(os.listdir("data/synth/train")) == ["annotations.json", "images"]  # one call, one split
    config = os.path.join(EXAMPLE, "mobilenet_synth.yaml")
    overrides = ["model.backbone.args.width=0.25", "model.transform.min_size=96", "model.transform.max_size=128",
                 "data.test.images=data/synth/train/images",
                 "data.test.annotations=data/synth/train/annotations.json", "train.max_iters=2",
                 "train.steps=[1]", "train.warmup_iters=0", "train.checkpoint_period=2", "train.log_period=1",
                 "train.eval_at_end=false", "model.backbone.freeze_at=2"]
    assert main(["train", config, *[a for o in overrides for a in ("--set", o)], "--no-progress"]) == 0
    assert os.path.isfile("work_dirs/mobilenet_synth/final.pth")


def test_example_plugin_takes_a_feature_pyramid(mobilenet):
    from detkit.config import from_dict
    from detkit.models.assembly import build_detector

    cfg = from_dict({"model": {
        "backbone": {"name": "mobilenet_v1", "args": {"width": 0.25}},
        "neck": {"name": "fpn", "out_channels": 16},
        "proposal_generator": {"name": "rpn", "anchors": {"sizes": [16, 32, 64, 128, 256]}, "min_size": 1},
        "roi_extractor": "roi_align", "box_head": {"name": "two_fc", "fc_dim": 16},
        "transform": {"min_size": 64, "max_size": 96}}}).model
    model = build_detector(cfg, get_registries(), 2, ["a", "b"]).train()
    losses = model([torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)],
                   [{"boxes": torch.tensor([[4.0, 4, 40, 30]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()


def _quoted(path: str) -> str:
    """The plugins page's code block whose first line names ``path`` (``# detkit-mobilenet/<path>``)."""
    text = open(PLUGINS_PAGE, encoding="utf-8").read()
    match = re.search(r"```[a-z]*\n(# detkit-mobilenet/" + re.escape(path) + r"\n.*?)```", text, re.S)
    assert match, f"docs/plugins.md: the example plugin's {path} is not quoted"
    return match.group(1)


@pytest.mark.parametrize("path", ["pyproject.toml", "detkit_mobilenet/__init__.py", "mobilenet_synth.yaml"])
def test_the_plugins_page_quotes_the_example_plugin_exactly(path):
    with open(os.path.join(EXAMPLE, path), encoding="utf-8") as f:
        assert _quoted(path) == f.read()


def test_a_plugin_that_calls_sys_exit_at_import_is_skipped_like_any_broken_one(tmp_path, monkeypatch, capsys):
    """sys.exit in a plugin's module made every command exit silently."""
    from detkit.cli import main

    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DETKIT_PLUGINS", "exiting_plugin")
    assert main(["list", "detectors"]) == 0
    captured = capsys.readouterr()
    assert "faster_rcnn" in captured.out
    assert "exiting_plugin" in captured.err and "SystemExit" in captured.err


def test_a_third_party_builder_that_raises_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """A plugin's builder that raised ended train with a traceback from inside the plugin (issue 23, item 16): now
    one line names the config key, the part, the plugin and its error, exit 2; a built-in's stays a traceback."""
    import yaml

    from detkit.cli import main

    site = tmp_path / "site"
    site.mkdir()
    install(site, "detkit-fragile", "fragile", "fragile_plugin", HEAD + textwrap.dedent("""
        @hookimpl
        def detkit_register_backbones(register):
            def fragilenet(num_classes=1000):
                raise RuntimeError("fragilenet needs a GPU driver")
            register("fragilenet", fragilenet)

        @hookimpl
        def detkit_register_necks(register):
            def fragile_neck(settings, context):
                return {}["levels"]
            register("fragile_neck", fragile_neck)
        """))
    monkeypatch.syspath_prepend(str(site))
    data = tmp_path / "data"
    assert main(["data", "synth", "--output", str(data), "--num-images", "2", "--size", "64x64"]) == 0
    spec = {"name": "coco", "images": str(data / "images"), "annotations": str(data / "annotations.json")}
    for model, expected in (
            ({"backbone": {"name": "fragilenet"}},
             "model.backbone: backbone 'fragilenet' of plugin 'fragile' (detkit-fragile 0.1) failed to build: "
             "RuntimeError: fragilenet needs a GPU driver"),
            ({"backbone": {"name": "tiny"}, "neck": {"name": "fragile_neck"}},
             "model.neck: neck 'fragile_neck' of plugin 'fragile' (detkit-fragile 0.1) failed to build: "
             "KeyError: 'levels'")):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"model": model, "data": {"train": spec, "test": spec, "num_workers": 0},
                                       "train": {"work_dir": str(tmp_path / "run"), "max_iters": 1}}))
        capsys.readouterr()
        assert main(["train", str(cfg), "--no-progress", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
        assert "DETKIT_DEBUG=1 shows the traceback" in err
    monkeypatch.setenv("DETKIT_DEBUG", "1")
    with pytest.raises(KeyError, match="levels"):
        main(["train", str(cfg), "--no-progress", "--overwrite"])
