"""Plugin manifests, marketplace entry, command frontmatter, and the official validator (when node is here)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


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


def test_claude_plugin_validate_strict(tmp_path):
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("node/npx is not installed on this machine: `claude plugin validate` was NOT run")
    env = {**os.environ, "HOME": str(tmp_path), "npm_config_cache": str(Path.home() / ".npm"), "NO_COLOR": "1"}
    proc = subprocess.run(
        [npx, "-y", "@anthropic-ai/claude-code@latest", "plugin", "validate", str(ROOT), "--strict"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Validation passed" in proc.stdout
