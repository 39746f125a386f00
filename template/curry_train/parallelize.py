"""Apply parallelisms to a freshly built model, or to one pipeline stage, in one fixed, documented order.

Order (torchtitan's): recompute (activation checkpointing) -> ``torch.compile`` -> data-parallel sharding.

1. ``train.recompute`` (``false`` | ``true`` = ``full`` | ``full`` | ``selective``) every ``train.recompute_every_n``-th
   block (``primitives.recompute``). It goes first so that the compiled graph contains the checkpoint
   boundaries and FSDP wraps blocks that already recompute (the reverse order is an error).
2. ``train.compile``: ``block.compile()`` on each transformer block, in place (no ``_orig_mod.`` in
   parameter names). Per block, as torchtitan does: blocks share one compiled graph.
3. ``parallel.sharding`` (``no_shard`` | ``zero1`` | ``shard_grad_op`` | ``full``), ``parallel.mixed_precision``,
   ``parallel.cpu_offload``: ``DistributedOptimizer`` (DDP, DDP + ZeRO-1, FSDP2). In one process without
   torch.distributed, ``no_shard`` leaves the model as it is and the other modes are an error saying to use torchrun.

Blocks, in all three steps, are what ``primitives.blocks.find_blocks`` finds (or instances of ``block_types``).

A pipeline stage (``pipeline_stage=True``, e.g. a ``model.GPTStage``: its blocks in the ``nn.ModuleDict``
``blocks``) goes through steps 1 and 2 like the whole model: ``recompute_every_n`` counts the stage's blocks, and a
stage holding no block (``layers_per_stage`` with a 0) is left as it is. Step 3 is not applied (see the comment in
``parallelize``): under pipeline parallelism ``parallel.sharding`` must be ``no_shard``, and ``loop.accumulate_gradients``
averages the stage gradients over ``dp_group`` once per optimizer step.

``config.validate`` finds every error of these keys before a process group exists.
Returns ``(model, dist_opt)``, ``dist_opt`` None for a pipeline stage. Build the optimizer on the returned model,
then pass it through ``dist_opt.shard_optimizer(optimizer)`` (ZeRO-1 swaps in ``ZeroRedundancyOptimizer``; a no-op
otherwise).
"""

from __future__ import annotations

import torch

from .primitives.blocks import find_blocks
from .primitives.distributed_optimizer import DistributedOptimizer
from .primitives.recompute import apply_recompute_from_config


def parallelize(model: torch.nn.Module, cfg, dp_group=None, *, pipeline_stage: bool = False, block_types=None
                ) -> tuple[torch.nn.Module, DistributedOptimizer | None]:
    """``cfg``: the full config (reads ``cfg.train.recompute``, ``recompute_every_n``, ``compile`` and ``cfg.parallel``).
    ``block_types``: the model's block classes, when ``primitives.blocks.find_blocks`` cannot find them."""
    t, p = cfg.train, cfg.parallel
    blocks = find_blocks(model, block_types)
    if blocks or not pipeline_stage:  # a whole model without blocks gets NoBlocksError naming block_types
        apply_recompute_from_config(model, t, "recompute", "recompute_every_n", block_types)
        if getattr(t, "compile", False):
            for block in blocks or [model]:
                block.compile()
    if pipeline_stage:
        # Not wrapped in DDP: PipelineStage reduces a DDP stage's gradients in the backward of each train_step's
        # last micro-batch, which fails with gradient accumulation (several train_steps per optimizer step: DDP's
        # bucket rebuild asserts) and with the split-backward schedules (zb: weight gradients never averaged; zbv,
        # dualpipev: error). A plain all-reduce over dp_group once per optimizer step works for every schedule.
        return model, None
    dist_opt = DistributedOptimizer.from_config(p, model, process_group=dp_group, optimizer_class=None,
                                                block_types=block_types)
    return dist_opt.model, dist_opt
