"""Training-run plumbing around the loop: resume, periodic checkpoints, metrics file, fault injection.

* ``prepare_checkpointing(cfg)``: validates ``checkpoint.*``; rank 0 takes the folder's lock (a second run on it is
  one line naming the holder), removes the marked temporaries of runs that are over (a killed save that filled the
  disk included), then every rank checks that ``checkpoint.dir`` is writable. Needs no process group, so a bad
  config fails before any rank starts. Returns a ``Checkpointer``, or None without a ``checkpoint.dir``.
* ``fault_step_from_env()``: the step of ``CURRY_TRAIN_FAULT_AT_STEP`` (None when unset); a bad value is a
  ``ValueError`` before training.
* ``corrupt_steps_from_env()`` / ``CorruptedBatches``: ``CURRY_TRAIN_CORRUPT_STEPS=a-b`` corrupts the data of steps
  ``a..b`` (every target becomes token 0): a test hook that makes the loss spike (``train.spike.*``).
* ``resume(ckpt, model, optimizer, scheduler, cfg)``: every rank, after the model is parallelized and the
  optimizer and scheduler built over it; loads the newest checkpoint that verifies into them (damaged ones are
  skipped with a warning naming the file: ``Checkpointer.load``) and returns the step to start from (0 when there
  is no checkpoint). Honest resume: every setting that differs from the checkpoint's saved config is printed with
  what happens to it (``RESUME_POLICY``); the optimizer's hyperparameters (``train.lr``, ``weight_decay``,
  ``beta1``, ``beta2``) are the *current* config's from the resumed step on (the saved optimizer state would
  otherwise keep the old ones silently), the LR schedule follows the current ``warmup_steps``/``min_lr_ratio``/
  ``steps``; a checkpoint beyond ``train.steps`` is refused with one line.
* ``step_hook(...)``: the ``on_step`` callback for ``run_training_steps`` (below).
* ``finish(ckpt)``: every rank, after the last step; waits for an async save still in flight (an unwaited save
  is lost).

``on_step(step, metrics)`` runs after optimizer step ``step`` (0-based), i.e. when ``step + 1`` steps are done:

1. fault injection: with ``CURRY_TRAIN_FAULT_AT_STEP=k``, global rank 1 ``SIGKILL``s itself after step ``k``,
   once per run: it never fires after a torchelastic restart (``TORCHELASTIC_RESTART_COUNT > 0``) nor once the
   marker file ``<checkpoint.dir>/fault-injected-at-step-k`` exists (written before the kill);
2. metrics: rank 0 appends ``{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "attempt"}`` as one
   JSON line to ``train.metrics_file`` (``attempt`` = torchelastic restart count, so a restarted run's
   repeated steps are visible; a resumed run's rows carry ``"resumed_from": N``: they replace the earlier rows of
   steps >= N; the last line per step is the one that counts);
3. checkpoint: every ``checkpoint.every`` steps and after the last step, ``ckpt.save(step + 1, ...)`` with
   ``extra = {"data_position": step + 1, "config": ...}``; the data position *is* the step (``data.Batches``).
   A step the non-finite guard skipped is not saved (only states after an applied, finite update are), nor one
   taken while a loss spike is in progress (``train.spike.enabled``; the watchdog's state goes into ``extra``).
   A full disk (``CheckpointDiskFullError``) ends the run, or with ``checkpoint.on_disk_full=continue`` is
   printed once and the run goes on without saving;
4. SIGTERM (``stopping.SigtermWatch``, ``checkpoint.save_on_signal``): the step is saved (if the cadence did not
   just save it), committed, and ``stopping.Preempted`` ends the run.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from . import distributed
from .primitives.checkpoint import Checkpointer, CheckpointDiskFullError
from .stopping import Preempted

FAULT_ENV = "CURRY_TRAIN_FAULT_AT_STEP"
CORRUPT_ENV = "CURRY_TRAIN_CORRUPT_STEPS"


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
    if int(os.environ.get("RANK", "0") or 0) == 0:
        ckpt.acquire()  # one owner; a dead run's temporaries go before the probe (they may be what fills the disk)
    try:
        ckpt.check_writable()
    except ValueError:
        ckpt.release()
        raise
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


def corrupt_steps_from_env() -> tuple[int, int] | None:
    """``CURRY_TRAIN_CORRUPT_STEPS=a-b`` (or ``a``): the data steps ``a..b`` whose batches ``corrupt_batches``
    spoils (a test hook that makes the loss spike); None when unset; a bad value is a ``ValueError`` before training."""
    value = os.environ.get(CORRUPT_ENV)
    if value in (None, ""):
        return None
    first, _, last = value.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        a = b = -1
    if a < 0 or b < a:
        raise ValueError(f"{CORRUPT_ENV}={value!r} must be a step a or a range a-b of steps, 0 <= a <= b (test hook: "
                         "those steps' batches are corrupted)")
    return a, b


class CorruptedBatches:
    """``batches`` with the steps ``a..b`` corrupted: every valid target (not -100) of those micro-batches becomes
    token id 0 (a NUL byte for the byte-level GPT, never in text; a special token for most tokenizers): a data bug
    that makes the loss spike and whose update pulls the model towards it. The rest is ``batches``' own."""

    def __init__(self, batches, steps: tuple[int, int]):
        self.batches, self.steps = batches, steps

    def microbatches(self, step: int, *args, **kwargs):
        micro = self.batches.microbatches(step, *args, **kwargs)
        if not self.steps[0] <= step <= self.steps[1]:
            return micro
        return [(x, torch.where(y != -100, torch.zeros_like(y), y)) for x, y in micro]

    def __getattr__(self, name):
        return getattr(self.batches, name)


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def data_extra(cfg, next_step: int) -> dict:
    """What resuming needs besides the tensors: the next step (the data stream continues there) and the config."""
    from omegaconf import OmegaConf

    return {"data_position": next_step, "config": OmegaConf.to_container(cfg, resolve=True)}


APPLIED = ("train.lr", "train.weight_decay", "train.beta1", "train.beta2")
RESUME_POLICY = {  # key prefix -> what a changed value does on resume
    **{k: "applied from the resumed step (replaces the checkpoint's optimizer value)" for k in APPLIED},
    "train.warmup_steps": "the LR schedule follows the new value from the resumed step",
    "train.min_lr_ratio": "the LR schedule follows the new value from the resumed step",
    "train.steps": "the LR schedule follows the new value from the resumed step",
    "seed": "the batches after the resumed step differ from the original run's",
    "data.": "the batches after the resumed step differ from the original run's",
    "train.batch_size": "the batches after the resumed step differ from the original run's",
    "train.seq_len": "the batches after the resumed step differ from the original run's",
    "parallel.": "resharded on load (model, optimizer and step exact)",
}


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def config_changes(saved: dict, cfg) -> list[tuple[str, object, object, str]]:
    """``(key, saved, now, what happens)`` for every setting that differs from the checkpoint's config."""
    from omegaconf import OmegaConf

    before, now = _flatten(saved), _flatten(OmegaConf.to_container(cfg, resolve=True))
    changes = []
    for key in sorted(set(before) | set(now)):
        if before.get(key, "<absent>") != now.get(key, "<absent>"):
            policy = next((v for k, v in RESUME_POLICY.items() if key == k or (k.endswith(".") and key.startswith(k))),
                          "takes effect from the resumed step")
            changes.append((key, before.get(key, "<absent>"), now.get(key, "<absent>"), policy))
    return changes


def apply_optimizer_settings(optimizer, scheduler, cfg) -> None:
    """Put the current ``train.lr``/``weight_decay``/``beta1``/``beta2`` into the loaded optimizer and schedule."""
    t = cfg.train
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = t.lr
        if group.get("weight_decay", 0.0):  # the no-decay group (biases, norms) stays at 0
            group["weight_decay"] = t.weight_decay
        if "betas" in group:
            group["betas"] = (t.beta1, t.beta2)
        group["lr"] = t.lr * scheduler.lr_lambdas[min(i, len(scheduler.lr_lambdas) - 1)](scheduler.last_epoch)
    scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def resume(ckpt: Checkpointer | None, model, optimizer, scheduler, cfg, watchdog=None) -> int:
    """Load ``checkpoint.dir``'s newest intact checkpoint if there is one; return the step to start from.
    ``watchdog`` (``LossSpikeWatchdog``, ``train.spike.enabled``) gets the state saved with it, if any."""
    if ckpt is None:
        return 0
    meta = ckpt.load(model, optimizer, scheduler)
    if meta is None:
        return 0
    extra = meta.get("extra", {})
    start = int(extra.get("data_position", meta["step"]))
    if start > cfg.train.steps:
        raise ValueError(f"train.steps={cfg.train.steps} but the checkpoint {meta['path']} is at step {start}: "
                         f"raise train.steps, or use another checkpoint.dir")
    apply_optimizer_settings(optimizer, scheduler, cfg)
    if watchdog is not None and "loss_spike" in extra:
        watchdog.load_state_dict(extra["loss_spike"])
    if distributed.rank() == 0:
        note = "RNG restored" if meta["rng_restored"] else meta.get("rng_note", "")
        skipped = "".join(f"; skipped damaged {name} ({reason})" for name, reason in meta["skipped"])
        print(f"resumed from {meta['path']} at step {start} ({note}){skipped}", flush=True)
        if "config" not in extra:
            print("warning: this checkpoint records no config (an older curry_train): changed settings cannot be "
                  "listed; the optimizer takes the current train.lr/weight_decay/beta1/beta2", flush=True)
        for key, before, now, policy in config_changes(extra.get("config", {}), cfg) if "config" in extra else []:
            print(f"resume: {key} changed {before!r} -> {now!r}: {policy}", flush=True)
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


def step_hook(cfg, ckpt: Checkpointer | None, model, optimizer, scheduler, fault_step: int | None = None,
              watchdog=None, resumed_from: int = 0, sigterm=None, signal_at: tuple[int, int] | None = None):
    """The ``on_step(step, metrics)`` callback for ``run_training_steps`` (see the module docstring). With a
    ``watchdog`` (``LossSpikeWatchdog``) its state goes into each checkpoint's ``extra["loss_spike"]``, and no
    checkpoint is taken while a spike is in progress (``metrics["spike"]``): a rollback must never land in one.
    ``sigterm``: a ``stopping.SigtermWatch``; ``signal_at``: ``stopping.signal_from_env()`` (test hook).
    ``on_step.done`` is the number of steps finished so far."""
    rank = distributed.rank()
    every, total = cfg.checkpoint.every, cfg.train.steps
    metrics_file = cfg.train.metrics_file
    if metrics_file and rank == 0:
        Path(str(metrics_file)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    attempt = restart_count()
    mark = {"resumed_from": resumed_from} if resumed_from else {}
    saving = [ckpt is not None]  # False once a full disk was met with checkpoint.on_disk_full=continue

    def save(done: int) -> bool:
        extra = data_extra(cfg, done)
        if watchdog is not None:
            extra["loss_spike"] = watchdog.state_dict()
        try:
            ckpt.save(done, model, optimizer, scheduler, extra=extra)
            return True
        except CheckpointDiskFullError as e:
            if cfg.checkpoint.on_disk_full != "continue":
                raise
            saving[0] = False
            if rank == 0:
                print(f"warning: {e}; checkpoint.on_disk_full=continue: training on WITHOUT checkpoints", flush=True)
            return False

    def on_step(step: int, metrics: dict) -> None:
        done = on_step.done = step + 1
        if fault_step is not None and step == fault_step and rank == 1:
            _inject_fault(cfg, step)
        if metrics_file and rank == 0:
            with open(Path(str(metrics_file)).expanduser(), "a") as f:
                f.write(json.dumps({**metrics, "attempt": attempt, **mark}) + "\n")
        if signal_at is not None and step == signal_at[0]:
            os.kill(os.getpid(), signal_at[1])
        savable = not metrics.get("skipped") and not metrics.get("spike")
        saved = False
        if saving[0]:
            ckpt.poll()
            if every > 0 and (done % every == 0 or done == total) and savable:
                saved = save(done)
        if sigterm is not None and sigterm.agreed():
            if saving[0] and savable and not saved:
                saved = save(done)
            if ckpt is not None:
                ckpt.close()
            last = ckpt.latest_path() if ckpt is not None else None
            what = f"saved and committed {last}" if saved else f"last checkpoint {last or 'none'}"
            raise Preempted(f"stopped by SIGTERM after {done} steps: {what}; run the same command again to resume")

    on_step.done = resumed_from
    return on_step


def finish(ckpt: Checkpointer | None) -> None:
    if ckpt is not None:
        ckpt.close()
