"""Skill pages: frontmatter rules (Agent Skills spec) and every ```python block runs.

Each ```python block of ``skills/*/SKILL.md`` is executed as its own script in a fresh interpreter (cwd: a
temporary directory), so a page can never show code that does not run. Blocks that are not meant to run use
another fence (```bash, ```text). Blocks must be CPU-only and quick.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p.parent.name}-{i}" for p, i, _ in BLOCKS])
def test_skill_python_block_runs(path, index, code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{path.parent.name} block {index} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
