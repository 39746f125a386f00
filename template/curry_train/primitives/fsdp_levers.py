"""The FSDP2 step-time levers of ``DistributedOptimizer.wrap``: their checks, their auto defaults and the
per-unit ``fully_shard`` that applies them (``wrap``'s docstring describes each lever).

``None`` is auto everywhere (the config keys ``parallel.fsdp_*`` default to null): ``resolve_levers`` turns it
into the combination ``python -m curry_train bench sharding`` measures fastest, where the model can take it.
``sharding`` arguments here are already normalised (``distributed_optimizer.normalize_sharding``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FSDP_MODES = ("shard_grad_op", "full")


def resolve_levers(sharding: str, n_blocks: int, prefetch=None, reshard_last=None, blocks_per_unit=None,
                   reshard_after_forward=None) -> dict:
    """The FSDP2 step-time levers with every ``None`` (auto) replaced by its default, the combination ``bench
    sharding`` measures fastest (skill ``primitive-distributed-optimizer``): ``blocks_per_unit=2`` where that
    leaves >= 2 units (>= 4 blocks), ``prefetch=1`` and, under ``full`` with resharding blocks,
    ``reshard_last=True`` where there are >= 2 units (torchtitan keeps the last block gathered too; with one unit
    it would keep the whole model gathered). Non-FSDP2 modes, and a stage or model without blocks,
    get the levers off. Values already given are returned as they are (``check_lever_limits`` checks them)."""
    fsdp = sharding in FSDP_MODES
    if blocks_per_unit is None:
        blocks_per_unit = 2 if fsdp and n_blocks >= 4 else 1
    units = -(-n_blocks // blocks_per_unit)
    if prefetch is None:
        prefetch = 1 if fsdp and units >= 2 else 0
    if reshard_last is None:
        reshard_last = sharding == "full" and units >= 2 and reshard_after_forward is not False
    return {"prefetch": prefetch, "reshard_last": reshard_last, "blocks_per_unit": blocks_per_unit}


def check_lever_limits(n_blocks: int, prefetch=None, blocks_per_unit=None, prefix: str = "") -> None:
    """``blocks_per_unit`` <= ``n_blocks`` and ``prefetch`` <= the FSDP units after the first,
    ``ceil(n_blocks / blocks_per_unit) - 1``; ``prefix`` goes before the names in the message (config keys).
    ``None`` is auto (``resolve_levers``), which always fits."""
    if blocks_per_unit is not None and blocks_per_unit > n_blocks:
        raise ValueError(f"{prefix}blocks_per_unit={blocks_per_unit} exceeds the model's {n_blocks} blocks")
    if prefetch is None:
        return
    per_unit = resolve_levers("full", n_blocks, blocks_per_unit=blocks_per_unit)["blocks_per_unit"]
    units = -(-n_blocks // per_unit)
    if prefetch > units - 1:
        shown = f"{per_unit} (auto)" if blocks_per_unit is None else per_unit
        raise ValueError(f"{prefix}prefetch={prefetch} exceeds the {units - 1} FSDP units that can follow one "
                         f"({n_blocks} blocks, {prefix}blocks_per_unit={shown}): use 0..{units - 1}")


def check_levers(sharding, mixed_precision, reshard_after_forward, prefetch, reshard_last, reduce_dtype,
                  blocks_per_unit, prefix="") -> None:
    """The FSDP2 step-time levers (``wrap``'s docstring): one ``ValueError`` line per bad value, each naming
    ``prefix`` + the argument (``prefix="fsdp_"`` for the ``parallel.fsdp_*`` config keys)."""
    fsdp = sharding in FSDP_MODES
    for name, value, low in (("prefetch", prefetch, 0), ("blocks_per_unit", blocks_per_unit, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{prefix}{name} must be an int >= {low} or None (auto), got {value!r}")
    for name, value, on in (("prefetch", prefetch, (prefetch or 0) > 0),
                            ("blocks_per_unit", blocks_per_unit, (blocks_per_unit or 1) > 1)):
        if on and not fsdp:
            raise ValueError(f"{prefix}{name}={value} applies to FSDP2 shardings {FSDP_MODES}, not {sharding!r}")
    if reshard_last is not None and not isinstance(reshard_last, bool):
        raise ValueError(f"{prefix}reshard_last must be true, false or None (auto), got {reshard_last!r}")
    if reshard_last and (sharding != "full" or reshard_after_forward is False):
        raise ValueError(f"{prefix}reshard_last=True keeps the last block gathered after forward; it applies to "
                         f"sharding='full' with resharding blocks, not sharding={sharding!r}, reshard_after_forward="
                         f"{reshard_after_forward!r} (which already keeps every block gathered)")
    if reduce_dtype not in (None, "fp32", "bf16"):
        raise ValueError(f"reduce_dtype must be one of (None, 'fp32', 'bf16'), got {reduce_dtype!r}")
    if reduce_dtype is not None and not fsdp:
        raise ValueError(f"reduce_dtype applies to FSDP2 shardings {FSDP_MODES}, not {sharding!r}")
    if reduce_dtype == "bf16" and mixed_precision != "bf16":
        raise ValueError("reduce_dtype='bf16' needs mixed_precision='bf16' (gradients already computed in bf16); "
                         f"got mixed_precision={mixed_precision!r}")


def fully_shard_blocks(model, blocks, sharding, mixed_precision, cpu_offload, reshard_after_forward, group, device,
                       mesh=None, *, prefetch=0, reshard_last=False, reduce_dtype=None, blocks_per_unit=1):
    """``fully_shard`` the blocks in units of ``blocks_per_unit`` (the last one kept gathered after forward when
    ``reshard_last``), then the root, over ``mesh`` (or a 1-D mesh over ``group``); wire ``prefetch`` (concrete
    levers: ``resolve_levers`` first)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mesh is None:
        mesh_device = "cuda" if (device.type == "cuda" or (cpu_offload and torch.cuda.is_available())) else "cpu"
        mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, mesh_device)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                               reduce_dtype=torch.bfloat16 if reduce_dtype == "bf16" else torch.float32)
          if mixed_precision == "bf16" else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    block_reshard = (sharding == "full") if reshard_after_forward is None else reshard_after_forward
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    units = [blocks[i:i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    for j, unit in enumerate(units):
        keep = reshard_last and j == len(units) - 1
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=False if keep else block_reshard, **kw)
    # Root (embeddings, final norm, tied head): FSDP2's default for the root is not to reshard after forward,
    # since backward needs it first; under shard_grad_op nothing is resharded after forward.
    fully_shard(model, reshard_after_forward=None if sharding == "full" else False, **kw)
    if prefetch and units:
        heads = [unit[0] for unit in units]  # a unit's modules share one FSDP state
        for i, head in enumerate(heads):
            head.set_modules_to_forward_prefetch(heads[i + 1:i + 1 + prefetch])
            head.set_modules_to_backward_prefetch(heads[max(i - prefetch, 0):i][::-1])
        if mesh.device_type == "cpu":  # no streams: only an async unshard overlaps (wrap's docstring)
            model._set_unshard_async_op(True)
    return model
