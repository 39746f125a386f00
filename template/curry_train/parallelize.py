"""Apply parallelisms to a freshly built model, in one fixed, documented order.

Order (torchtitan's): recompute (activation checkpointing) -> ``torch.compile`` -> data-parallel sharding.

1. ``train.recompute`` (``false`` | ``true`` = ``full`` | ``full`` | ``selective``) every ``train.recompute_every_n``-th
   block (``primitives.recompute``). It goes first so that the compiled graph contains the checkpoint
   boundaries and FSDP wraps blocks that already recompute (the reverse order is an error).
2. ``train.compile``: ``block.compile()`` on each transformer block, in place (no ``_orig_mod.`` in
   parameter names). Per block, as torchtitan does: blocks share one compiled graph.
3. ``parallel.sharding`` (``no_shard`` | ``zero1`` | ``shard_grad_op`` | ``full``), ``parallel.mixed_precision``,
   ``parallel.cpu_offload``: ``DistributedOptimizer`` (DDP, DDP + ZeRO-1, FSDP2). In one process without
   torch.distributed, ``no_shard`` leaves the model as it is and the other modes are an error saying to use torchrun.

``config.validate`` finds every error of these keys before a process group exists.
Returns ``(model, dist_opt)``. Build the optimizer on the returned model, then pass it through
``dist_opt.shard_optimizer(optimizer)`` (ZeRO-1 swaps in ``ZeroRedundancyOptimizer``; a no-op otherwise).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .primitives.distributed_optimizer import DistributedOptimizer
from .primitives.recompute import apply_recompute_from_config, transformer_blocks


def parallelize(model: torch.nn.Module, cfg, dp_group=None) -> tuple[torch.nn.Module, DistributedOptimizer]:
    """``cfg``: the full config (reads ``cfg.train.recompute``, ``recompute_every_n``, ``compile`` and ``cfg.parallel``)."""
    t, p = cfg.train, cfg.parallel
    apply_recompute_from_config(model, t, "recompute", "recompute_every_n")
    if getattr(t, "compile", False):
        blocks = transformer_blocks(model)
        for block in blocks or [model]:
            block.compile()
    dist_opt = DistributedOptimizer.from_config(p, model, process_group=dp_group, optimizer_class=None)
    return dist_opt.model, dist_opt
