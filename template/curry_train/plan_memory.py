"""What one rank holds, for ``plan``: model states (``model_state_bytes``) and activations
(``activation_bytes``), by the formulas in ``plan``'s module docstring."""

from __future__ import annotations

from .plan_inputs import Shape
from .primitives.distributed_optimizer import BYTES_PER_PARAM, zero_bytes_per_rank
from .primitives.fsdp_levers import resolve_levers


def model_state_bytes(params: float, dp: int, sharding: str, precision: str = "mixed", tp: int = 1, pp: int = 1,
                      expert_params: float = 0.0, ep: int = 1, rank_params: float | None = None,
                      n_layer: int | None = None) -> dict:
    """One rank's bytes as ``DistributedOptimizer.memory_report()`` counts them after a step: params, grads,
    optimizer_state, total (``plan``'s module docstring), plus ``held_unsharded``, the parameters FSDP2 keeps
    gathered from forward to backward (``memory_report``'s ``unsharded_param_bytes``), and ``peak = total +
    held_unsharded``. Held: all of the rank's under ``shard_grad_op`` (it shards parameters at rest too, unlike
    DeepSpeed's ZeRO-2) and under any FSDP2 mode with pp > 1 (stages keep their blocks gathered); under ``full``
    with the default levers, the last unit (2 of ``n_layer`` blocks from 4 blocks up, else 1; 0 when ``n_layer``
    is None). ``rank_params``: the dense parameters the fullest rank holds (``Shape.rank_params``: replicated norms
    and embeddings, the ends of the pipeline) instead of ``(params - expert_params) / (tp pp)``. The experts,
    ``expert_params / (pp ep)``, are whole on every tp rank (tensor parallelism leaves an MoE MLP whole)."""
    at_rest = "full" if sharding == "shard_grad_op" else sharding
    dense_rank, expert_rank = (params - expert_params) / (tp * pp), expert_params / (pp * ep)
    if rank_params is not None:
        dense_rank = rank_params
    parts = zero_bytes_per_rank(dense_rank, dp, at_rest, precision)
    if expert_params:
        experts = zero_bytes_per_rank(expert_rank, dp // ep, at_rest, precision)
        parts = {k: parts[k] + experts[k] for k in parts}
    gathered = BYTES_PER_PARAM[precision][0] * (dense_rank + expert_rank)
    if sharding == "shard_grad_op" or (sharding == "full" and pp > 1):
        held = gathered
    elif sharding == "full" and n_layer:
        held = gathered * resolve_levers("full", n_layer)["blocks_per_unit"] / n_layer
    else:
        held = 0.0
    return {**parts, "held_unsharded": held, "peak": parts["total"] + held}


def activation_bytes_per_layer(shape: Shape, micro_batch: int, tp: int = 1, cp: int = 1, recompute: str = "none",
                               bytes_per_value: int = 2, attention: str = "sdpa", moe: bool = False) -> float:
    """Bytes one layer keeps for backward per micro-batch (``plan``'s module docstring gives the terms; an MoE
    layer's MLP share is not divided by ``tp``: the experts run whole on every tp rank)."""
    s, b, h, a = shape.seq / cp, micro_batch, shape.d_model, shape.n_head
    per_value = bytes_per_value / 2  # the coefficients count 2-byte activations
    mlp = {"full": 0, "selective": 10, "none": 19}[recompute]
    rest = {"full": 2, "selective": 12, "none": 15}[recompute]
    if moe:
        mlp *= shape.top_k * shape.expert_hidden / (4 * h)
    scores = 5 * a * s * s * b if attention == "eager" and recompute == "none" else 0
    return ((rest + (mlp if not moe else mlp * tp)) * s * b * h + scores) / tp * per_value


def activation_bytes(shape: Shape, micro_batch: int, layers: int, in_flight: int = 1, tp: int = 1, cp: int = 1,
                     recompute: str = "none", bytes_per_value: int = 2, attention: str = "sdpa",
                     moe_layers: float = 0.0) -> float:
    """A rank's activation bytes: ``in_flight`` micro-batch stages of ``layers`` layers (``moe_layers`` of them MoE),
    the final norm and the logits."""
    s = shape.seq / cp
    kw = dict(micro_batch=micro_batch, tp=tp, cp=cp, recompute=recompute, bytes_per_value=bytes_per_value,
              attention=attention)
    per_stage = activation_bytes_per_layer(shape, **kw) * (layers - moe_layers) \
        + activation_bytes_per_layer(shape, moe=True, **kw) * moe_layers
    final_norm = 2 * s * micro_batch * shape.d_model * bytes_per_value
    logits = 4 * s * micro_batch * shape.vocab / tp
    return per_stage * in_flight + final_norm + logits
