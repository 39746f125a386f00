"""``python -m curry_train scaffold DEST``: start a new training repository that already has the code and its tests.

DEST receives a copy of the ``curry_train`` package and of the curry-train tests that exercise it (plugin and
skill-page tests stay behind: they test the plugin, not the package), plus files rendered from the jinja2
templates in ``scaffold/templates/``: ``pyproject.toml``, ``Makefile`` (``make test`` / ``make bench``), ``README.md``,
``pytest.ini``, ``.gitignore`` and ``.ci/run``. The new repository's ``make test`` passes as delivered.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jinja2

from .. import __version__

PACKAGE_DIR = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
PLUGIN_ONLY_TESTS = {"test_plugin.py", "test_skills.py", "test_scaffold.py"}
RENDERED = {
    "pyproject.toml.j2": "pyproject.toml",
    "Makefile.j2": "Makefile",
    "README.md.j2": "README.md",
    "pytest.ini.j2": "pytest.ini",
    "gitignore.j2": ".gitignore",
    "ci_run.j2": ".ci/run",
}
DEPENDENCIES = ["torch>=2.6", "numpy", "hydra-core>=1.3", "jinja2", "pyyaml", "tqdm", "matplotlib"]
DEV_DEPENDENCIES = ["pytest>=8", "pytest-timeout", "transformers>=4.50"]


def find_tests_dir() -> Path:
    """The curry-train repository's ``tests/`` next to ``template/`` (present in a clone or the installed plugin)."""
    candidate = PACKAGE_DIR.parents[1] / "tests"
    if not (candidate / "test_grad_accum.py").is_file():
        raise FileNotFoundError(
            f"cannot find the curry-train tests at {candidate}; run scaffold from a curry-train clone or the installed plugin"
        )
    return candidate


def scaffold(dest: str | Path, name: str | None = None, description: str | None = None, force: bool = False) -> Path:
    """Create the repository at ``dest``; returns its path. ``name`` defaults to the folder name."""
    dest = Path(dest).expanduser().resolve()
    name = name or dest.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (a valid Python project name)")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is a file; scaffold needs a new or empty folder")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise FileExistsError(f"{dest} exists and is not empty; choose a new folder or pass --force")
    tests_dir = find_tests_dir()
    dest.mkdir(parents=True, exist_ok=True)

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(PACKAGE_DIR, dest / "curry_train", ignore=ignore, dirs_exist_ok=True)
    (dest / "tests").mkdir(exist_ok=True)
    for test in sorted(tests_dir.glob("*.py")):
        if test.name not in PLUGIN_ONLY_TESTS:
            shutil.copy2(test, dest / "tests" / test.name)

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    context = {
        "name": name,
        "description": description or f"{name}: LLM training on torch.distributed, started from curry-train.",
        "version": __version__,
        "torch_version": "2.13.0",
        "dependencies": DEPENDENCIES,
        "dev_dependencies": DEV_DEPENDENCIES,
    }
    for template, target in RENDERED.items():
        out = dest / target
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(env.get_template(template).render(**context))
    (dest / ".ci" / "run").chmod(0o755)
    return dest
