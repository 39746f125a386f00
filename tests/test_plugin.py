"""Plugin manifests, marketplace entry, command frontmatter, and the official validator (when node is here)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The Claude Code release these tests run, so that an upstream release cannot turn CI red overnight. `make check-latest`
# runs the same tests against `@latest` (CURRY_TRAIN_CLAUDE_CODE=latest) and says what changed. 2.1.337 declares
# node >= 22; on node 20 npm prints `EBADENGINE` and the CLI (a native binary that npm only unpacks) runs all the same.
CLAUDE_CODE_VERSION = "2.1.337"
CLAUDE_CODE = f"@anthropic-ai/claude-code@{os.environ.get('CURRY_TRAIN_CLAUDE_CODE') or CLAUDE_CODE_VERSION}"


def load(path):
    return json.loads((ROOT / path).read_text())


def test_root_plugin_json_is_identical_to_the_manifest():
    assert load("plugin.json") == load(".claude-plugin/plugin.json")


def test_manifest_fields():
    m = load(".claude-plugin/plugin.json")
    assert m["name"] == "curry-train"
    for key in ("version", "description", "repository", "license", "keywords"):
        assert m[key], key
    assert m["author"]["name"]


def test_marketplace_lists_the_plugin_at_the_repo_root():
    market = load(".claude-plugin/marketplace.json")
    assert market["name"] == "curry-train" and market["owner"]["name"]
    (entry,) = [p for p in market["plugins"] if p["name"] == "curry-train"]
    assert entry["source"] == "./"


@pytest.mark.parametrize("path", sorted((ROOT / "commands").glob("*.md")), ids=lambda p: p.stem)
def test_command_frontmatter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    fm = yaml.safe_load(text.split("---\n", 2)[1])
    assert isinstance(fm.get("description"), str) and fm["description"]


@pytest.mark.slow
def test_claude_plugin_validate_strict(tmp_path):
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("node/npx is not installed on this machine: `claude plugin validate` was NOT run")
    env = {**os.environ, "HOME": str(tmp_path), "npm_config_cache": str(Path.home() / ".npm"), "NO_COLOR": "1"}
    proc = subprocess.run(
        [npx, "-y", CLAUDE_CODE, "plugin", "validate", str(ROOT), "--strict"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Validation passed" in proc.stdout


# ---- versions ---------------------------------------------------------------------------------------------------


def toml(path: Path) -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib: pyproject checks NOT run")
    return tomllib.loads(path.read_text())


def package_version() -> str:
    """``curry_train.__version__`` of this checkout's package (read from the file: the venv may import another)."""
    tree = ast.parse((ROOT / "template" / "curry_train" / "__init__.py").read_text())
    (value,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["__version__"]]
    return value


def test_plugin_version_equals_the_package_version():
    pyproject = toml(ROOT / "template" / "pyproject.toml")
    assert load(".claude-plugin/plugin.json")["version"] == package_version() == pyproject["project"]["version"]


# ---- commands: allowed-tools match exactly what the body runs ----------------------------------------------------

COMMANDS = sorted((ROOT / "commands").glob("*.md"))
RUNNER = '"${CLAUDE_PLUGIN_ROOT}/scripts/curry-train"'
SAMPLE_ARGUMENTS = "recompute --dest ../my-repo"  # what the user typed; Claude Code substitutes it before the run


def command_parts(path: Path) -> tuple[dict, str]:
    _, fm, body = path.read_text().split("---\n", 2)
    return yaml.safe_load(fm), body


def bash_patterns(fm: dict) -> list[str]:
    """The inside of every ``Bash(...)`` entry of ``allowed-tools`` (a YAML list, or a comma-separated string)."""
    tools = fm.get("allowed-tools", [])
    if isinstance(tools, str):
        tools = [t.strip() for t in re.split(r",\s*(?=[A-Z])", tools)]
    patterns = []
    for tool in tools:
        m = re.fullmatch(r"Bash\((.+)\)", tool.strip())
        if m:
            patterns.append(m.group(1))
        else:
            assert re.fullmatch(r"[A-Z][A-Za-z]*", tool.strip()), f"unexpected allowed-tools entry {tool!r}"
    return patterns


def bash_lines(body: str) -> list[str]:
    """Every command line of the body's fenced ```bash blocks (blank lines and comments skipped)."""
    blocks = re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", body, flags=re.S | re.M)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def pattern_matches(pattern: str, line: str) -> bool:
    """Claude Code's Bash rules: ``X:*`` allows X alone or X followed by arguments; anything else is exact."""
    line = line.replace("$ARGUMENTS", SAMPLE_ARGUMENTS)
    if pattern.endswith(":*"):
        prefix = pattern[:-2]
        return line == prefix or line.startswith(prefix + " ")
    return line == pattern


def test_pattern_matcher_itself():
    assert pattern_matches("make -C:*", "make -C my-llm test")
    assert pattern_matches(f"{RUNNER} add:*", f"{RUNNER} add $ARGUMENTS")
    assert not pattern_matches(f"{RUNNER} add:*", f"{RUNNER} addx")
    assert not pattern_matches("${CLAUDE_PLUGIN_ROOT}/scripts/curry-train add:*", f"{RUNNER} add x")  # quotes count
    assert pattern_matches("make setup", "make setup") and not pattern_matches("make setup", "make setup -j2")


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.stem)
def test_command_allowed_tools_match_the_commands_it_runs(path):
    fm, body = command_parts(path)
    patterns, lines = bash_patterns(fm), bash_lines(body)
    assert patterns, f"{path.name}: no Bash(...) in allowed-tools"
    assert lines, f"{path.name}: no command in a ```bash block"
    for line in lines:
        assert any(pattern_matches(p, line) for p in patterns), f"{path.name}: {line!r} matches no allowed-tools entry {patterns}"
    for pattern in patterns:
        assert any(pattern_matches(pattern, line) for line in lines), f"{path.name}: Bash({pattern}) is used by no command"
    for line in lines:  # the plugin's code runs through the runner only (never from, or installed into, the plugin folder)
        assert "PYTHONPATH" not in line and "pip install" not in line and "-m curry_train" not in line, line
        if "${CLAUDE_PLUGIN_ROOT}" in line:
            assert line.startswith(RUNNER + " "), line
    assert "argument-hint" not in fm or isinstance(fm["argument-hint"], str), "quote argument-hint (YAML reads [a] as a list)"


def test_commands_cover_the_runner_subcommands():
    used = {line.split()[1] for path in COMMANDS for line in bash_lines(command_parts(path)[1]) if line.startswith(RUNNER)}
    assert {"add", "scaffold", "bench"} <= used, used
    add_lines = bash_lines(command_parts(ROOT / "commands" / "add-primitive.md")[1])
    assert f"{RUNNER} add $ARGUMENTS" in add_lines and f"{RUNNER} add --list" in add_lines
    assert any("scaffold --update" in line for line in bash_lines(command_parts(ROOT / "commands" / "scaffold.md")[1]))


# ---- the runner: scripts/curry-train -------------------------------------------------------------------------------

RUNNER_PATH = ROOT / "scripts" / "curry-train"


def run_runner(args, cwd, runner=RUNNER_PATH, timeout=300, **env):
    """Run the runner; ``KEY=None`` removes KEY from the environment. PYTHONDONTWRITEBYTECODE is removed unless
    given: the runner must set it itself for the plugin's package (some machines export it, hiding a regression)."""
    full_env = {**os.environ, "CURRY_TRAIN_PYTHON": sys.executable, **env}
    if "PYTHONDONTWRITEBYTECODE" not in env:
        full_env.pop("PYTHONDONTWRITEBYTECODE", None)
    for key, value in env.items():
        if value is None:
            full_env.pop(key)
    return subprocess.run([str(runner), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def which(args, cwd, **kw) -> dict[str, str]:
    proc = run_runner(["--which", *args], cwd, **kw)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines())


def test_runner_is_an_executable_bash_script():
    assert os.access(RUNNER_PATH, os.X_OK)
    text = RUNNER_PATH.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(RUNNER_PATH)], check=True, timeout=30)
    proc = run_runner(["--help"], ROOT)
    assert proc.returncode == 0 and "add NAME" in proc.stdout and "scaffold --update" in proc.stdout


def test_runner_which_from_an_empty_folder(tmp_path):
    tmp_path = tmp_path.resolve()
    w = which([], tmp_path)
    assert w["python"] == sys.executable
    assert w["curry_train (add, scaffold)"] == str(ROOT / "template" / "curry_train")
    assert w["curry_train (bench, train, config)"] == str(ROOT / "template" / "curry_train")
    assert w["plugin"] == str(ROOT)


@pytest.mark.slow
def test_runner_uses_the_projects_own_copy_for_bench_train_config_only(tmp_path):
    tmp_path = tmp_path.resolve()
    pkg = tmp_path / "curry_train"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint('PROJECT COPY', sys.argv[1:])\nsys.exit(7)\n")
    w = which(["bench", "train", "config", "add", "scaffold"], tmp_path)
    for sub in ("bench", "train", "config"):
        assert w[f"curry_train ({sub})"] == str(pkg), sub
    for sub in ("add", "scaffold"):
        assert w[f"curry_train ({sub})"] == str(ROOT / "template" / "curry_train"), sub
    # What actually runs: the project's copy for bench (its exit code passes through) ...
    proc = run_runner(["bench", "--quick", "loop"], tmp_path)
    assert proc.returncode == 7 and "PROJECT COPY ['bench', '--quick', 'loop']" in proc.stdout
    # ... and the plugin's package for add, even though the cwd (first on sys.path for -m) holds a curry_train/.
    proc = run_runner(["add", "--list"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "PROJECT COPY" not in proc.stdout and "recompute" in proc.stdout and "pipeline_schedule" in proc.stdout
    # A curry_train/ as `add` leaves it (primitives only, no CLI) is not a whole package: bench runs the plugin's.
    (pkg / "__main__.py").unlink()
    w = which(["bench", "config"], tmp_path)
    assert w["curry_train (bench)"] == w["curry_train (config)"] == str(ROOT / "template" / "curry_train")


@pytest.mark.slow
def test_runner_passes_exit_codes_and_error_lines_through(tmp_path):
    proc = run_runner(["config", "train.no_such_key=1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    proc = run_runner(["add", "no_such_primitive", "--dest", str(tmp_path)], tmp_path)
    assert proc.returncode != 0 and "no_such_primitive" in proc.stderr


def python_wrapper(path: Path) -> Path:
    """An executable ``path`` that runs this interpreter (a symlink would lose the venv's site-packages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    path.chmod(0o755)
    return path


@pytest.mark.slow
def test_runner_python_order(tmp_path):
    tmp_path = tmp_path.resolve()
    project = python_wrapper(tmp_path / ".venv" / "bin" / "python")
    assert which([], tmp_path, CURRY_TRAIN_PYTHON=None, VIRTUAL_ENV=None)["python"] == str(project)  # before python3
    active = python_wrapper(tmp_path / "active" / "bin" / "python")
    assert which([], tmp_path, CURRY_TRAIN_PYTHON=None, VIRTUAL_ENV=str(tmp_path / "active"))["python"] == str(active)
    broken = tmp_path / "broken" / "bin" / "python"  # an active env without torch is passed over
    broken.parent.mkdir(parents=True)
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    assert which([], tmp_path, CURRY_TRAIN_PYTHON=None, VIRTUAL_ENV=str(tmp_path / "broken"))["python"] == str(project)
    assert which([], tmp_path, CURRY_TRAIN_PYTHON=str(active), VIRTUAL_ENV=None)["python"] == str(active)  # first


def test_runner_refuses_a_broken_curry_train_python(tmp_path):
    proc = run_runner(["--which"], tmp_path, CURRY_TRAIN_PYTHON="/nonexistent/python")
    assert proc.returncode != 0 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "CURRY_TRAIN_PYTHON=/nonexistent/python" in line and "torch" in line
    proc = run_runner(["add", "--list"], tmp_path, CURRY_TRAIN_PYTHON="/nonexistent/python")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1


def test_runner_installs_the_pyprojects_dependencies():
    deps = toml(ROOT / "template" / "pyproject.toml")["project"]["dependencies"]
    proc = run_runner(["--deps"], ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["torch==2.13.0", *deps]


def fake_plugin(root: Path, dependencies: str = '"torch>=2.6", "numpy"') -> Path:
    """A plugin folder holding a copy of the runner and a minimal template/ (a curry_train that says where it is)."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(RUNNER_PATH, root / "scripts" / "curry-train")
    pkg = root / "template" / "curry_train"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\ndef main():\n    print('FAKE', sys.argv[1:])\n    return 3\n")
    (root / "template" / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools"]\n\n[project]\nname = "x"\ndependencies = [{dependencies}]\n\n'
        '[project.optional-dependencies]\ndev = ["pytest"]\n')
    return root / "scripts" / "curry-train"


def test_runner_reads_awkward_dependency_arrays(tmp_path):
    deps = '\n  "pkg[extra,other]>=1",  # a comment, with "quotes" and ]\n  \'single\',\n  "last; python_version>\'3\'",\n'
    runner = fake_plugin(tmp_path / "plugin", deps)
    proc = run_runner(["--deps"], tmp_path, runner=runner)
    assert proc.returncode == 0, proc.stderr
    expected = toml(tmp_path / "plugin" / "template" / "pyproject.toml")["project"]["dependencies"]
    assert proc.stdout.splitlines() == ["torch==2.13.0", *expected] and len(expected) == 3


@pytest.mark.slow
def test_runner_data_folder_and_symlinks(tmp_path):
    tmp_path = tmp_path.resolve()
    home = tmp_path / "home"
    root = home / ".claude" / "plugins" / "cache" / "some-market" / "curry-train" / "0.2.0"
    runner = fake_plugin(root)
    link = tmp_path / "link-to-runner"
    link.symlink_to(runner)
    w = which([], tmp_path, runner=link, CLAUDE_PLUGIN_DATA=None)  # found through the symlink
    assert w["plugin"] == str(root) and w["curry_train (add, scaffold)"] == str(root / "template" / "curry_train")
    assert w["data"] == str(home / ".claude" / "plugins" / "data" / "curry-train-some-market")
    assert which([], tmp_path, runner=link, CLAUDE_PLUGIN_DATA=str(tmp_path / "d"))["data"] == str(tmp_path / "d")
    other = fake_plugin(tmp_path / "checkout")  # not an installed copy: the user's cache folder
    w = which([], tmp_path, runner=other, CLAUDE_PLUGIN_DATA=None, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert w["data"] == str(tmp_path / "xdg" / "curry-train")
    proc = run_runner(["--which"], tmp_path, runner=other, CLAUDE_PLUGIN_DATA=str(tmp_path / "checkout" / "data"))
    assert proc.returncode != 0 and "inside the plugin folder" in proc.stderr
    proc = run_runner(["scaffold", "x"], tmp_path, runner=link)
    assert proc.returncode == 3 and "FAKE ['scaffold', 'x']" in proc.stdout
    assert not list(root.rglob("__pycache__"))  # PYTHONDONTWRITEBYTECODE for the plugin's package


# ---- the real thing: install with the Claude Code CLI, then run the installed runner -----------------------------


def plugin_files() -> list[str]:
    """What the repository ships: tracked files plus new ones not ignored (no .venv, caches, bench results)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.slow
def test_cli_install_then_scaffold_and_add(tmp_path):
    tmp_path = tmp_path.resolve()
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("node/npx is not installed on this machine: `claude plugin install` was NOT run")
    market = tmp_path / "market"
    for rel in plugin_files():  # `plugin install` from a folder copies the whole folder, .venv included
        (market / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, market / rel)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "npm_config_cache": str(Path.home() / ".npm"), "NO_COLOR": "1"}
    proc = subprocess.run(
        [npx, "-y", CLAUDE_CODE, "plugin", "install", "curry-train", "--marketplace", str(market)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    version = load(".claude-plugin/plugin.json")["version"]
    installed = home / ".claude" / "plugins" / "cache" / "curry-train" / "curry-train" / version
    assert (installed / ".claude-plugin" / "plugin.json").is_file(), sorted(tree(home / ".claude" / "plugins"))[:50]
    assert not (installed / ".venv").exists()
    runner = installed / "scripts" / "curry-train"
    assert os.access(runner, os.X_OK), "the install lost the runner's executable bit"
    before = tree(installed)

    data = tmp_path / "data"
    w = which([], tmp_path, runner=runner, CLAUDE_PLUGIN_DATA=str(data))
    assert w["python"] == sys.executable and w["curry_train (add, scaffold)"] == str(installed / "template" / "curry_train")
    assert which([], tmp_path, runner=runner, CLAUDE_PLUGIN_DATA=None)["data"] == str(
        home / ".claude" / "plugins" / "data" / "curry-train-curry-train")

    proc = run_runner(["scaffold", str(tmp_path / "repo"), "--no-git"], tmp_path, runner=runner, CLAUDE_PLUGIN_DATA=str(data))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rel in ("curry_train/MANIFEST.json", "Makefile", "models/my_model.py", "curry_train/primitives/recompute.py"):
        assert (tmp_path / "repo" / rel).is_file(), rel
    manifest = json.loads((tmp_path / "repo" / "curry_train" / "MANIFEST.json").read_text())
    assert manifest["version"] == version and "curry_train/primitives/recompute.py" in manifest["files"]

    (tmp_path / "other").mkdir()
    proc = run_runner(["add", "recompute", "--dest", str(tmp_path / "other")], tmp_path, runner=runner,
                      CLAUDE_PLUGIN_DATA=str(data))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rel in ("curry_train/primitives/recompute.py", "tests/curry_train/test_recompute_standalone.py",
                "curry_train/MANIFEST.json"):
        assert (tmp_path / "other" / rel).is_file(), rel
    assert not (tmp_path / "other" / "curry_train" / "model.py").exists()  # the primitive and its imports only

    assert tree(installed) == before, sorted(tree(installed) ^ before)  # nothing written inside the plugin
    assert not list(installed.rglob("__pycache__"))


def test_add_primitive_command_names_every_primitive_of_the_catalog():
    """The names /add-primitive lists (its argument hint and its text) are the catalog's, no more, no less."""
    from curry_train.scaffold.catalog import PRIMITIVES

    text = (ROOT / "commands" / "add-primitive.md").read_text()
    hint = re.search(r'argument-hint: ".*names: ([^"]*)"', text).group(1).split()
    assert sorted(hint) == sorted([*PRIMITIVES, "all"])
    assert all(f"`{name}`" in text for name in PRIMITIVES)
    pages = text.split("4. Point to the primitive's skill page", 1)[1]
    assert all(f"`{name}` {p.skill}" in " ".join(pages.split()) for name, p in PRIMITIVES.items())
