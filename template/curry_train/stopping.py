"""How a training run stops early, each in one line and a known exit code (``__main__.main`` prints them).

* Ctrl-C (SIGINT): ``train`` turns the ``KeyboardInterrupt`` into ``Interrupted``: the step reached, the last
  committed checkpoint, how to resume. Exit 130. A save it cut short leaves a marked temporary that the next run
  removes; ``latest`` still names the last committed checkpoint.
* SIGTERM (the preemption notice of SLURM, Kubernetes, spot instances) with ``checkpoint.save_on_signal`` (default
  on with a ``checkpoint.dir``): ``SigtermWatch`` only notes it; the current step finishes, every rank learns of it
  at the end of the step (one all-reduce of a flag, so a signal that reached one rank stops all of them at the same
  step), the state is saved and committed, and ``Preempted`` says where. Exit 143 (128 + SIGTERM).
  A rank killed outright (SIGKILL) is torchrun's business as before: ``--max-restarts`` resumes from the last
  checkpoint.
* A full disk (``CheckpointDiskFullError``) stops the run with exit 1, or with ``checkpoint.on_disk_full=continue``
  the run goes on without saving (``train_state.step_hook``).
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

SIGINT_EXIT, SIGTERM_EXIT = 130, 143
SIGNAL_ENV = "CURRY_TRAIN_SIGNAL_AT_STEP"  # test hook: "k:INT" or "k:TERM", this process signals itself after step k


class Interrupted(Exception):
    """Ctrl-C: the run stopped; the message is the one line the user sees."""

    exit_code = SIGINT_EXIT


class Preempted(Exception):
    """SIGTERM: the run saved and committed, then stopped; the message is the one line the user sees."""

    exit_code = SIGTERM_EXIT


class SigtermWatch:
    """Note SIGTERM instead of dying (installed only on the main thread; ``restore`` puts the old handler back)."""

    def __init__(self, enabled: bool):
        self.signalled = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.signalled = True

    def agreed(self) -> bool:
        """Collective under a process group: True on every rank if any rank got SIGTERM."""
        flag = self.signalled
        if dist.is_available() and dist.is_initialized():
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def signal_from_env() -> tuple[int, int] | None:
    """``CURRY_TRAIN_SIGNAL_AT_STEP=k:INT|TERM``: (step, signal number); None when unset; bad: ``ValueError``."""
    value = os.environ.get(SIGNAL_ENV)
    if value in (None, ""):
        return None
    step, _, name = value.partition(":")
    if not step.isdigit() or name not in ("INT", "TERM"):
        raise ValueError(f"{SIGNAL_ENV}={value!r} must be STEP:INT or STEP:TERM (test hook: the run signals itself "
                         "after that step)")
    return int(step), signal.SIGINT if name == "INT" else signal.SIGTERM


def interrupted_line(step: int, ckpt) -> str:
    last = ckpt.latest_path() if ckpt is not None else None
    where = f"last checkpoint {last}; run the same command again to resume from it" if last is not None else \
        "no checkpoint saved (set checkpoint.dir and checkpoint.every to make a run resumable)"
    return f"interrupted (Ctrl-C) after {step} steps; {where}"
