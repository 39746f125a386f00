"""``python -m curry_train add NAME...``: copy primitives into a repository the user already has.

For each primitive: its module and exactly the package modules it imports (``catalog.primitive_files``) go to
``<dest>/curry_train/``, its standalone tests and their helpers to ``<tests>`` (default
``<dest>/tests/curry_train/``); ``<dest>/curry_train/MANIFEST.json`` records the version and a hash of every file,
so a later ``add`` (of the same or more primitives) updates what the user has not edited and reports, with a diff,
what they have (``vendor``). ``primitives/__init__.py`` is written as a stub that imports nothing: the full one
imports every primitive, and the user's copy has only some.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from . import vendor
from .catalog import PACKAGE, PACKAGE_DIR, PRIMITIVES, PRIMITIVES_INIT, primitive_files, resolve_names, \
    standalone_test_files

DEFAULT_TESTS = "tests/curry_train"
PRIMITIVES_STUB = '''"""Primitives copied by `curry-train add` ({names}). Import from the modules, e.g.
``from curry_train.primitives.{first} import ...``. This file is rewritten by the next ``add`` unless you edit it."""
'''


def find_tests_dir() -> Path:
    """The curry-train tests that travel with the package: the plugin's ``tests/`` beside ``template/``, or a
    scaffolded repository's ``tests/`` beside its ``curry_train/``."""
    for candidate in (PACKAGE_DIR.parents[1] / "tests", PACKAGE_DIR.parent / "tests"):
        if (candidate / "primitives").is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the curry-train tests beside {PACKAGE_DIR}: this copy of curry_train was "
                            "installed without them; run the plugin's runner (scripts/curry-train) instead")


def listing() -> str:
    width = max(map(len, PRIMITIVES))
    lines = [f"  {name:{width}s}  {p.summary}  (skill: {p.skill})" for name, p in PRIMITIVES.items()]
    return "primitives (or all; the skill names work too):\n" + "\n".join(lines)


def collect(names: list[str], tests_rel: str) -> dict[str, bytes]:
    """Repository-relative path -> content for these primitives and their tests."""
    tests_dir = find_tests_dir()
    files: dict[str, bytes] = {}
    for rel in primitive_files(names):
        files[f"{PACKAGE}/{rel}"] = (PACKAGE_DIR / rel).read_bytes()
    files[f"{PACKAGE}/{PRIMITIVES_INIT}"] = PRIMITIVES_STUB.format(names=", ".join(names), first=names[0]).encode()
    for name in names:
        for test in standalone_test_files(PRIMITIVES[name].test_file, tests_dir):
            files[f"{tests_rel}/{test}"] = (tests_dir / "primitives" / test).read_bytes()
    return files


@dataclass
class AddResult:
    repo: Path
    tests_dir: str  # inside repo
    report: vendor.SyncReport


def add(names: list[str], dest: str | Path = ".", tests: str | None = None, force: bool = False) -> AddResult:
    """Copy the named primitives into ``dest`` (see the module docstring); says what happened to each file."""
    names = resolve_names(names)
    repo = Path(dest).expanduser()
    if not repo.is_dir():
        raise NotADirectoryError(f"--dest {dest}: not a folder (add copies into an existing repository)")
    repo = repo.resolve()
    if (repo / PACKAGE).resolve() == PACKAGE_DIR:
        raise ValueError(f"--dest {dest} holds the curry_train that is running; add copies from it, not into it")
    manifest = vendor.read_manifest(repo)
    if manifest is None and (repo / PACKAGE).exists() and not force:
        raise FileExistsError(f"{repo / PACKAGE} exists but was not written by curry-train add (no {vendor.MANIFEST}); "
                              "nothing was changed. Pass --force to write into it (edited files are kept as .orig)")
    if manifest is not None and manifest.get("kind") == "scaffold":
        raise ValueError(f"{repo} was made by curry-train scaffold and already has every primitive; "
                         "refresh it with `scaffold --update`")
    old = dict(manifest["files"]) if manifest else {}
    installed = list((manifest or {}).get("primitives", []))
    names = [n for n in PRIMITIVES if n in installed or n in names]  # earlier adds stay: their files are not removed
    tests_rel = tests or (manifest or {}).get("tests_dir") or DEFAULT_TESTS
    if Path(tests_rel).expanduser().is_absolute():  # an absolute path inside DEST is taken relative to it
        absolute = Path(tests_rel).expanduser().resolve()
        if absolute != repo and repo not in absolute.parents:
            raise ValueError(f"--tests {tests}: {absolute} is outside --dest {repo}; give a folder inside it")
        tests_rel = absolute.relative_to(repo).as_posix()
    tests_rel = Path(tests_rel).as_posix().strip("/")
    if not tests_rel or tests_rel == "." or ".." in Path(tests_rel).parts:
        raise ValueError(f"--tests {tests}: give a folder inside the repository (relative to --dest)")
    files = collect(names, tests_rel)
    report = vendor.plan(repo, files, old, force, __version__)
    vendor.apply(repo, files, report, {"tool": "curry-train", "kind": "add", "version": __version__,
                                       "primitives": names, "tests_dir": tests_rel}, old)
    return AddResult(repo, tests_rel, report)


def summary(result: AddResult, names: list[str]) -> str:
    """What ``add`` prints: the files, the diffs of edited ones, then per primitive the import and the loop lines."""
    report = result.report
    out = [f"curry-train {__version__} -> {result.repo}", *report.lines()]
    for rel, diff in report.diffs.items():
        out += ["", f"--- what curry-train {__version__} would change in {rel} (not applied):", diff.rstrip("\n")]
    for name in resolve_names(names):
        p = PRIMITIVES[name]
        out += ["", f"# {name}: {p.summary}", f"# in your training code ({p.skill} explains the why and the numbers):",
                p.usage.rstrip("\n")]
    out += ["", f"tests: python -m pytest {result.tests_dir}",
            "bench, train and the other tools: `python -m curry_train` needs the whole package (a scaffolded repo); "
            "here run them through the plugin: /curry-train:bench-run SECTION, or <plugin-folder>/scripts/curry-train "
            "SUBCOMMAND ..."]
    return "\n".join(out)
