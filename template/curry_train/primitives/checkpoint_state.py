"""What a checkpoint holds: ``training_state`` (model + optimizer through ``get_state_dict``) and the shape check a
load runs first (``check_compatible``).

Keys are plain FQNs with no wrapper prefixes (DDP ``module.``, FSDP, ``_checkpoint_wrapped_module.``), DTensor
shards keep their global shapes, the optimizer state is flattened per parameter FQN (so pipeline stages and ZeRO-1
partitions save their own part), and expert-parallel bank slices become ``Shard(0)`` DTensors of the whole bank
(``checkpoint_experts``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

from .checkpoint_experts import as_global
from .zero1 import local_optimizers, zero1_wrappers


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model's (different shape, missing or unexpected keys)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# Optimizer state flattened to one entry per parameter FQN, hyperparameters included
# (``state.blocks.0.attn.qkv.weight.exp_avg``, ``param_groups.blocks.0.attn.qkv.weight.lr``): under pipeline
# parallelism every rank holds different parameters, and the nested form's single ``param_groups`` list would
# be deduplicated to one rank's copy (torchtitan does the same for PP).
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def training_state(model, optimizer=None) -> dict:
    """``{"model": ..., "optim": ...}`` from ``get_state_dict``: wrapper-free FQNs, DTensor shards for FSDP2, and
    expert-parallel bank slices (and their optimizer state) as ``Shard(0)`` DTensors of the whole bank
    (``checkpoint_experts.as_global``; ``as_local`` turns them back into slices after a load).

    The optimizer state comes from the plain optimizers that hold this rank's part (``zero1.local_optimizers``):
    ZeRO-1 (``ZeroRedundancyOptimizer``, which ``get_state_dict`` cannot read) keeps each parameter's state on one
    rank, in a plain optimizer (``.optim``) over that rank's parameters, checkpointed like a pipeline stage's: FQN
    keys, union over ranks, re-partitioned at any world size; under expert parallelism two of them
    (``zero1.ShardedOptimizers``: dense and expert partitions), read as one list."""
    if optimizer is None:
        return as_global({"model": get_model_state_dict(model, options=STATE_DICT_OPTIONS)}, model)
    for zero in zero1_wrappers(optimizer):  # it copies lr etc. to its inner optimizer only at step(): copy them now
        type(zero)._sync_param_groups(zero.param_groups, zero.optim.param_groups)
    msd, osd = get_state_dict(model, local_optimizers(optimizer), options=STATE_DICT_OPTIONS)
    return as_global({"model": msd, "optim": osd}, model)


def check_compatible(metadata, model_state: dict, path, limit: int = 5) -> None:
    """Compare the checkpoint's tensor shapes with the model's *before* loading; raise listing the first mismatches.

    Under pipeline parallelism each rank holds part of the model, so the model side is the union of every
    rank's keys. ``dcp.load`` itself would silently keep missing keys (or fail deep inside planning).
    """
    ours = {k: list(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    if _distributed():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, ours)
        ours = {k: v for d in everyone for k, v in d.items()}
    theirs = {k[len("model."):]: list(getattr(m, "size", [])) for k, m in metadata.state_dict_metadata.items()
              if k.startswith("model.") and hasattr(m, "size")}
    shape = [f"{k}: checkpoint {theirs[k]} vs model {ours[k]}" for k in ours if k in theirs and theirs[k] != ours[k]]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    if shape or missing or unexpected:
        parts = []
        if shape:
            parts.append(f"{len(shape)} shape mismatch(es), first: " + "; ".join(shape[:limit]))
        if missing:
            parts.append(f"{len(missing)} model key(s) missing from the checkpoint, first: {missing[:limit]}")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint key(s) not in the model, first: {unexpected[:limit]}")
        raise CheckpointMismatchError(f"checkpoint {path} does not match the model (nothing was loaded): " + " | ".join(parts))
