"""Context-parallel training batches: this rank's share of every sequence, and the global positions it holds.

With ``parallel.cp > 1`` every rank of a cp group gets the same rows (the data-parallel shard of its dp rank) and
keeps ``N / cp`` tokens of each, in ``primitives.context_parallel``'s load-balanced layout (chunks ``r`` and
``2cp - 1 - r``). Targets are sharded the same way: ``y[t]`` is the token after ``x[t]`` and both move together,
so the loss is the plain token loss on the local tokens. The model must place its tokens by the global positions:
the batch becomes a dict of keyword inputs, ``{input: x_local, positions: pos, "targets": y_local}``
(``primitives.model_io``), with ``positions`` the reference GPT's ``positions`` argument or Hugging Face's
``position_ids`` (RoPE reads them). A model whose forward takes neither cannot be trained with cp > 1
(``position_keyword`` says so, and ``config.validate`` refuses it before any process group starts).

Token counts and gradients: each rank counts its local valid targets; gradient accumulation's plan and the
data-parallel wrappers run over the dp x cp group (``ParallelState.dp_cp_group``), so the loss divisor is the
global count over every token of the step and the averaged gradient is the full-sequence mean's.
"""

from __future__ import annotations

import inspect

import torch.distributed as dist
import torch.nn as nn

from .primitives.context_parallel import positions, shard_sequence

POSITION_KEYWORDS = ("positions", "position_ids")  # the reference GPT, Hugging Face models


def _forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def position_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes global token positions by; ``ValueError`` when it takes none."""
    params = _forward_parameters(model)
    for key in POSITION_KEYWORDS:
        if key in params:
            return key
    raise ValueError(f"parallel.cp > 1 needs a model whose forward takes the global token positions "
                     f"(one of {', '.join(POSITION_KEYWORDS)}); {type(model).__name__}.forward takes "
                     f"({', '.join(params)}): its position embedding or RoPE would see local positions")


def cp_microbatch(model: nn.Module, cp_group):
    """``fn((x, y)) -> dict``: a micro-batch's local shard for this rank of ``cp_group``, with positions."""
    input_key = _forward_parameters(model)[0]  # idx (GPT), input_ids (Hugging Face)
    key = position_keyword(model)
    size, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)

    def shard(batch):
        x, y = batch
        pos = positions(rank, size, x.shape[1]).to(x.device)
        if key == "position_ids":
            pos = pos.unsqueeze(0).expand(x.shape[0], -1)
        return {input_key: shard_sequence(x, rank, size), key: pos, "targets": shard_sequence(y, rank, size)}

    return shard

