"""The console scripts of pyproject.toml's [project.scripts]: each names a callable that imports, and
the Hydra apps find their configs when started as installed scripts (not as ``python -m``)."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_every_app_has_a_console_script():
    assert set(SCRIPTS) == {"wise-bench", "wise-bench-report", "wise-bench-calibrate", "wise-bench-download", "wise-bench-evaluate"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_names_a_callable(name):
    module_name, _, attr = SCRIPTS[name].partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    assert callable(target)


@pytest.mark.parametrize("name", ["wise-bench", "wise-bench-calibrate"])
def test_installed_hydra_app_lists_the_config_groups(name, tmp_path):
    # The scripts pip installed next to the interpreter running the tests (the venv's bin/).
    script = Path(sys.executable).parent / name
    if not script.is_file():
        pytest.skip(f"{name} is not installed (pip install -e .)")
    # From a directory outside the repository: the configs must not be looked up from the cwd.
    res = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    groups = dict(line.split(": ", 1) for line in res.stdout.splitlines()
                  if line.split(": ", 1)[0] in {"method", "model", "dataset", "edit_mode"})
    assert set(groups) == {"method", "model", "dataset", "edit_mode"}
    assert {"wise", "ft_m", "grace"} <= set(groups["method"].split(", "))
    assert "small" in groups["model"].split(", ")
