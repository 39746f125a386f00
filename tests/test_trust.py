"""Trust nothing on disk: a checkpoint runs no code, the package deletes only what it wrote, a folder has one owner,
a full disk is one line and costs nothing, and Ctrl-C / SIGTERM stop in one line and resume exactly.

In-process ``main([...])`` runs of a tiny GPT (4-8 steps); the second owner is a real second process."""

import errno
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import curry_train
from curry_train.__main__ import main
from curry_train.primitives.checkpoint import Checkpointer, step_dirname
from curry_train.primitives.checkpoint_files import INTEGRITY, write_description
from curry_train.primitives.checkpoint_trust import LOCK_NAME, temp_run
from tiny_runs import TINY, train_tiny

PACKAGE_ROOT = str(Path(curry_train.__file__).resolve().parents[1])
run = functools.partial(train_tiny, steps=8, every=2)  # checkpoints at 2, 4, 6, 8


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints at 2, 4, 6, 8): the loss every interrupted run must end on."""
    tmp = tmp_path_factory.mktemp("straight")
    code, lines = run(tmp, "straight", "checkpoint.keep_last=0")
    assert code == 0 and len(lines) == 8
    return tmp / "ckpt", lines


class Payload:
    def __init__(self, ran):
        self.ran = str(ran)

    def __reduce__(self):
        return open, (self.ran, "w")  # unpickling creates the file: what os.system would do, harmlessly


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scheduler.pt", "rng-rank0.pt", ".metadata"])
@pytest.mark.parametrize("record", ["rewritten to match", "deleted, allow_unverified=true"])
def test_a_code_running_pickle_in_a_checkpoint_never_runs(straight, tmp_path, capsys, name, record):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight[0], ckpt)
    newest, ran = ckpt / step_dirname(8), tmp_path / "payload-ran"
    if name.endswith(".pt"):
        torch.save(Payload(ran), newest / name)
    else:
        (newest / name).write_bytes(__import__("pickle").dumps(Payload(ran)))
    (newest / INTEGRITY).unlink()
    extra = ["checkpoint.allow_unverified=true"]
    if record == "rewritten to match":  # whoever can write the folder can rewrite the record too
        write_description(newest)
        extra = []
    with pytest.warns(UserWarning, match=f"{step_dirname(8)} is damaged: loading failed"):
        code, _ = run(tmp_path, "resumed", "checkpoint.keep_last=0", *extra, ckpt=ckpt, steps=10)
    assert not ran.exists(), "the pickle's code ran"
    assert code == 0 and f"resumed from {ckpt / step_dirname(6)} at step 6" in capsys.readouterr().out


@pytest.mark.slow
def test_a_checkpoint_without_its_record_is_refused_naming_the_key(straight, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(straight[0], ckpt)
    for d in ckpt.glob("step-*"):
        (d / INTEGRITY).unlink()
    code, _ = run(tmp_path, "refused", ckpt=ckpt, steps=10)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: no usable checkpoint")
    assert f"{INTEGRITY} is missing" in err and "checkpoint.allow_unverified=true" in err
    with pytest.warns(UserWarning, match=f"no {INTEGRITY}: loading it UNVERIFIED"):
        code, lines = run(tmp_path, "allowed", "checkpoint.allow_unverified=true", ckpt=ckpt, steps=10)
    assert code == 0 and lines[0]["step"] == 8 and lines[0]["resumed_from"] == 8


HOLDER = """
import sys, time
from curry_train.primitives.checkpoint import Checkpointer
owner = Checkpointer(sys.argv[1])
owner.acquire()
print("holding", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_one_line_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, lines = run(tmp_path, "second")
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and lines == []
        assert f"checkpoint.dir='{tmp_path / 'ckpt'}' is in use by another run (pid {holder.pid} on host " \
               f"{socket.gethostname()} since " in err
    finally:
        holder.kill()  # SIGKILL: no clean release; the kernel drops the lock with the process
        holder.wait(timeout=60)
    code, lines = run(tmp_path, "after")
    assert code == 0 and len(lines) == 8 and not (tmp_path / "ckpt" / LOCK_NAME).exists()


def _fill_disk_after(monkeypatch, saves_that_work: int):
    """DCP's data files hit ENOSPC (half written) from the ``saves_that_work + 1``-th save on."""
    from torch.distributed.checkpoint import FileSystemWriter

    original, count = FileSystemWriter.write_data, [0]

    def write(self, plan, planner):
        count[0] += 1
        result = original(self, plan, planner)
        if count[0] > saves_that_work:
            result.wait()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return result

    monkeypatch.setattr(FileSystemWriter, "write_data", write)


@pytest.mark.slow
def test_disk_full_stops_in_one_line_keeping_every_committed_checkpoint(tmp_path, capsys, monkeypatch):
    _fill_disk_after(monkeypatch, 2)
    code, lines = run(tmp_path, "full", "checkpoint.keep_last=0")
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert err.startswith(f"error: disk full: saving step 6 to checkpoint.dir='{tmp_path / 'ckpt'}' needs about ")
    assert " is free; the partial step-00000006 was removed, committed checkpoints kept: step-00000002, " \
           "step-00000004; the run stopped (checkpoint.on_disk_full=continue" in err
    assert [m["step"] for m in lines] == list(range(6))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", step_dirname(2), step_dirname(4)]


@pytest.mark.slow
def test_disk_full_with_on_disk_full_continue_trains_on_without_checkpoints(tmp_path, capsys, monkeypatch):
    _fill_disk_after(monkeypatch, 1)
    code, lines = run(tmp_path, "go-on", "checkpoint.on_disk_full=continue")
    out = capsys.readouterr().out
    assert code == 0 and [m["step"] for m in lines] == list(range(8))
    assert out.count("warning: disk full: saving step 4") == 1 and "training on WITHOUT checkpoints" in out
    assert Checkpointer(tmp_path / "ckpt").steps() == [2]


@pytest.mark.slow
def test_a_real_full_tmpfs_is_one_line_and_the_rerun_frees_its_own_leftovers(tmp_path, capsys):
    """Where mounting is allowed (root): a 1 MiB tmpfs. The failed save's partial folder is removed at once; a
    killed save's (planted here) is removed by the next run before its writable probe, so the re-run starts."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here (the fault-injected tests cover ENOSPC)")
    try:
        ckpt = disk / "ckpt"
        code, _ = run(tmp_path, "tmpfs", "checkpoint.keep_last=0", ckpt=ckpt, steps=20)
        err = capsys.readouterr().err.strip()
        assert code == 1 and err.count("\n") == 0 and err.startswith("error: disk full: saving step "), err
        assert not any(temp_run(p.name) for p in ckpt.iterdir())
        kept = Checkpointer(ckpt).steps()
        assert kept, "at least one checkpoint fit"
        dead = ckpt / ".curry-train~dead1~step-00000099"  # a SIGKILLed save that filled the disk
        dead.mkdir()
        with open(dead / "__0_0.distcp", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        code, lines = run(tmp_path, "rerun", "checkpoint.every=0", ckpt=ckpt, steps=20)
        assert code == 0 and not dead.exists() and lines[0]["resumed_from"] == kept[-1]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-step", "mid-save"])
def test_ctrl_c_is_one_line_exit_130_and_resumes_to_the_uninterrupted_loss(straight, tmp_path, capsys, monkeypatch,
                                                                           where):
    if where == "mid-step":
        code, first = run(tmp_path, "int", env={"CURRY_TRAIN_SIGNAL_AT_STEP": "4:INT"})  # after step 4 (5 done)
    else:
        original = Checkpointer._commit
        calls = [0]

        def commit(self, *args):
            calls[0] += 1
            if calls[0] == 3:  # the save of step 6, its files written, before the rename
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            return original(self, *args)

        monkeypatch.setattr(Checkpointer, "_commit", commit)
        code, first = run(tmp_path, "int")
        monkeypatch.setattr(Checkpointer, "_commit", original)
    err = capsys.readouterr().err.strip()
    ckpt = tmp_path / "ckpt"
    assert code == 130 and err.count("\n") == 0, err
    done = 5 if where == "mid-step" else 6
    assert err == f"interrupted (Ctrl-C) after {done} steps; last checkpoint {ckpt / step_dirname(4)}; run the " \
                  "same command again to resume from it"
    assert not (ckpt / LOCK_NAME).exists()
    code, rest = run(tmp_path, "int-resumed")
    assert code == 0 and rest[0]["step"] == 4 and {m["resumed_from"] for m in rest} == {4}
    assert not any(temp_run(p.name) for p in ckpt.iterdir())
    assert rest[-1]["loss"] == straight[1][-1]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["mid-step", "mid-save"])
def test_sigterm_saves_commits_exits_143_and_resumes_to_the_uninterrupted_loss(straight, tmp_path, capsys,
                                                                               monkeypatch, where):
    if where == "mid-step":
        code, first = run(tmp_path, "term", env={"CURRY_TRAIN_SIGNAL_AT_STEP": "2:TERM"})  # after step 2 (3 done)
        done = 3
    else:
        original = Checkpointer._commit

        def commit(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)  # the save of step 2 finishes regardless
            return original(self, *args)

        monkeypatch.setattr(Checkpointer, "_commit", commit)
        code, first = run(tmp_path, "term")
        monkeypatch.setattr(Checkpointer, "_commit", original)
        done = 2
    err = capsys.readouterr().err.strip()
    ckpt = tmp_path / "ckpt"
    assert code == 143 and err == f"stopped by SIGTERM after {done} steps: saved and committed " \
                                  f"{ckpt / step_dirname(done)}; run the same command again to resume"
    assert [m["step"] for m in first] == list(range(done))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    code, rest = run(tmp_path, "term-resumed")
    assert code == 0 and rest[0]["step"] == done
    assert rest[-1]["loss"] == straight[1][-1]["loss"]


def test_save_on_signal_false_leaves_sigterm_alone(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: seen.append(sig))
    code, _ = run(tmp_path, "plain", "checkpoint.save_on_signal=false", steps=2)
    assert code == 0 and signal.SIGTERM not in seen


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_warned_with_the_lr_it_reaches(tmp_path, capsys):
    code, lines = run(tmp_path, "warm", "train.warmup_steps=6", "checkpoint.every=0", steps=2)
    out = capsys.readouterr().out
    assert code == 0 and "warning: train.warmup_steps=6 is more than train.steps=2: the LR never reaches " \
                         "train.lr=0.003; it peaks at 0.0015 (50% of it) on the last step" in out
    assert lines[-1]["lr"] == pytest.approx(0.0015)
    code, _ = run(tmp_path, "reached", "train.warmup_steps=3", "checkpoint.every=0", steps=2)
    assert code == 0 and "warning: train.warmup_steps" not in capsys.readouterr().out


@pytest.mark.slow
def test_config_errors_are_printed_by_rank_0_only_and_check_validates_without_launching(capsys, monkeypatch,
                                                                                       no_launch):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "train.lr=-1"]) == 2 and capsys.readouterr().err == ""  # torchrun's other ranks: silent
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "train.lr=-1"]) == 2 and capsys.readouterr().err.startswith("error: train.lr must be")
    assert main(["config", "--check", "--world-size", "2", *TINY]) == 0
    assert capsys.readouterr().out == "config ok for world size 2\n"
    assert main(["config", "--check", "--world-size", "3", "parallel.dp=2", *TINY]) == 2
    assert capsys.readouterr().err.startswith("error: parallel")


def _probe_many(directory: str, run: str, times: int, start) -> None:
    from curry_train.primitives.checkpoint_layout import check_writable
    from curry_train.primitives.checkpoint_trust import remove_stale_temporaries

    start.wait()
    if run == "rank0":  # what rank 0's Checkpointer.acquire does while the others probe, over and over
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            remove_stale_temporaries(Path(directory), run)
    for _ in range(times):
        check_writable(Path(directory), "checkpoint.dir", run)


def test_every_rank_probes_the_folder_at_once_without_tripping_over_another(tmp_path):
    """All ranks of a run check ``checkpoint.dir`` before the process group exists, each under its own run id,
    while rank 0's ``acquire`` removes other runs' marked temporaries: a probe removed under a rank is not an error
    (it was 'No such file', seen in CI), and no probe is left behind."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_probe_many, args=(str(tmp_path), run, 3000, start)) for run in ("rank0", "r1", "r2")]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every process imported and waiting
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert list(tmp_path.iterdir()) == []  # every probe removed
