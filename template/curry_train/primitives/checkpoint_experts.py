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

Under FSDP2 each slice is itself sharded: the bank parameter (and its AdamW state) is a ``Shard(0)`` DTensor of the
``[E/ep, ...]`` slice over the ranks holding the same experts (``ParallelState.expert_fsdp_mesh``, size ``m``),
whose local tensor is chunk ``d`` of the slice. That chunk is presented as a DTensor of the whole bank on the 2-D
mesh ``(ep, m)`` with placements ``[Shard(0), Shard(0)]`` (dim 0 split over ep, each piece split over m, as
``torch.chunk`` splits: FSDP2's own chunking), so every rank writes its own rows once. The 2-D mesh wraps the two
existing groups; its row ``e`` is the inner mesh of the ep group's rank ``e`` (one ``all_gather_object`` over the
ep group per save or load). ``as_local`` gives the loaded chunk back the parameter's own FSDP2 placement.
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


def _mesh(experts: torch.nn.Module, inner, device_type: str, meshes: dict):
    """The ep group's 1-D mesh, or with ``inner`` (a 1-D FSDP2 mesh over the ranks holding the same experts) the
    2-D ``(ep, inner)`` mesh of the module docstring."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    inner_ranks = None if inner is None else tuple(inner.mesh.flatten().tolist())
    key = (id(experts.ep_group), inner_ranks, device_type)
    if key not in meshes:
        if inner is None:
            meshes[key] = DeviceMesh.from_group(experts.ep_group, device_type)
        else:  # every rank of the ep group holds banks of the same layers, so each gathers the same number of times
            grid = [None] * dist.get_world_size(experts.ep_group)
            dist.all_gather_object(grid, list(inner_ranks), group=experts.ep_group)
            meshes[key] = DeviceMesh.from_group([experts.ep_group, inner.get_group()], device_type, grid,
                                                mesh_dim_names=("ep", "expert_fsdp"))
    return meshes[key]


def _global(value: torch.Tensor, experts: torch.nn.Module, meshes: dict):
    from torch.distributed.tensor import DTensor, Shard

    inner = None
    if isinstance(value, DTensor):  # FSDP2: chunk d of this rank's slice
        if value.device_mesh.ndim != 1 or tuple(value.placements) != (Shard(0),):
            raise ValueError(f"an expert-parallel bank sharded as {value.placements} over a {value.device_mesh.ndim}"
                             "-D mesh: checkpoints take Shard(0) over one mesh dim (FSDP2's)")
        inner, value = value.device_mesh, value.to_local()
    mesh = _mesh(experts, inner, value.device.type, meshes)
    shape = torch.Size((experts.n_experts, *value.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()  # contiguous global layout
    return DTensor.from_local(value.contiguous(), mesh, [Shard(0)] * mesh.ndim, run_check=False, shape=shape,
                              stride=stride)


def _local(value, param):
    """A loaded ``_global`` DTensor back to what ``param`` (the bank parameter) holds: its FSDP2 placement, or the
    plain slice."""
    from torch.distributed.tensor import DTensor

    local = value.to_local()
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


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
    """Undo ``as_global`` after ``dcp.load`` filled the DTensors: each becomes this rank's slice again (under FSDP2,
    the slice's ``Shard(0)`` DTensor over the expert-dp mesh, as the parameter is)."""
    banks = sharded_banks(model)
    if not banks:
        return state

    def param(fqn):
        return getattr(banks[fqn], fqn.rpartition(".")[2])

    out = dict(state)
    out["model"] = {k: _local(v, param(k)) if k in banks else v for k, v in state["model"].items()}
    if "optim" in state:
        optim = {}
        for k, v in state["optim"].items():
            fqn = k[len("state."):].rpartition(".")[0] if k.startswith("state.") else None
            optim[k] = _local(v, param(fqn)) if fqn in banks and hasattr(v, "to_local") else v
        out["optim"] = optim
    return out
