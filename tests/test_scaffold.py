"""/scaffold: a new repository with the package, its tests and make targets, which works as delivered."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curry_train import __version__
from curry_train.__main__ import main
from curry_train.scaffold import PACKAGE_DIR, scaffold, vendor


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


@pytest.mark.slow
def test_scaffold_creates_a_working_repo(tmp_path):
    dest, report, git_note = scaffold(tmp_path / "my-llm", description="My LLM.")
    for path in ("curry_train/model.py", "curry_train/primitives/grad_accum.py", "curry_train/conf/config.yaml",
                 "curry_train/bench/common.py", "curry_train/primitives/pipeline/sim.py",
                 "curry_train/scaffold/templates/pyproject.toml.j2", "tests/test_grad_accum.py",
                 "tests/primitives/test_grad_accum_standalone.py", "pyproject.toml", "Makefile", "README.md",
                 "CLAUDE.md", "pytest.ini", ".ci/run", "models/my_model.py", "tests/test_my_model.py"):
        assert (dest / path).is_file(), path
    assert not list(dest.rglob("__pycache__"))
    assert_package_data_ships_every_data_file(dest / "pyproject.toml", dest / "curry_train")
    assert not (dest / "tests" / "test_plugin.py").exists() and not (dest / "tests" / "test_add.py").exists()
    assert 'name = "my-llm"' in (dest / "pyproject.toml").read_text()
    assert "My LLM." in (dest / "README.md").read_text()
    assert "/curry-train:" in (dest / "CLAUDE.md").read_text()
    assert "\t$(PY) -m pytest" in (dest / "Makefile").read_text()  # a real tab: make needs it
    assert os.access(dest / ".ci" / "run", os.X_OK)
    manifest = vendor.read_manifest(dest)
    assert manifest["kind"] == "scaffold" and "curry_train/model.py" in manifest["files"]
    assert not [rel for rel in manifest["files"] if rel.startswith("models/") or rel.endswith("test_my_model.py")]
    assert len(report.actions["new"]) == len(manifest["files"]) + 3  # + the user's three files
    if shutil.which("git"):
        log = subprocess.run(["git", "log", "--oneline"], cwd=dest, capture_output=True, text=True).stdout
        assert "Start from curry-train" in log and "initialised" in git_note
        assert not subprocess.run(["git", "status", "--porcelain"], cwd=dest, capture_output=True, text=True).stdout
    # The copied package (not the installed one) trains the user's model; its own tests pass with that copy.
    env = {**os.environ, "PYTHONPATH": str(dest)}
    run = subprocess.run([sys.executable, "-m", "curry_train", "train", "train.steps=2", "train.progress=false",
                          "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.seq_len=32"],
                         cwd=dest, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(dest / "curry_train") in subprocess.run(
        [sys.executable, "-c", "import curry_train; print(curry_train.__file__)"], cwd=dest, env=env,
        capture_output=True, text=True, timeout=60).stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_my_model.py",
                            "tests/primitives/test_grad_accum_standalone.py"],
                           cwd=dest, env=env, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-2000:]


def test_scaffold_update_refreshes_unedited_files_and_never_touches_the_users(tmp_path, capsys):
    repo, _, _ = scaffold(tmp_path / "repo", git=False)
    # an older curry-train wrote loop.py (recorded, unedited); the user edited train.py, README.md and their model
    older = (repo / "curry_train/loop.py").read_text() + "# older\n"
    (repo / "curry_train/loop.py").write_text(older)
    manifest = vendor.read_manifest(repo)
    manifest["files"]["curry_train/loop.py"] = vendor.sha256(older.encode())
    (repo / vendor.MANIFEST).write_text(json.dumps(manifest))
    edits = {rel: (repo / rel).read_text() + "# mine\n" for rel in
             ("curry_train/train.py", "README.md", "models/my_model.py", "tests/test_my_model.py")}
    for rel, text in edits.items():
        (repo / rel).write_text(text)

    assert main(["scaffold", "--update", str(repo)]) == 0
    out = capsys.readouterr().out
    assert (repo / "curry_train/loop.py").read_text() == (PACKAGE_DIR / "loop.py").read_text()
    assert "updated     curry_train/loop.py" in out
    for rel, text in edits.items():
        assert (repo / rel).read_text() == text, rel
    assert "kept        curry_train/train.py" in out and "kept        README.md" in out
    assert "-# mine" in out  # the diff of what the update would change
    assert "models/my_model.py" not in out and "test_my_model" not in out  # the user's corner is not ours
    assert vendor.read_manifest(repo)["updated_from"] == __version__

    assert main(["scaffold", "--update", str(repo), "--force"]) == 0
    assert "overwritten curry_train/train.py" in capsys.readouterr().out
    assert (repo / "curry_train/train.py.orig").read_text() == edits["curry_train/train.py"]
    assert (repo / "models/my_model.py").read_text() == edits["models/my_model.py"]


@pytest.mark.slow
def test_a_scaffolded_repo_scaffolds_another_but_cannot_update_itself(tmp_path):
    first, _, _ = scaffold(tmp_path / "first", git=False)
    env = {**os.environ, "PYTHONPATH": str(first)}
    second = subprocess.run([sys.executable, "-m", "curry_train", "scaffold", str(tmp_path / "second"), "--no-git"],
                            cwd=first, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    ours = lambda repo: {rel for rel in vendor.read_manifest(repo)["files"]}
    assert ours(tmp_path / "second") == ours(first)
    assert (tmp_path / "second" / "models" / "my_model.py").is_file()
    itself = subprocess.run([sys.executable, "-m", "curry_train", "scaffold", "--update", "."],
                            cwd=first, env=env, capture_output=True, text=True, timeout=120)
    assert itself.returncode == 2 and "holds the curry_train that is running" in itself.stderr


def test_scaffold_refuses_a_non_empty_folder_and_bad_names(tmp_path, capsys):
    (tmp_path / "README.md").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["scaffold", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "README.md" in err  # it names what it would replace
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(["scaffold", str(tmp_path), "--force", "--no-git"]) == 0
    assert "overwritten README.md" in capsys.readouterr().out
    assert (tmp_path / "README.md.orig").read_text() == "mine"
    assert main(["scaffold", str(tmp_path), "--force"]) == 2  # now it has a manifest: that is --update's job
    assert "--update" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--name"):
        scaffold(tmp_path / "new", name="bad name!")
    assert main(["scaffold", "--update", str(tmp_path / "nowhere")]) == 2
    assert main(["scaffold", "--update", str(tmp_path / "new")]) == 2


@pytest.mark.parametrize("description", ['a "quoted" word', "C:\\new\\table", "two\nlines and a \x7f and a \t tab"])
def test_the_pyproject_toml_escapes_the_description_and_parses_back(description):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from curry_train.scaffold import _context, _render

    text = _render({"pyproject.toml.j2": "pyproject.toml"}, _context("my-llm", description))["pyproject.toml"]
    project = tomllib.loads(text.decode())["project"]
    assert project["description"] == description and project["name"] == "my-llm"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_scaffolded_repos_own_make_test_passes(tmp_path):
    """What a user runs first in a new repository: its `make test`, which builds `.venv` from nothing (torch, the
    package and its dev extras) and runs the copied fast suite. Nothing of this checkout's environment leaks in."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed on this machine: the scaffolded `make test` was NOT run")
    dest, _, _ = scaffold(tmp_path / "my-llm", git=False)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS")}
    base_python = getattr(sys, "_base_executable", sys.executable)
    proc = subprocess.run([make, "-C", str(dest), "test", f"PYTHON={base_python}"], env=env, capture_output=True,
                          text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = [line for line in out.splitlines() if re.search(r"\d+ passed", line)]
    assert summary and " failed" not in summary[-1] and " error" not in summary[-1], out[-3000:]
    assert (dest / ".venv" / "bin" / "python").exists()
