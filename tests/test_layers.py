"""detkit's layers (docs/architecture.md, "Layers") as the import-linter contracts of pyproject.toml: a layer
imports only from the layers below it; nothing in detkit imports the benchmarks or the CLI; nothing below the
application layers imports inference; no two modules or subpackages of one package import each other (this
replaces ../shared/tools/import_cycles.py). Imports inside functions count."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The venv's script, next to the interpreter that runs the tests (`make setup` installs it with `.[dev]`).
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``detkit`` package found first from ``cwd`` (it puts ``cwd`` on its path)."""
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: install the dev extra (make setup)"
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    run = lint_imports(ROOT)
    assert run.returncode == 0, f"import-linter contracts broken:\n{run.stdout}{run.stderr}"
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("module, planted, expected", [
    ("models/detector.py", "from detkit.inference import predictor",
     ["detkit.models is not allowed to import detkit.inference", "detkit.models.detector -> detkit.inference"]),
    ("models/svm/head.py", "from detkit.models.svm import stage",
     ["No cycles are allowed in detkit.models.svm", ".head -> .stage"]),
], ids=["upward-import", "cycle"])
def test_the_contracts_catch_a_planted_violation(tmp_path, module, planted, expected):
    shutil.copytree(ROOT / "detkit", tmp_path / "detkit", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "detkit" / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0 and all(text in run.stdout for text in expected), run.stdout
