"""Skill pages: frontmatter rules (Agent Skills spec), every ```python block runs, and each primitive's page shows
how to get its code.

Each ```python block of ``skills/*/SKILL.md`` is executed as its own script in a fresh interpreter (cwd: a
temporary directory; two run at a time), so a page can never show code that does not run. Blocks that are not
meant to run use another fence (```bash, ```text). Blocks must be CPU-only and quick. ```py blocks are shown, not
run: they hold the lines a user adds to their own training loop (``catalog.PRIMITIVES[name].usage``, also printed
by ``python -m curry_train add``), which name the user's ``model``, ``optimizer`` and batches; the tests check
that they are verbatim the catalog's and that they compile.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curry_train.scaffold.catalog import PRIMITIVES

ROOT = Path(__file__).resolve().parents[1]
SKILLS = sorted((ROOT / "skills").glob("*/SKILL.md"))
NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def frontmatter(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n"), f"{path}: no YAML frontmatter"
    _, fm, body = text.split("---\n", 2)
    return yaml.safe_load(fm), body


def python_blocks(body: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


def test_there_are_skills():
    assert SKILLS, "no skills/*/SKILL.md found"


@pytest.mark.parametrize("path", SKILLS, ids=lambda p: p.parent.name)
def test_skill_frontmatter(path):
    fm, body = frontmatter(path)
    folder = path.parent.name
    assert fm.get("name") == folder, f"name {fm.get('name')!r} must equal the folder name {folder!r}"
    assert NAME_RE.match(folder) and len(folder) <= 64, f"{folder!r}: lowercase-hyphen, at most 64 chars"
    desc = fm.get("description")
    assert isinstance(desc, str) and 0 < len(desc) <= 1024, "description must be a non-empty string of at most 1024 chars"
    assert "<" not in desc and ">" not in desc, "no angle brackets in description"
    assert body.strip(), "empty body"


BLOCKS = [(p, i, code) for p in SKILLS for i, code in enumerate(python_blocks(frontmatter(p)[1]))]
BLOCK_IDS = [f"{p.parent.name}-{i}" for p, i, _ in BLOCKS]


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "block.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def block_runs(request, tmp_path_factory, interpreter_pool):
    """The selected blocks, started in test order on ``interpreter_pool``. ``{block id: Future}``."""
    return {item.callspec.id: interpreter_pool.submit(run_block, item.callspec.params["code"],
                                                      tmp_path_factory.mktemp(item.callspec.id))
            for item in request.session.items
            if item.originalname == "test_skill_python_block_runs" and item.path == Path(__file__)}


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.slow
def test_skill_python_block_runs(path, index, code, block_runs, request):
    proc = block_runs[request.node.callspec.id].result()
    assert proc.returncode == 0, f"{path.parent.name} block {index} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def py_blocks(body: str) -> list[str]:
    return re.findall(r"^```py\n(.*?)^```", body, flags=re.S | re.M)


def test_every_primitive_skill_page_belongs_to_a_primitive():
    folders = {p.parent.name for p in SKILLS if p.parent.name.startswith("primitive-")}
    assert folders, "no skills/primitive-*/SKILL.md"
    assert folders == {p.skill for p in PRIMITIVES.values() if p.skill.startswith("primitive-")}  # + stage pages


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitive_page_shows_how_to_get_the_code(name):
    primitive = PRIMITIVES[name]
    page = ROOT / "skills" / primitive.skill / "SKILL.md"
    assert page.is_file(), f"catalog names skill {primitive.skill!r}, which has no page"
    body = frontmatter(page)[1]
    headings = re.findall(r"^## .*$", body, flags=re.M)
    assert headings and headings[0] == "## Get the code", f"{primitive.skill}: 'Get the code' must be the first section"
    section = body.split("## Get the code\n", 1)[1].split("\n## ", 1)[0]
    assert f"/curry-train:add-primitive {name}" in section and "/curry-train:scaffold" in section
    assert "curry_train/MANIFEST.json" in section and "tests/curry_train/" in section
    assert "Where the commands on this page run" in section and "scripts/curry-train SUBCOMMAND" in section
    assert any(primitive.usage in block for block in py_blocks(section)), \
        f"{primitive.skill}: catalog.PRIMITIVES[{name!r}].usage is not verbatim in a ```py block of 'Get the code'"
    compile(primitive.usage, f"{primitive.skill}: usage of {name}", "exec")
    assert primitive.usage.lstrip().startswith("from curry_train.") and "import" in primitive.usage.splitlines()[0]


def test_pages_cite_user_paths_not_plugin_paths():
    for path in SKILLS:
        assert "template/curry_train" not in path.read_text(), f"{path.parent.name}: say curry_train/... (the user's path)"
