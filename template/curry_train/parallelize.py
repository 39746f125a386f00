"""Apply parallelisms to a freshly built model, in one fixed, documented order.

Order (torchtitan's): recompute (activation checkpointing) -> ``torch.compile`` -> data-parallel sharding.
Recompute wraps blocks before compile so the compiled graph contains the checkpoint boundaries, and both
happen before sharding so FSDP wraps the final modules.

Today: ``parallel.sharding=no_shard`` wraps the model in DDP when more than one data-parallel rank exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def parallelize(model: torch.nn.Module, cfg, dp_group=None) -> torch.nn.Module:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        model = DDP(model, process_group=dp_group, device_ids=device_ids)
    return model
