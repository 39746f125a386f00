"""Reading one verified checkpoint directory into a model, optimizer, scheduler and this rank's RNG (``load_one``).

Nothing read here runs code: ``.metadata`` goes through ``checkpoint_trust.SafeReader`` (DCP's metadata classes
only), ``scheduler.pt`` and ``rng-rank*.pt`` through ``torch.load(weights_only=True)``, ``meta.json`` is JSON.
A file that holds anything else fails the load with ``UntrustedPickleError`` / ``UnpicklingError`` (the caller
reports it like any damage).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

from .checkpoint_experts import as_local
from .checkpoint_files import INTEGRITY, quiet_dcp, set_rng_state
from .checkpoint_state import (
    STATE_DICT_OPTIONS, CheckpointMismatchError, check_compatible, training_state,
)
from .checkpoint_trust import SafeReader, load_tensors
from .zero1 import local_optimizers, zero1_wrappers


class CheckpointDamagedError(ValueError):
    """No checkpoint that was asked for (or none of those in ``dir``) passes verification; names each and why."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped, a ``latest`` pointer was stale, an RNG state was missing, or a checkpoint
    without ``integrity.json`` was loaded unverified."""


def load_first_usable(tried: list[Path], verify, load, warn, directory: Path, explicit: bool) -> dict:
    """The ``meta`` of the first of ``tried`` that ``verify`` passes (``None``) and ``load`` reads, with ``skipped``
    (``[(name, reason)]``) added; each one skipped is ``warn``ed (unless ``explicit``: one path asked for); none left
    is ``CheckpointDamagedError`` listing every one. ``CheckpointMismatchError`` (another model) is raised at once."""
    skipped = []
    for candidate in tried:
        reason = verify(candidate)
        if reason is None:
            if not (candidate / INTEGRITY).is_file():
                warn(f"checkpoint {candidate} has no {INTEGRITY}: loading it UNVERIFIED "
                     "(checkpoint.allow_unverified=true); a damaged file goes unnoticed")
            try:
                meta = load(candidate)
            except CheckpointMismatchError:
                raise
            except (Exception, CheckpointException) as e:  # unreadable although it verified, or it would run code
                text = str(e).strip()
                reason = f"loading failed: {type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        if reason is not None:
            skipped.append((candidate.name, reason))
            if not explicit:  # an explicit path is one error below, not a warning too
                later = " trying an older one" if candidate != tried[-1] else ""
                warn(f"checkpoint {candidate} is damaged: {reason}.{later}")
            continue
        meta["skipped"] = skipped
        return meta
    raise CheckpointDamagedError(f"no usable checkpoint in {directory}: " +
                                 "; ".join(f"{name}: {reason}" for name, reason in skipped))


def load_one(path: Path, model, optimizer, scheduler, restore_rng: bool, group, rank: int, world: int,
             distributed: bool) -> tuple[dict, str | None]:
    """Load ``path`` (already verified) into the given objects; returns its ``meta`` (with ``path``,
    ``rng_restored`` and, when not restored, ``rng_note``) and a warning to show (a missing RNG file), or None.
    A model of another shape is ``CheckpointMismatchError`` before anything is loaded."""
    reader = SafeReader(str(path))
    state = training_state(model, optimizer)
    check_compatible(reader.read_metadata(), state["model"], path)
    meta = json.loads((path / "meta.json").read_text())
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise CheckpointMismatchError(f"checkpoint {path} holds no optimizer state; load it with optimizer=None")
    if scheduler is not None and not (path / "scheduler.pt").is_file():
        raise CheckpointMismatchError(f"checkpoint {path} holds no LR scheduler state; load it with scheduler=None")
    scheduler_state = load_tensors(path / "scheduler.pt") if scheduler is not None else None
    rng_file = path / f"rng-rank{rank}.pt"
    rng = load_tensors(rng_file) if restore_rng and meta["world_size"] == world and rng_file.is_file() else None
    with quiet_dcp():
        dcp.load(state, storage_reader=reader, process_group=group, no_dist=not distributed)
    state = as_local(state, model)  # expert-parallel banks: back to this rank's slices
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=STATE_DICT_OPTIONS)
    else:
        set_state_dict(model, local_optimizers(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=STATE_DICT_OPTIONS)
        for zero in zero1_wrappers(optimizer):  # ZeRO-1: the loaded lr etc. back into the wrapper's param groups
            type(zero)._sync_param_groups(zero.optim.param_groups, zero.param_groups)
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
    meta["path"] = str(path)
    meta["rng_restored"] = False
    warning = None
    if not restore_rng:
        meta["rng_note"] = "not requested"
    elif meta["world_size"] != world:
        meta["rng_note"] = (f"saved at world size {meta['world_size']}, loading at {world}: per-rank RNG "
                            f"states skipped (model, optimizer, scheduler and step are resharded exactly)")
    elif rng is not None:
        set_rng_state(rng)
        meta["rng_restored"] = True
    else:
        meta["rng_note"] = (f"{rng_file.name} is missing: this rank's RNG state is not restored, so dropout masks "
                            "and other random draws differ from the original run (model, optimizer and step are "
                            "exact)")
        warning = f"checkpoint {path}: {meta['rng_note']}"
    return meta, warning
