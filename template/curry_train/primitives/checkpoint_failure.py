"""A save that failed, said in one line: what each rank reports (``info``) and the error every rank raises (``error``).

A full disk (ENOSPC/EDQUOT anywhere in a rank's error, or less than 1 MiB free when it failed: ``torch.save``'s
zip writer reports a short write as ``unexpected pos``, without the errno) is ``CheckpointDiskFullError`` naming the
folder, the bytes the checkpoint needs (its tensors, summed over the ranks) and the bytes free, and saying that the
partial directory was removed and which committed checkpoints are kept.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .checkpoint_layout import step_dirname
from .checkpoint_trust import CheckpointDiskFullError, human_bytes, is_disk_full

NEARLY_FULL = 1 << 20


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict; DTensors count their local shard."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def info(error: BaseException | None, state) -> tuple | None:
    """What this rank tells the others: None (its part went fine) or ``(type, first line, disk full?, its bytes)``."""
    if error is None:
        return None
    return type(error).__name__, _first_line(error), is_disk_full(error), state_bytes(state)


def free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def error(step: int, directory: Path, infos: list, free: int | None, kept: list[int], own: BaseException | None,
          rank: int) -> Exception:
    """The exception this rank raises for a failed save of ``step`` (``infos``: every reporting rank's ``info``)."""
    failed = [(r, i) for r, i in enumerate(infos) if i is not None]
    kept_names = ", ".join(step_dirname(s) for s in kept) or "none"
    if any(i[2] for _, i in failed) or (free is not None and free < NEARLY_FULL):
        needed = sum(i[3] for _, i in failed) * max(1, len(infos) // len(failed))
        free_text = human_bytes(free) if free is not None else "an unknown amount"
        return CheckpointDiskFullError(
            f"disk full: saving step {step} to checkpoint.dir={str(directory)!r} needs about {human_bytes(needed)} "
            f"and {free_text} is free; the partial {step_dirname(step)} was removed, committed checkpoints kept: "
            f"{kept_names}")
    if own is not None:
        return own
    r, (kind, line, _, _) = failed[0]
    return RuntimeError(f"saving step {step} failed on rank {r}: {kind}: {line}; the partial {step_dirname(step)} "
                        f"was removed, committed checkpoints kept: {kept_names}")


def attempt(fn, *args):
    """``(fn(*args), None)``, or ``(None, the exception)``."""
    try:
        return fn(*args), None
    except Exception as e:
        return None, e


def first_bad(verdicts: list) -> str | None:
    """The first rank's ``_nonfinite`` answer (named with its rank when there are several), else None."""
    named = [(f"{b} (rank {r})" if len(verdicts) > 1 else b) for r, b in enumerate(verdicts) if b is not None]
    return named[0] if named else None


def timed(fn, *args):
    clock = time.perf_counter()
    return fn(*args), time.perf_counter() - clock
