"""``python -m curry_train scaffold DEST`` starts a training repository; ``scaffold --update [DEST]`` refreshes one.

A new repository gets a copy of the ``curry_train`` package, the curry-train tests that exercise it (the plugin and
skill-page tests stay behind: they test the plugin), files rendered from the jinja2 templates in
``scaffold/templates/`` (``pyproject.toml``, ``Makefile``, ``README.md``, ``CLAUDE.md``, ``pytest.ini``,
``.gitignore``, ``.ci/run``) and, written once and never again, the user's own corner: ``models/my_model.py`` (a
small decoder built with ``model._target_=models.my_model.build``) and ``tests/test_my_model.py``. Everything but the
user's corner is recorded in ``curry_train/MANIFEST.json``; ``--update`` rewrites it with ``vendor``'s rules (unedited
files refreshed, edited ones reported with a diff, ``--force`` keeps ``.orig`` copies). ``git init`` and a first
commit follow when git is on the PATH. The new repository's ``make test`` passes as delivered.

The tests travel with the package: from the plugin (``tests/`` beside ``template/``), or, when this copy of the
package is itself a scaffolded one, the tests its own manifest lists, so a scaffolded repository can scaffold another.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import jinja2

from .. import __version__
from . import vendor
from .add import find_tests_dir
from .catalog import PACKAGE, PACKAGE_DIR

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
PLUGIN_ONLY_TESTS = {"test_plugin.py", "test_skills.py", "test_skill_routing.py", "test_scaffold.py", "test_add.py"}
RENDERED = {  # template -> path in the repository; recorded in the manifest, refreshed by --update
    "pyproject.toml.j2": "pyproject.toml",
    "Makefile.j2": "Makefile",
    "README.md.j2": "README.md",
    "CLAUDE.md.j2": "CLAUDE.md",
    "pytest.ini.j2": "pytest.ini",
    "gitignore.j2": ".gitignore",
    "ci_run.j2": ".ci/run",
}
USER_OWNED = {  # written by the first scaffold only; never recorded, never updated
    "models_init.py.j2": "models/__init__.py",
    "my_model.py.j2": "models/my_model.py",
    "test_my_model.py.j2": "tests/test_my_model.py",
}
EXECUTABLE = {".ci/run"}
DEPENDENCIES = ["torch>=2.6", "numpy", "hydra-core>=1.3", "jinja2", "pyyaml", "tqdm", "matplotlib", "tokenizers",
                "safetensors", "pyarrow", "tensorboard"]
DEV_DEPENDENCIES = ["pytest>=8", "pytest-timeout", "transformers>=4.50"]


def _shipped(path: Path) -> bool:
    return path.is_file() and path.suffix != ".pyc" and not any(
        part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def _package_files() -> dict[str, bytes]:
    files = {f"{PACKAGE}/{p.relative_to(PACKAGE_DIR).as_posix()}": p.read_bytes()
             for p in sorted(PACKAGE_DIR.rglob("*")) if _shipped(p)}
    files.pop(vendor.MANIFEST, None)  # a scaffolded copy's own manifest describes that repository, not the new one
    return files


def _test_files() -> dict[str, bytes]:
    """``tests/...`` -> content: the plugin's tests minus the plugin-only ones, or this scaffolded copy's own."""
    tests_dir = find_tests_dir()
    own = vendor.read_manifest(PACKAGE_DIR.parent) if tests_dir == PACKAGE_DIR.parent / "tests" else None
    if own is not None:
        return {rel: (PACKAGE_DIR.parent / rel).read_bytes() for rel in own["files"]
                if rel.startswith("tests/") and (PACKAGE_DIR.parent / rel).is_file()}
    return {f"tests/{p.relative_to(tests_dir).as_posix()}": p.read_bytes() for p in sorted(tests_dir.rglob("*.py"))
            if p.name not in PLUGIN_ONLY_TESTS and _shipped(p)}


def toml_string(value: str) -> str:
    """``value`` as a quoted TOML basic string (quotes, backslashes and control characters escaped)."""
    import json

    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _render(templates: dict[str, str], context: dict) -> dict[str, bytes]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.filters["toml"] = toml_string
    return {target: env.get_template(t).render(**context).encode() for t, target in templates.items()}


def _context(name: str, description: str) -> dict:
    return {"name": name, "description": description, "version": __version__, "torch_version": "2.13.0",
            "dependencies": DEPENDENCIES, "dev_dependencies": DEV_DEPENDENCIES}


def vendored_files(name: str, description: str) -> dict[str, bytes]:
    """Everything ``scaffold`` records in the manifest: package, tests, rendered files."""
    return {**_package_files(), **_test_files(), **_render(RENDERED, _context(name, description))}


def _check_not_self(repo: Path) -> None:
    if (repo / PACKAGE).resolve() == PACKAGE_DIR:
        raise ValueError(f"{repo} holds the curry_train that is running: updating it from itself changes nothing. "
                         "Run a newer curry-train's scaffold --update (the plugin's scripts/curry-train) on it")


def scaffold(dest: str | Path, name: str | None = None, description: str | None = None, force: bool = False,
             git: bool = True) -> tuple[Path, vendor.SyncReport, str]:
    """Create the repository at ``dest`` (a new or empty folder; ``force``: a non-empty one, where every file it
    would replace is listed and kept as ``<file>.orig``). Returns its path, what happened to each file and what
    was done about git."""
    repo = Path(dest).expanduser().resolve()
    name = name or repo.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (a valid Python project name)")
    if repo.exists() and not repo.is_dir():
        raise FileExistsError(f"{repo} is a file; scaffold needs a new or empty folder")
    if vendor.read_manifest(repo) is not None:
        raise FileExistsError(f"{repo} already has {vendor.MANIFEST}: refresh it with `scaffold --update {dest}`")
    _check_not_self(repo)
    description = description or f"{name}: LLM training on torch.distributed, started from curry-train."
    files = vendored_files(name, description)
    user = {rel: data for rel, data in _render(USER_OWNED, _context(name, description)).items()
            if not (repo / rel).exists()}
    report = vendor.plan(repo, {**files, **user}, {}, force, __version__)
    if repo.exists() and any(repo.iterdir()) and not force:
        clashes = report.actions["kept"]
        raise FileExistsError(f"{repo} exists and is not empty" + (
            f"; scaffold would replace {len(clashes)} file(s) there ({', '.join(clashes[:5])}"
            f"{', ...' if len(clashes) > 5 else ''})" if clashes else "") +
            ". Choose a new folder, or pass --force (each replaced file is kept as <file>.orig)")
    manifest = {"tool": "curry-train", "kind": "scaffold", "version": __version__, "name": name,
                "description": description}
    vendor.apply(repo, {**files, **user}, report, manifest, {}, executable=EXECUTABLE, unrecorded=set(user))
    return repo, report, git_init(repo) if git else "no git: --no-git"


def update(dest: str | Path = ".", force: bool = False) -> tuple[Path, vendor.SyncReport]:
    """Refresh a scaffolded repository's vendored files from this curry_train (``vendor``'s rules)."""
    repo = Path(dest).expanduser().resolve()
    if not repo.is_dir():
        raise NotADirectoryError(f"scaffold --update {dest}: not a folder")
    manifest = vendor.read_manifest(repo)
    if manifest is None:
        raise FileNotFoundError(f"{repo} has no {vendor.MANIFEST}: it was not made by curry-train scaffold "
                                "(to copy single primitives into it use `add NAME`)")
    if manifest.get("kind") != "scaffold":
        raise ValueError(f"{repo} was set up by `curry-train add`, not scaffold: run `add` again to update it")
    _check_not_self(repo)
    files = vendored_files(manifest["name"], manifest["description"])
    old = dict(manifest["files"])
    report = vendor.plan(repo, files, old, force, __version__)
    vendor.apply(repo, files, report, {**manifest, "version": __version__, "updated_from": manifest["version"]},
                 old, executable=EXECUTABLE)
    return repo, report


def git_init(repo: Path) -> str:
    """``git init`` + a first commit when git is on the PATH and ``repo`` is not inside a repository already."""
    git = shutil.which("git")
    if git is None:
        return "git not found: no repository initialised"
    inside = subprocess.run([git, "rev-parse", "--is-inside-work-tree"], cwd=repo, capture_output=True, text=True)
    if inside.returncode == 0:
        return "already inside a git repository: nothing committed"
    identity = subprocess.run([git, "config", "user.email"], cwd=repo, capture_output=True, text=True).stdout.strip()
    author = [] if identity else ["-c", "user.name=curry-train", "-c", "user.email=curry-train@localhost"]
    for step in (["init", "-q"], ["add", "-A"], [*author, "commit", "-q", "-m", f"Start from curry-train {__version__}"]):
        run = subprocess.run([git, *step], cwd=repo, capture_output=True, text=True)
        if run.returncode:
            return f"git {' '.join(step[:1])} failed, the files are in place: {run.stderr.strip().splitlines()[-1:]}"
    return "git repository initialised with a first commit"
