"""Nothing lost, nothing silently wrong: damaged checkpoints are skipped (named, with a warning) for the newest intact
one, non-finite steps are never applied or saved, and a resume prints every changed setting and what it does.

One process, in-process ``main([...])`` runs on a tiny GPT (the torchrun case is in test_fault_tolerance.py)."""

import functools
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from curry_train.__main__ import main
from curry_train.loop import warmup_cosine
from curry_train.model import GPT, GPTConfig
from curry_train.primitives.checkpoint import (
    Checkpointer, CheckpointWarning, NonFiniteStateError, step_dirname,
)
from curry_train.primitives.checkpoint_files import INTEGRITY, verify
from curry_train.primitives.checkpoint_trust import LOCK_NAME, temp_name, temp_run
from tiny_runs import TINY, train_tiny

run = functools.partial(train_tiny, steps=10, every=5)  # checkpoints at 5 and 10


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """One uninterrupted 10-step run with checkpoints at 5 and 10: the reference every damaged resume rolls back to."""
    tmp = tmp_path_factory.mktemp("original")
    code, lines = run(tmp, "original", "checkpoint.keep_last=0")
    assert code == 0 and len(lines) == 10
    return tmp / "ckpt", lines


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4000] = bytes(b ^ 0xFF for b in data[middle:middle + 4000])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": ("__0_0.distcp", truncate, "has"),
    "flipped bytes": ("__0_0.distcp", flip, "sha256"),
    "garbage metadata": (".metadata", lambda p: p.write_bytes(b"\x00garbage" * 10), ".metadata"),
    "missing metadata": (".metadata", Path.unlink, ".metadata"),
    "missing meta.json": ("meta.json", Path.unlink, "meta.json is missing"),
    "garbage meta.json": ("meta.json", lambda p: p.write_text("{not json"), "meta.json is not valid JSON"),
    "garbage integrity record": (INTEGRITY, lambda p: p.write_text("[]"), INTEGRITY),
    "missing integrity record": (INTEGRITY, Path.unlink, f"{INTEGRITY} is missing.*allow_unverified=true"),
    "a file the record does not list": ("extra.pt", lambda p: p.write_bytes(b"x"), "not listed in.*: extra.pt"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(case, original, tmp_path, capsys):
    source, lines = original
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    name, damage, says = DAMAGE[case]
    damage(ckpt / step_dirname(10) / name)
    assert verify(ckpt / step_dirname(10)) is not None and verify(ckpt / step_dirname(5)) is None
    with pytest.warns(CheckpointWarning, match=f"{step_dirname(10)} is damaged: .*{says}"):
        code, resumed = run(tmp_path, "resumed", "checkpoint.keep_last=0", ckpt=ckpt)
    out = capsys.readouterr().out
    assert code == 0 and f"resumed from {ckpt / step_dirname(5)} at step 5" in out and "skipped damaged" in out
    assert [m["step"] for m in resumed] == list(range(5, 10))
    assert resumed[-1]["loss"] == lines[-1]["loss"]  # rolled back to step 5, then exactly the original run
    assert verify(ckpt / step_dirname(10)) is None  # re-saved intact


def test_no_intact_checkpoint_is_one_error_listing_what_was_tried(original, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original[0], ckpt)
    truncate(ckpt / step_dirname(10) / "__0_0.distcp")
    (ckpt / step_dirname(5) / "meta.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        code, _ = run(tmp_path, "none", ckpt=ckpt)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: no usable checkpoint in") and step_dirname(10) in err and step_dirname(5) in err


@pytest.mark.slow
def test_a_stale_latest_pointer_warns_and_only_our_leftovers_are_cleaned(original, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original[0], ckpt)
    (ckpt / "latest").write_text("step-00000099\n")
    ours = [ckpt / temp_name("dead1", "latest"), ckpt / temp_name("dead1", step_dirname(15))]  # a killed run's
    ours[0].write_text("step-00000010\n")
    ours[1].mkdir()
    foreign = [ckpt / ".tmp-mydata" / "important.txt", ckpt / "latest.tmp-notes", ckpt / ".tmp-step-00000015" / "x"]
    for f in foreign:  # the user's (and an older curry_train's) files: not marked, never deleted
        f.parent.mkdir(exist_ok=True)
        f.write_text("keep me")
    with pytest.warns(CheckpointWarning, match="names 'step-00000099', which is not a checkpoint directory"):
        code, resumed = run(tmp_path, "pointer", ckpt=ckpt, steps=15)
    assert code == 0 and resumed[0]["step"] == 10  # the newest intact step directory
    assert not any(p.exists() for p in ours) and all(f.read_text() == "keep me" for f in foreign)
    assert not any(temp_run(p.name) for p in ckpt.iterdir()) and not (ckpt / LOCK_NAME).exists()
    assert (ckpt / "latest").read_text().strip() == step_dirname(15)


def test_a_missing_rng_file_is_a_warning_naming_what_differs(original, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original[0], ckpt)
    (ckpt / step_dirname(10) / "rng-rank0.pt").unlink()
    (ckpt / step_dirname(10) / INTEGRITY).unlink()  # else it is (rightly) a damaged checkpoint
    with pytest.warns(CheckpointWarning) as caught:
        meta = Checkpointer(ckpt, allow_unverified=True).load(GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2)))
    said = [str(w.message) for w in caught]
    assert any(f"has no {INTEGRITY}: loading it UNVERIFIED" in m for m in said), said
    assert any("rng-rank0.pt is missing" in m and "dropout masks" in m for m in said), said
    assert meta["rng_restored"] is False and meta["step"] == 10


# ---- the non-finite guard -----------------------------------------------------------------------------------------

POISON = ["model._target_=foreign_models.poisoned_gpt", "model.block_size=32"]


@pytest.mark.slow
def test_a_few_non_finite_steps_are_skipped_never_saved_and_the_run_goes_on(tmp_path, capsys):
    code, lines = run(tmp_path, "poison", *POISON, "model.nan_from=5", "model.nan_calls=2", "checkpoint.every=1",
                      "checkpoint.keep_last=0")
    assert code == 0, capsys.readouterr().err
    assert [m["step"] for m in lines if m["skipped"]] == [5, 6]
    assert all(m["loss"] == m["loss"] for m in lines if not m["skipped"])  # no NaN elsewhere
    assert "update skipped (2 in a row, 2 in this run)" in capsys.readouterr().out
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.steps() == [1, 2, 3, 4, 5, 8, 9, 10]  # after steps 5 and 6 (0-based) nothing was saved


@pytest.mark.slow
def test_persistent_non_finite_steps_end_the_run_and_keep_the_last_finite_checkpoint(tmp_path, capsys):
    code, lines = run(tmp_path, "diverged", *POISON, "model.nan_from=6", "model.nan_calls=100", "checkpoint.every=1",
                      "checkpoint.keep_last=2", "train.nonfinite_patience=3")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "error: step 8: loss nan" in err and "3 non-finite steps in a row" in err
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.steps() == [5, 6] and ckpt.latest_path().name == step_dirname(6)  # the last good state survives
    assert [m["step"] for m in lines if m["skipped"]] == [6, 7]  # the third ends the run before its metrics


@pytest.mark.parametrize("async_save", [False, True], ids=["sync: found while sealing", "async: before staging"])
def test_a_non_finite_state_is_never_saved(tmp_path, async_save):
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=32))
    ckpt = Checkpointer(tmp_path, async_save=async_save)
    ckpt.save(1, model)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"not saving step 2: model\.blocks\.0\.attn\.proj\.weight holds NaN"):
        ckpt.save(2, model)
    ckpt.close()
    assert ckpt.steps() == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_dirname(1)]


# ---- honest resume ------------------------------------------------------------------------------------------------

def test_resume_prints_every_changed_setting_and_applies_the_new_lr(original, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original[0], ckpt)
    code, resumed = run(tmp_path, "lr", "train.lr=1e-05", "seed=7", ckpt=ckpt, steps=14)
    out = capsys.readouterr().out
    assert code == 0
    assert "resume: train.lr changed 0.003 -> 1e-05: applied from the resumed step" in out
    assert "resume: train.steps changed 10 -> 14: the LR schedule follows" in out
    assert "resume: seed changed 1337 -> 7: the batches after the resumed step differ" in out
    # the LR the optimizer used at each resumed step: the new peak on the (new) schedule
    for m in resumed:
        assert m["lr"] == pytest.approx(1e-5 * warmup_cosine(m["step"] + 1, 2, 14, 0.1), rel=1e-12)


def test_a_checkpoint_beyond_train_steps_is_refused(original, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(original[0], ckpt)
    code, _ = run(tmp_path, "short", ckpt=ckpt, steps=4)
    err = capsys.readouterr().err
    assert code == 2 and "train.steps=4 but the checkpoint" in err and "is at step 10" in err


def test_the_guard_setting_is_checked_before_anything_runs(tmp_path, capsys, no_launch):
    assert main(["train", "train.nonfinite_patience=0"]) == 2
    assert "train.nonfinite_patience must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_the_faults_bench_reproduces_the_guarantees_table(capsys):
    """`bench faults` (the table the dcp skill page shows): every damaged copy resumes from the previous checkpoint and
    ends on the clean run's loss bit for bit; everything damaged is one error; NaN steps are skipped, then stop."""
    from curry_train.bench.faults import DAMAGE, bench_faults
    from curry_train.config import load_config

    cfg = load_config([*TINY[:5], "train.batch_size=2"])
    result = bench_faults(cfg, steps=7, every=3)
    rows = {r["case"]: r for r in result["rows"]}
    for case in DAMAGE:
        if case == "everything damaged":
            assert rows[case]["outcome"].startswith("error, exit 2: no usable checkpoint")
        else:
            assert rows[case]["same_final_loss"] is True, rows[case]
            expected = 6 if case in ("stale latest pointer", "leftover temporaries of a killed save") else 3
            assert rows[case]["outcome"].startswith(f"resumed from step {expected}; no leftovers"), rows[case]
            if "pickle" in case:  # the tampered file still verified (its record rewritten): refused, and nothing ran
                assert rows[case]["outcome"].endswith("; nothing ran") and "loading failed" in rows[case]["warning"]
    assert rows["leftover temporaries of a killed save"]["outcome"].endswith("; user's .tmp-* kept")
    assert rows["second run on a folder in use"]["outcome"].startswith(
        "refused: checkpoint.dir='DIR' is in use by another run (pid 4242 on host node-7")
    assert rows["disk full while saving"]["outcome"].startswith("stopped: disk full: saving step 7 to checkpoint.dir")
    assert rows["disk full while saving"]["warning"] == "partial left: none; checkpoints kept: [3, 6]"
    assert rows["NaN loss at steps 3, 4 (patience 3)"]["outcome"] == "completed; skipped steps [3, 4]"
    assert rows["NaN loss from step 4 on (patience 3)"]["outcome"] == "stopped, exit 1: step 6"
    assert rows["save a NaN parameter"]["outcome"].startswith("refused: not saving step 1")
    assert "| truncated shard | resumed from step 3" in capsys.readouterr().out


@pytest.mark.slow
def test_integrity_format_2_hashes_blocks_and_format_1_records_still_verify(tmp_path):
    """Format 2's digest is sha256 over the blocks' sha256s (blocks hashed in parallel); a flipped byte in any block
    is found; a format-1 record (one sha256 of each whole file, written by earlier versions) still verifies."""
    import hashlib
    import json
    import os

    from curry_train.primitives import checkpoint_files as files

    data = os.urandom(3 * 1000 + 17)
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    want = hashlib.sha256(b"".join(hashlib.sha256(data[i:i + 1000]).digest() for i in range(0, len(data), 1000)))
    assert files.block_digests([tmp_path / "a.bin", tmp_path / "empty"], block=1000) == [
        want.hexdigest(), hashlib.sha256().hexdigest()]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(data)
    (ckpt / "meta.json").write_text("{}")
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(3 * files.HASH_BLOCK // 2))  # two blocks
    files.write_description(ckpt)
    record = json.loads((ckpt / INTEGRITY).read_text())
    assert record["format"] == 2 and record["block_size"] == files.HASH_BLOCK and verify(ckpt) is None
    with open(ckpt / "__0_0.distcp", "r+b") as f:  # one byte in the second block
        f.seek(files.HASH_BLOCK + 5)
        byte = f.read(1)
        f.seek(files.HASH_BLOCK + 5)
        f.write(bytes([byte[0] ^ 1]))
    assert "__0_0.distcp has sha256" in verify(ckpt) and "same size: bytes changed" in verify(ckpt)
    old = {"format": 1, "files": {name: {"size": (ckpt / name).stat().st_size, "sha256": files.file_digest(ckpt / name)}
                                  for name in (".metadata", "meta.json", "__0_0.distcp")}}
    (ckpt / INTEGRITY).write_text(json.dumps(old))
    assert verify(ckpt) is None
    (ckpt / "meta.json").write_text("{ }")
    assert verify(ckpt).startswith("meta.json has 3 bytes, expected 2")
    (ckpt / INTEGRITY).write_text(json.dumps({"format": 3, "files": {}}))
    assert verify(ckpt).startswith(f"{INTEGRITY} is unreadable (format 3")
