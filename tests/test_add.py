"""`python -m curry_train add NAME`: primitives copied into the user's own repository, updated without losing edits."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curry_train.__main__ import main
from curry_train.scaffold import vendor
from curry_train.scaffold.add import add, find_tests_dir
from curry_train.scaffold.catalog import PACKAGE_DIR, PRIMITIVES, primitive_files, resolve_names, standalone_test_files

ROOT = Path(__file__).resolve().parents[1]

# Runs pytest inside the user's repo, then fails if any curry_train module came from outside it.
ISOLATED_PYTEST = """
import sys, pytest
rc = pytest.main(sys.argv[1:])
outside = sorted(m.__name__ for m in list(sys.modules.values())
                 if getattr(m, "__name__", "").startswith("curry_train")
                 and not str(getattr(m, "__file__", "") or "").startswith({repo!r}))
print("OUTSIDE", outside)
sys.exit(rc or (3 if outside else 0))
"""


def run_pytest_in(repo: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """pytest in ``repo`` with the current interpreter and only ``repo`` on the path (no installed curry_train)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(repo)
    return subprocess.run([sys.executable, "-c", ISOLATED_PYTEST.format(repo=str(repo)), "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def tree(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


# ---- the catalog: computed closures, one standalone test per primitive --------------------------------------------

def test_every_primitive_module_belongs_to_a_primitive():
    """A module added to primitives/ later is either a primitive in the catalog or a helper one of them imports."""
    covered = {f for name in PRIMITIVES for f in primitive_files([name])}
    modules = {str(p.relative_to(PACKAGE_DIR)) for p in (PACKAGE_DIR / "primitives").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - covered == set(), "add these to scaffold/catalog.PRIMITIVES (with a standalone test)"


def test_closures_follow_the_imports():
    assert primitive_files(["recompute"]) == [
        "__init__.py", "primitives/__init__.py", "primitives/_checks.py", "primitives/_config.py",
        "primitives/blocks.py", "primitives/model_io.py", "primitives/recompute.py"]
    # the lazy import inside PipelineSchedule.__init__ is followed too
    assert "primitives/pipeline/gpipe_early_recv.py" in primitive_files(["pipeline_schedule"])
    assert "primitives/grad_accum.py" not in primitive_files(["checkpoint"])
    union = sorted({f for n in PRIMITIVES for f in primitive_files([n])})
    assert primitive_files(resolve_names(["all"])) == union
    assert resolve_names(["primitive-recompute", "recompute", "primitive-dcp"]) == ["recompute", "checkpoint"]


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_standalone_tests_import_only_torch_pytest_and_their_primitive(name):
    tests_dir = find_tests_dir()
    allowed = {f"curry_train.{f[:-3].replace('/', '.').removesuffix('.__init__')}" for f in primitive_files([name])}
    for test in standalone_test_files(PRIMITIVES[name].test_file, tests_dir):
        for node in ast.walk(ast.parse((tests_dir / "primitives" / test).read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for mod in mods:
                if mod.startswith("curry_train"):
                    assert mod in allowed, f"{test} imports {mod}, which `add {name}` does not copy"
                    assert mod != "curry_train.primitives", f"{test}: import from the module, not the package"
                else:
                    top = mod.split(".")[0]
                    assert top in sys.stdlib_module_names or top in ("torch", "pytest") or \
                        (tests_dir / "primitives" / f"{top}.py").is_file(), f"{test} imports {mod}"


# ---- into an empty repository and into a foreign one ----------------------------------------------------------------

@pytest.mark.timeout(600)
@pytest.mark.slow
def test_each_primitive_alone_into_an_empty_repo(tmp_path, interpreter_pool):
    """Exactly its closure and its tests; they import (collect) with nothing but the copied files."""
    for name in PRIMITIVES:
        repo = tmp_path / name
        repo.mkdir()
        result = add([name], repo)
        expected = {f"curry_train/{f}" for f in primitive_files([name])} | {
            f"tests/curry_train/{t}" for t in standalone_test_files(PRIMITIVES[name].test_file, find_tests_dir())}
        assert set(result.report.actions["new"]) == expected
        assert set(tree(repo)) == expected | {vendor.MANIFEST}
        manifest = vendor.read_manifest(repo)
        assert manifest["primitives"] == [name] and manifest["version"] == __import__("curry_train").__version__
        assert all(vendor.sha256((repo / rel).read_bytes()) == h for rel, h in manifest["files"].items())
    collected = dict(zip(PRIMITIVES, interpreter_pool.map(
        lambda name: run_pytest_in(tmp_path / name, "--collect-only", "tests/curry_train"), PRIMITIVES)))
    for name, run in collected.items():
        assert run.returncode == 0, f"{name}:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
        assert "OUTSIDE []" in run.stdout, name


FOREIGN_MODEL = '''
import torch, torch.nn as nn, torch.nn.functional as F

class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1, self.ln_2, self.h = nn.LayerNorm(d), nn.LayerNorm(d), h
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))

class NanoGPT(nn.Module):
    def __init__(self, vocab=64, d=32, h=2, n_layer=2, block_size=16):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d),
            h=nn.ModuleList(Block(d, h) for _ in range(n_layer)), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))
'''

FOREIGN_TRAIN = '''
import copy, torch, torch.nn.functional as F
from model import NanoGPT
from curry_train.primitives.grad_accum import GradientAccumulation
from curry_train.primitives.recompute import apply_recompute

torch.manual_seed(0)
model = NanoGPT()
reference = copy.deepcopy(model)
apply_recompute(model, "selective")
x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
micro_batches = list(zip(x.split(2), y.split(2)))

def your_summed_token_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), y.numel()

ga = GradientAccumulation(steps=len(micro_batches))
ga.plan([(y != -100).sum() for _, y in micro_batches])
for i, (xb, yb) in enumerate(micro_batches):
    with ga.sync_context(model, i):
        loss_sum, n_valid = your_summed_token_loss(model(xb), yb)
        ga.backward_loss(loss_sum, n_valid, i).backward()
F.cross_entropy(reference(x).flatten(0, 1), y.flatten()).backward()
diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
print("max grad diff", diff)
assert diff < 1e-5
'''


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_all_into_a_foreign_training_repo_runs_there(tmp_path, capsys):
    """A nanoGPT-style repo gets every primitive; the copied tests pass there with nothing else of ours importable,
    and its own train.py uses two of them with the loop lines `add` prints."""
    repo = tmp_path / "nanogpt"
    repo.mkdir()
    (repo / "model.py").write_text(FOREIGN_MODEL)
    (repo / "train.py").write_text(FOREIGN_TRAIN)
    assert main(["add", "all", "--dest", str(repo)]) == 0
    out = capsys.readouterr().out
    for p in PRIMITIVES.values():
        assert p.usage.strip() in out  # the import and the loop lines, per primitive
    assert (repo / "model.py").read_text() == FOREIGN_MODEL  # their files are untouched
    shared = [rel for rel in vendor.read_manifest(repo)["files"] if rel.endswith("_config.py")]
    assert shared == ["curry_train/primitives/_config.py"]  # shared helpers copied once
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    train = subprocess.run([sys.executable, "train.py"], cwd=repo, env={**env, "PYTHONPATH": str(repo)},
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    tests = run_pytest_in(repo, "tests/curry_train")
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert "OUTSIDE []" in tests.stdout and " passed" in tests.stdout


# ---- updates: unedited files refreshed, edited ones kept with a diff, --force keeps .orig -------------------------

def simulate_older_version(repo: Path, rel: str) -> None:
    """Make ``rel`` look like an older curry-train wrote it: other content, and that content's hash recorded."""
    old = (repo / rel).read_text() + "# older curry-train\n"
    (repo / rel).write_text(old)
    manifest = vendor.read_manifest(repo)
    manifest["files"][rel] = vendor.sha256(old.encode())
    (repo / vendor.MANIFEST).write_text(json.dumps(manifest))


def test_update_refreshes_unedited_files_and_keeps_edited_ones(tmp_path, capsys):
    add(["grad_accum"], tmp_path)
    simulate_older_version(tmp_path, "curry_train/primitives/_config.py")
    edited = tmp_path / "curry_train/primitives/grad_accum.py"
    mine = edited.read_text().replace("class GradientAccumulation:", "class GradientAccumulation:  # my edit")
    edited.write_text(mine)

    assert main(["add", "recompute", "--dest", str(tmp_path)]) == 0  # a second primitive, and an update
    out = capsys.readouterr().out
    upstream = (PACKAGE_DIR / "primitives/_config.py").read_text()
    assert (tmp_path / "curry_train/primitives/_config.py").read_text() == upstream
    assert "updated     curry_train/primitives/_config.py" in out
    assert edited.read_text() == mine  # the edit survives
    assert "kept        curry_train/primitives/grad_accum.py" in out
    assert "-class GradientAccumulation:  # my edit" in out and "+class GradientAccumulation:" in out  # the diff
    assert (tmp_path / "curry_train/primitives/recompute.py").is_file()
    manifest = vendor.read_manifest(tmp_path)
    assert manifest["primitives"] == ["grad_accum", "recompute"]
    assert "grad_accum" in (tmp_path / "curry_train/primitives/__init__.py").read_text()

    assert main(["add", "grad_accum", "--dest", str(tmp_path), "--force"]) == 0
    assert "overwritten curry_train/primitives/grad_accum.py" in capsys.readouterr().out
    assert edited.read_text() == (PACKAGE_DIR / "primitives/grad_accum.py").read_text()
    assert (tmp_path / "curry_train/primitives/grad_accum.py.orig").read_text() == mine
    assert (tmp_path / "curry_train/primitives/recompute.py").is_file()  # earlier primitives stay


# ---- bad input --------------------------------------------------------------------------------------------------

def test_bad_input_is_one_line_and_changes_nothing(tmp_path, capsys):
    assert main(["add", "recompute", "tp_linear"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown primitive 'tp_linear'" in err and "grad_accum" in err
    assert main(["add"]) == 2 and "name at least one primitive" in capsys.readouterr().err
    assert main(["add", "recompute", "--dest", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["add", "recompute", "--dest", str(tmp_path / "file")]) == 2
    assert main(["add", "recompute", "--dest", str(tmp_path), "--tests", "../outside"]) == 2
    assert "inside the repository" in capsys.readouterr().err

    theirs = tmp_path / "theirs"
    (theirs / "curry_train").mkdir(parents=True)
    (theirs / "curry_train" / "__init__.py").write_text("# their own package\n")
    before = tree(theirs)
    assert main(["add", "recompute", "--dest", str(theirs)]) == 2
    assert "was not written by curry-train add" in capsys.readouterr().err
    assert tree(theirs) == before
    assert main(["add", "recompute", "--dest", str(theirs), "--force"]) == 0
    assert (theirs / "curry_train" / "__init__.py.orig").read_text() == "# their own package\n"


def test_a_failure_mid_copy_leaves_no_half_written_file(tmp_path, monkeypatch):
    add(["checkpoint"], tmp_path)
    simulate_older_version(tmp_path, "curry_train/primitives/checkpoint.py")
    before = tree(tmp_path)
    real_replace, calls = os.replace, []

    def dies_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(vendor.os, "replace", dies_on_second)
    with pytest.raises(OSError, match="disk full"):
        add(["checkpoint", "grad_accum"], tmp_path)
    monkeypatch.setattr(vendor.os, "replace", real_replace)
    after = tree(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".curry-train-staging")]
    assert after[vendor.MANIFEST] == before[vendor.MANIFEST]  # the manifest moves last
    for rel, data in after.items():  # every file is either as before or complete from the new version
        source = find_tests_dir() / "primitives" / Path(rel).name if rel.startswith("tests/") else \
            PACKAGE_DIR / rel.removeprefix("curry_train/")
        assert data == before.get(rel) or rel.endswith("primitives/__init__.py") or data == source.read_bytes(), rel
    add(["checkpoint", "grad_accum"], tmp_path)  # the re-run completes the job
    assert (tmp_path / "curry_train/primitives/grad_accum.py").read_bytes() == \
        (PACKAGE_DIR / "primitives/grad_accum.py").read_bytes()


def test_tests_given_as_an_absolute_path_lands_inside_dest_or_is_refused(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    result = add(["grad_accum"], repo, tests=str(repo / "qa" / "ct"))  # absolute, inside DEST: taken relative
    assert result.tests_dir == "qa/ct" and any((repo / "qa" / "ct").iterdir())
    assert not (repo / str(repo).lstrip("/")).exists()  # not DEST/<the absolute path>
    with pytest.raises(ValueError, match=r"--tests .* is outside --dest"):
        add(["grad_accum"], repo, tests=str(tmp_path / "elsewhere"))
