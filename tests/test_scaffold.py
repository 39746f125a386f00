"""/scaffold: a new repository with the package, its tests and make targets, which works as delivered."""

import os
import subprocess
import sys

import pytest

from curry_train.__main__ import main
from curry_train.scaffold import scaffold


def test_scaffold_creates_a_working_repo(tmp_path):
    dest = scaffold(tmp_path / "my-llm", description="My LLM.")
    for path in ("curry_train/model.py", "curry_train/primitives/grad_accum.py", "curry_train/conf/config.yaml",
                 "tests/test_grad_accum.py", "pyproject.toml", "Makefile", "README.md", "pytest.ini", ".ci/run"):
        assert (dest / path).is_file(), path
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
