"""/scaffold: a new repository with the package, its tests and make targets, which works as delivered."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from curry_train.__main__ import main
from curry_train.scaffold import PACKAGE_DIR, scaffold


def assert_package_data_ships_every_data_file(pyproject: Path, package: Path) -> None:
    """Every non-Python file the package reads (configs, scaffold templates) matches a package-data pattern."""
    table = re.search(r"^\[tool\.setuptools\.package-data\]\ncurry_train = \[([^\]]*)\]", pyproject.read_text(), re.M)
    patterns = re.findall(r'"([^"]+)"', table.group(1))  # (no tomllib: Python 3.10 is supported)
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    data_files = {path for path in package.rglob("*") if path.suffix in (".yaml", ".j2")}
    assert any(p.suffix == ".j2" for p in data_files) and any(p.suffix == ".yaml" for p in data_files)
    assert data_files <= shipped, sorted(str(p.relative_to(package)) for p in data_files - shipped)


def test_plugin_pyproject_ships_the_configs_and_templates():
    assert_package_data_ships_every_data_file(PACKAGE_DIR.parent / "pyproject.toml", PACKAGE_DIR)


def test_scaffold_creates_a_working_repo(tmp_path):
    dest = scaffold(tmp_path / "my-llm", description="My LLM.")
    for path in ("curry_train/model.py", "curry_train/primitives/grad_accum.py", "curry_train/conf/config.yaml",
                 "curry_train/bench/common.py", "curry_train/primitives/pipeline/sim.py",
                 "curry_train/scaffold/templates/pyproject.toml.j2", "tests/test_grad_accum.py", "pyproject.toml",
                 "Makefile", "README.md", "pytest.ini", ".ci/run"):
        assert (dest / path).is_file(), path
    assert not list(dest.rglob("__pycache__"))
    assert_package_data_ships_every_data_file(dest / "pyproject.toml", dest / "curry_train")
    assert not (dest / "tests" / "test_plugin.py").exists()
    assert 'name = "my-llm"' in (dest / "pyproject.toml").read_text()
    assert "My LLM." in (dest / "README.md").read_text()
    assert "\t$(PY) -m pytest" in (dest / "Makefile").read_text()  # a real tab: make needs it
    assert os.access(dest / ".ci" / "run", os.X_OK)
    # The copied package (not the installed one) trains, and its copied GA tests pass.
    env = {**os.environ, "PYTHONPATH": str(dest)}
    run = subprocess.run([sys.executable, "-m", "curry_train", "train", "train.steps=2", "train.progress=false",
                          "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.seq_len=32"],
                         cwd=dest, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(dest / "curry_train") in subprocess.run(
        [sys.executable, "-c", "import curry_train; print(curry_train.__file__)"], cwd=dest, env=env,
        capture_output=True, text=True, timeout=60).stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_grad_accum.py"],
                           cwd=dest, env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-2000:]


def test_scaffold_refuses_a_non_empty_folder_and_bad_names(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["scaffold", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--name"):
        scaffold(tmp_path / "new", name="bad name!")
