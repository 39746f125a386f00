"""Training-run plumbing around the loop: resume, periodic checkpoints, metrics file, fault injection.

* ``prepare_checkpointing(cfg)``: validates ``checkpoint.*`` and checks that ``checkpoint.dir`` is writable; needs
  no process group, so a bad config fails before any rank starts. Returns a ``Checkpointer``, or None without a
  ``checkpoint.dir``.
* ``fault_step_from_env()``: the step of ``CURRY_TRAIN_FAULT_AT_STEP`` (None when unset); a bad value is a
  ``ValueError`` before training.
* ``resume(ckpt, model, optimizer, scheduler, cfg)``: every rank, after the model is parallelized and the
  optimizer and scheduler built over it; loads ``latest`` into them and returns the step to start from (0 when
  there is no checkpoint), warning when the data settings differ from the checkpoint's.
* ``step_hook(...)``: the ``on_step`` callback for ``run_training_steps`` (below).
* ``finish(ckpt)``: every rank, after the last step; waits for an async save still in flight (an unwaited save
  is lost).

``on_step(step, metrics)`` runs after optimizer step ``step`` (0-based), i.e. when ``step + 1`` steps are done:

1. fault injection: with ``CURRY_TRAIN_FAULT_AT_STEP=k``, global rank 1 ``SIGKILL``s itself after step ``k``,
   once per run: it never fires after a torchelastic restart (``TORCHELASTIC_RESTART_COUNT > 0``) nor once the
   marker file ``<checkpoint.dir>/fault-injected-at-step-k`` exists (written before the kill);
2. metrics: rank 0 appends ``{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "attempt"}`` as one
   JSON line to ``train.metrics_file`` (``attempt`` = torchelastic restart count, so a restarted run's
   repeated steps are visible; the last line per step is the one that counts);
3. checkpoint: every ``checkpoint.every`` steps and after the last step, ``ckpt.save(step + 1, ...)`` with
   ``extra = {"data_position": step + 1, ...}``; the data position *is* the step (``data.Batches``).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from . import distributed
from .primitives.checkpoint import Checkpointer

FAULT_ENV = "CURRY_TRAIN_FAULT_AT_STEP"


def prepare_checkpointing(cfg) -> Checkpointer | None:
    """Validate ``checkpoint.*`` and check the directory is writable; None when no ``checkpoint.dir`` is set."""
    c = cfg.checkpoint
    every = c.every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"checkpoint.every must be an integer >= 0 (0 = never save), got {every!r}")
    if c.dir is None:
        if every > 0:
            raise ValueError(f"checkpoint.every={every} needs checkpoint.dir (where to write the checkpoints)")
        return None
    ckpt = Checkpointer.from_config(c)
    ckpt.check_writable()
    return ckpt


def fault_step_from_env() -> int | None:
    value = os.environ.get(FAULT_ENV)
    if value in (None, ""):
        return None
    try:
        step = int(value)
    except ValueError:
        step = -1
    if step < 0:
        raise ValueError(f"{FAULT_ENV}={value!r} must be a non-negative integer step (test hook: rank 1 kills itself)")
    return step


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def data_extra(cfg, next_step: int) -> dict:
    """What the data stream needs to continue: the next step, plus the keys that define the batch order."""
    return {"data_position": next_step, "seed": cfg.seed, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len}


def resume(ckpt: Checkpointer | None, model, optimizer, scheduler, cfg) -> int:
    """Load ``checkpoint.dir``'s latest complete checkpoint if there is one; return the step to start from."""
    if ckpt is None:
        return 0
    meta = ckpt.load(model, optimizer, scheduler)
    if meta is None:
        return 0
    extra = meta.get("extra", {})
    start = int(extra.get("data_position", meta["step"]))
    if distributed.rank() == 0:
        note = "RNG restored" if meta["rng_restored"] else meta.get("rng_note", "")
        print(f"resumed from {meta['path']} at step {start} ({note})", flush=True)
        changed = {k: (extra[k], v) for k, v in data_extra(cfg, start).items() if k in extra and extra[k] != v}
        if changed:
            print(f"warning: data settings changed since the checkpoint (saved, now): {changed}; "
                  f"the batches after step {start} differ from the original run's", flush=True)
    return start


def _inject_fault(cfg, step: int) -> None:
    marker = Path(str(cfg.checkpoint.dir)) / f"fault-injected-at-step-{step}" if cfg.checkpoint.dir else None
    if restart_count() > 0 or (marker is not None and marker.exists()):
        return
    if marker is not None:
        with open(marker, "w") as f:
            f.write(f"rank {distributed.rank()} pid {os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())
    print(f"[fault injection] rank {distributed.rank()} SIGKILLs itself after step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def step_hook(cfg, ckpt: Checkpointer | None, model, optimizer, scheduler, fault_step: int | None = None):
    """The ``on_step(step, metrics)`` callback for ``run_training_steps`` (see the module docstring)."""
    rank = distributed.rank()
    every, total = cfg.checkpoint.every, cfg.train.steps
    metrics_file = cfg.train.metrics_file
    if metrics_file and rank == 0:
        Path(str(metrics_file)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    attempt = restart_count()

    def on_step(step: int, metrics: dict) -> None:
        if fault_step is not None and step == fault_step and rank == 1:
            _inject_fault(cfg, step)
        if metrics_file and rank == 0:
            with open(Path(str(metrics_file)).expanduser(), "a") as f:
                f.write(json.dumps({**metrics, "attempt": attempt}) + "\n")
        if ckpt is not None:
            ckpt.poll()
            done = step + 1
            if every > 0 and (done % every == 0 or done == total):
                ckpt.save(done, model, optimizer, scheduler, extra=data_extra(cfg, done))

    return on_step


def finish(ckpt: Checkpointer | None) -> None:
    if ckpt is not None:
        ckpt.close()
