"""Expert-parallel banks in a DCP checkpoint: saved as the whole bank, loaded back as this rank's slice.

Under expert parallelism (``moe.Experts`` built with an ``ep_group`` of size ``ep``) rank ``r`` of the group holds
experts ``[r E/ep, (r+1) E/ep)`` of every bank parameter (``w1``, ``w3``, ``w2``: ``[E/ep, ...]``) under the *same*
FQN as every other rank, and so does AdamW's state of it (``exp_avg``, ``exp_avg_sq``). Saved as plain tensors,
DCP's planner would keep one rank's slice of each key (``dedup_save_plans``: one copy per ``(fqn, offset)``) and
record the slice's shape as the global one: the other experts would be lost.

``as_global(state, model)`` therefore presents each such tensor to DCP as
``DTensor.from_local(slice, DeviceMesh.from_group(ep_group), [Shard(0)], shape=[E, ...])``: its chunk is written at
offset ``ep_rank * E/ep`` along dim 0 and ``.metadata`` records the global shape ``[E, ...]``. Ranks of different
ep groups holding the same experts (``dp > ep``) write identical ``(fqn, offset)`` chunks, which DCP's dedup keeps
once, so the checkpoint holds every expert exactly once. The mesh wraps the existing group (no new process group,
no collective). On load the same wrapping tells DCP which rows this rank reads (any ``ep``: DCP reshards,
and a model built with ``ep=1`` reads the full ``[E, ...]`` tensor), and ``as_local`` unwraps the DTensors before
``set_state_dict``. An ``ep=1`` checkpoint (plain ``[E, ...]`` tensors) loads at any ``ep`` the same way.
"""

from __future__ import annotations

import torch


def sharded_banks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Wrapper-free FQN (as ``get_state_dict`` writes it) -> its module, for every expert-parallel bank weight.

    A bank is a module with an ``ep_group`` (not None) and ``n_experts`` (``moe.Experts``; matched by these
    attributes, so this module needs no MoE code): its own parameters (not its submodules', e.g. a shared expert)
    whose dim 0 holds ``n_experts / ep`` experts are this rank's slices."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    banks = {}
    for name, module in model.named_modules():
        group = getattr(module, "ep_group", None)
        if group is None or not isinstance(getattr(module, "n_experts", None), int):
            continue
        n_local = module.n_experts // torch.distributed.get_world_size(group)
        for w, param in module.named_parameters(recurse=False):
            if param.dim() and param.shape[0] == n_local:
                banks[next(iter(_get_fqns(model, f"{name}.{w}" if name else w)))] = module
    return banks


def _global(local: torch.Tensor, experts: torch.nn.Module, meshes: dict):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    key = (id(experts.ep_group), local.device.type)
    if key not in meshes:
        meshes[key] = DeviceMesh.from_group(experts.ep_group, local.device.type)
    shape = torch.Size((experts.n_experts, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()  # contiguous global layout
    return DTensor.from_local(local.contiguous(), meshes[key], [Shard(0)], run_check=False, shape=shape,
                              stride=stride)


def as_global(state: dict, model: torch.nn.Module) -> dict:
    """``state`` (``{"model": ..., "optim": ...}`` of ``training_state``) with every expert-parallel slice, model
    weight and optimizer state of the same shape, as a ``Shard(0)`` DTensor of the whole bank; unchanged without
    expert parallelism."""
    banks = sharded_banks(model)
    if not banks:
        return state
    meshes: dict = {}
    out = dict(state)
    out["model"] = {k: _global(v, banks[k], meshes) if k in banks else v for k, v in state["model"].items()}
    if "optim" in state:
        optim = {}
        for key, value in state["optim"].items():
            fqn = key[len("state."):].rpartition(".")[0] if key.startswith("state.") else None
            local_shape = state["model"][fqn].shape if fqn in banks else None
            if local_shape is not None and isinstance(value, torch.Tensor) and value.shape == local_shape:
                value = _global(value, banks[fqn], meshes)  # exp_avg, exp_avg_sq (not the scalar step)
            optim[key] = value
        out["optim"] = optim
    return out


def as_local(state: dict, model: torch.nn.Module) -> dict:
    """Undo ``as_global`` after ``dcp.load`` filled the DTensors: each becomes this rank's slice again."""
    banks = sharded_banks(model)
    if not banks:
        return state
    out = dict(state)
    out["model"] = {k: v.to_local() if k in banks else v for k, v in state["model"].items()}
    if "optim" in state:
        out["optim"] = {k: v.to_local() if k.startswith("state.") and k[len("state."):].rpartition(".")[0] in banks
                        and hasattr(v, "to_local") else v for k, v in state["optim"].items()}
    return out
