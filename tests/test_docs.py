"""The manual and the README: the site (mkdocs.yml, docs/) builds with ``mkdocs build --strict``, so a warning, a
broken link or anchor, a page left out of the nav or a bad mkdocstrings reference fails; the config reference
it generates (docs/hooks.py) covers every key of the schema and every registered part's settings; and the README
stays a front door that opens with the two set-up commands and links into the docs."""
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.md")


def _hooks():
    spec = importlib.util.spec_from_file_location("detkit_docs_hooks", os.path.join(ROOT, "docs", "hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]', make setup)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", NO_ALBUMENTATIONS_UPDATE="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "WARNING" not in output and "ERROR" not in output, output
    reference = (tmp_path / "site" / "config-reference" / "index.html").read_text(encoding="utf-8")
    assert "detkit:config-reference" not in reference  # the hook replaced its marker
    assert "pre_nms_top_n_train" in reference and "max_detections" in reference


def _fields(cls, seen=None):
    """Every field name of a dataclass and of the dataclasses its defaults hold (a part section's keys are its
    part's settings)."""
    from detkit.config import PartConfig

    seen = set() if seen is None else seen
    for f in dataclasses.fields(cls):
        seen.add(f.name)
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value) and not isinstance(value, (type, PartConfig)):
            _fields(type(value), seen)
    return seen


def test_the_config_reference_covers_the_schema_and_every_registered_part():
    from detkit.config import ClassifierConfig, Config
    from detkit.plugins import get_registries

    text = _hooks().reference_markdown()
    rows = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    assert _fields(Config) <= rows and _fields(ClassifierConfig) <= rows
    registries = get_registries()
    for kind in registries.kinds:
        for entry in registries.kind(kind).entries():
            assert f"`{entry.name}`" in text, (kind, entry.name)
            if entry.settings is not None:
                assert _fields(entry.settings) <= rows, (kind, entry.name)
    # a field's meaning is the comment beside it in the source, a range the ranged() metadata
    assert re.search(r"^\| `freeze_at` \| `int` \| `0` \| >= -1 \| freeze the first k trunk stages", text, re.M)
    assert re.search(r"^\| `positive_fraction` \| `float` \| `0.25` \| in \[0, 1\] \|", text, re.M)


def test_field_comments_are_read_from_the_source():
    from detkit.config import TrainConfig

    comments = _hooks().field_comments(TrainConfig)  # inherited from TrainerConfig, comment lines above included
    assert comments["checkpoint_period"] == "0: no periodic checkpoints (final.pth only)"
    assert comments["scale_lr"].startswith("Linear scaling rule (Goyal et al. 2017)")
    assert comments["max_iters"] == ""


def test_the_readme_is_a_front_door():
    text = open(README, encoding="utf-8").read()
    assert len(text.splitlines()) <= 200
    first_block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    assert text.index("```sh") < text.index("\n## ")  # the set-up commands come first
    assert re.search(r"^make demo ", first_block, re.M) and re.search(r"^make test ", first_block, re.M)
    assert ('from detkit import Detector\ndetector = Detector.from_checkpoint("work_dirs/demo/final.pth")\n'
            'detections = detector("image.jpg")\nprint(detections.boxes, detections.scores, detections.class_names)\n'
            in text)
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert links
    missing = sorted({link for link in links if not os.path.isfile(os.path.join(ROOT, link))})
    assert not missing, f"README links to pages that do not exist: {missing}"
