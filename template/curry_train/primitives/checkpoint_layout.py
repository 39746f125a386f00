"""The directory ``Checkpointer`` keeps: names, the ``latest`` pointer, and the atomic moves between them.

``step-00000010/`` is a complete checkpoint (``.metadata`` inside), ``latest`` names the newest committed step
directory, ``.curry-train~<run>~*`` (``checkpoint_trust.temp_name``) is a save in progress, a crashed one, a pruned
checkpoint being deleted or a ``latest`` being written, by run ``<run>``. Every change is a rename of something
already fsynced, followed by an fsync of the directory holding it: a crash at any point leaves either the old state
or the new one. Nothing here deletes a name it did not make (``remove_stale_temporaries``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint_files import fsync_path
from .checkpoint_trust import remove_stale_temporaries, temp_name

LATEST = "latest"
STEP_PREFIX = "step-"


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path) -> int | None:
    """The step a ``step-N`` directory name holds; None for any other name."""
    name = Path(path).name
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def complete_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` (renamed into place: ``.metadata`` inside), ascending."""
    if not directory.is_dir():
        return []
    return sorted(step_of(p) for p in directory.iterdir() if step_of(p) is not None and (p / ".metadata").is_file())


def check_writable(directory: Path, name: str, run: str) -> None:
    """Create ``directory`` and write/remove a probe file, one per process; ``ValueError`` naming ``name`` if that
    fails. Every rank probes at once, before the process group, each under its own run id, while rank 0's
    ``Checkpointer.acquire`` removes other runs' marked temporaries: a probe already removed is fine (it was
    written)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / temp_name(run, f"write-test-{os.getpid()}")
        probe.write_bytes(b"ok")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise ValueError(f"{name}={str(directory)!r} is not writable: {e}") from None


def read_pointer(directory: Path) -> tuple[int | None, str | None]:
    """The step ``latest`` names (None without a usable pointer) and, for an unusable one, why."""
    pointer = directory / LATEST
    if not pointer.is_file():
        return None, None
    name = pointer.read_text(errors="replace").strip()
    if step_of(name) is not None and (directory / name).is_dir():
        return step_of(name), None
    return None, f"{pointer} names {name[:60]!r}, which is not a checkpoint directory"


def latest_complete(directory: Path) -> Path | None:
    """The directory ``latest`` names; if that is missing or dangling, the newest complete step directory."""
    step, _ = read_pointer(directory)
    named = directory / step_dirname(step) if step is not None else None
    if named is not None and (named / ".metadata").is_file() and (named / "meta.json").is_file():
        return named
    steps = complete_steps(directory)
    return directory / step_dirname(steps[-1]) if steps else None


def resume_candidates(directory: Path) -> list[Path]:
    """Where a resume looks, newest first: every step directory up to the one ``latest`` names (all of them
    without a usable pointer; later ones are an abandoned timeline, left from before a rollback), complete or
    not, so a damaged one is named rather than passed over."""
    if not directory.is_dir():
        return []
    found = sorted((step_of(p) for p in directory.iterdir() if p.is_dir() and step_of(p) is not None), reverse=True)
    latest, _ = read_pointer(directory)
    return [directory / step_dirname(s) for s in found if latest is None or s <= latest]


def rename_into_place(tmp: Path, final: Path, run: str) -> None:
    """``tmp`` (complete, fsynced) becomes ``final``, replacing an earlier copy of the same step (a re-save after
    a rollback) without a moment in which neither exists."""
    fsync_path(tmp)
    if final.exists():
        old = final.parent / temp_name(run, f"old-{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


def point_latest(final: Path, run: str) -> None:
    """Make ``latest`` name ``final`` (write a marked temporary, fsync, ``os.replace``, fsync the directory)."""
    directory = final.parent
    pointer_tmp = directory / temp_name(run, LATEST)
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, directory / LATEST)
    fsync_path(directory)


def prune(directory: Path, keep_last: int, latest_step: int, run: str) -> list[Path]:
    """Keep the checkpoint ``latest`` names and the ``keep_last - 1`` complete ones before it (``keep_last`` 0: all);
    checkpoints *after* it (an abandoned timeline, from before a rollback) are never touched. The rest are renamed
    to a marked ``purge-step-N`` temporary of ``run`` (out of sight at once, atomically) and returned for the caller
    to delete. Marked leftovers of other runs (killed saves) are removed first: call it only holding the lock."""
    remove_stale_temporaries(directory, run)
    if keep_last == 0:
        return []
    older = [s for s in complete_steps(directory) if s <= latest_step]
    doomed = []
    for s in older[:-keep_last]:
        if s != latest_step:
            doomed.append(directory / temp_name(run, f"purge-{step_dirname(s)}"))
            os.replace(directory / step_dirname(s), doomed[-1])
    return doomed
