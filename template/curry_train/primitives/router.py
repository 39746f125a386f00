"""The top-k router of a mixture-of-experts layer (``TopKRouter``, its ``RouteInfo``); the experts that consume
the route are in ``moe.py``.

Routing (``TopKRouter``). ``x`` has shape ``(..., D)``; its ``T`` tokens are flattened in row-major order (token
``t = b * N + n`` for ``(B, N, D)``). The router holds one weight ``W`` of shape ``(E, D)`` (no bias) and computes
``logits = x @ W.T`` **in float32** (``x`` and ``W`` are up-cast: in bf16 the softmax of near-equal logits flips the
top-k between otherwise identical runs). Scores:

* ``gating="softmax"`` (Switch, GShard, Mixtral): ``s = softmax(logits)``;
* ``gating="sigmoid"`` (DeepSeek-V3): ``s = sigmoid(logits)``, independent per expert.

Each token picks the ``K = top_k`` experts of largest ``s + b`` (``b``: the balancing bias below, zero unless
``bias_balancing``). Its weights are the *unbiased* scores of the chosen experts,
``w_k = s[i_k]``, renormalised over the chosen k (``w_k / sum_j w_j``) when ``renormalize`` is true. Default
(``renormalize=None``): renormalise when ``top_k > 1`` (Mixtral, DeepSeek-V3), not for ``top_k == 1`` (Switch:
a renormalised single weight is always 1 and the router would learn from the auxiliary loss only).

Capacity and drop order. With ``capacity_factor = c`` each expert takes at most
``capacity = ceil(c * T * K / E)`` assignments per forward (``T``: the tokens of this call on this rank). A
token's k-th choice is an *assignment*; assignments claim slots in priority order **choice rank first, then
token position**: every token's first choice (tokens in flattened order, earliest first), then every token's
second choice, and so on (GShard/Switch: a token's top-1 is never dropped to make room for another token's
top-2). An assignment finding its expert full is dropped: ``capacity_mask`` is False there, the expert does not
see the token and that term contributes zero; the residual connection around the MoE layer carries the token
unchanged. The other choices of the same token still count (their weights are not renormalised again).
``capacity_factor=None`` is dropless (no limit). ``RouteInfo.dropped_fraction`` = dropped / (T * K).

Auxiliary losses (``RouteInfo.aux_loss``, ``RouteInfo.z_loss``, both already multiplied by their weights):

* load balancing (Switch, eq. 4, generalised to top-k): ``aux = aux_loss_weight * E * sum_e f_e * P_e`` with
  ``f_e`` = fraction of the ``T * K`` assignments routed to ``e`` (before capacity drops; not differentiable)
  and ``P_e`` = mean over tokens of the router probability of ``e`` (softmax; for sigmoid gating the scores
  normalised per token, ``s / sum(s)``, as DeepSeek-V3's balance loss). Uniform routing gives exactly
  ``aux_loss_weight``; all tokens on one expert gives ``aux_loss_weight * E``.
* router z-loss (ST-MoE): ``z = z_loss_weight * mean_t(logsumexp(logits_t) ** 2)``; keeps logits small, so the
  fp32 softmax stays well-conditioned.

Jitter: in training mode with ``jitter_noise = eps > 0`` the router's input is multiplied by ``U(1 - eps, 1 + eps)``
noise, element-wise (Switch); the experts see the clean ``x``.

Auxiliary-loss-free balancing (DeepSeek-V3, ``bias_balancing=True``): a per-expert bias ``b`` (buffer
``expert_bias``, float32, saved in the state dict) is added to the scores **for the selection only**; the
weights stay the unbiased scores. After each optimizer step call ``router.update_bias()``:
``b += bias_update_rate * sign(mean(load) - load)`` where ``load`` = assignments per expert since the last
update (``tokens_seen``, counted by every training-mode forward; or pass ``tokens_per_expert``). Pass the
data-parallel ``group`` to sum the loads over ranks first, so every replica of the router moves its bias the
same way. Activation recompute runs the forward twice and doubles every count; ``sign`` does not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ._checks import boolean, choice, fraction, integer, non_negative_float, positive_float, positive_int

GATINGS = ("softmax", "sigmoid")


@dataclass
class RouteInfo:
    """What ``TopKRouter`` decided for ``T`` tokens of shape ``(..., D)`` (``...`` = the input's leading dims).

    ``expert_indices`` ``(..., K)`` int64, the chosen experts, best first; ``expert_weights`` ``(..., K)`` float32,
    differentiable; ``capacity_mask`` ``(..., K)`` bool, False = dropped; ``aux_loss``, ``z_loss`` weighted scalars;
    ``tokens_per_expert`` ``(E,)`` int64, assignments routed to each expert before capacity drops;
    ``dropped_fraction`` float32 scalar; ``capacity`` the per-expert limit (None = dropless).
    """

    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    capacity_mask: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor
    capacity: int | None = None

    @property
    def kept_per_expert(self) -> torch.Tensor:
        """``(E,)`` int64: assignments each expert computes (after capacity drops)."""
        return torch.bincount(self.expert_indices[self.capacity_mask].reshape(-1),
                              minlength=self.tokens_per_expert.numel())


def _check_d(name: str, x: torch.Tensor, d_model: int) -> None:
    if x.dim() < 1 or x.size(-1) != d_model:
        raise ValueError(f"{name} must have last dimension d_model={d_model}, got shape {tuple(x.shape)}")


class TopKRouter(nn.Module):
    """``router(x) -> RouteInfo``: each token's ``top_k`` experts, their weights, the capacity mask, the losses.

    See the module docstring for the math. ``capacity_factor`` > 0 or None (dropless); ``aux_loss_weight``,
    ``z_loss_weight`` >= 0 (0 disables; the loss is then a constant zero); ``jitter_noise`` in [0, 1);
    ``gating`` "softmax" | "sigmoid"; ``renormalize`` None (= ``top_k > 1``), True or False;
    ``bias_balancing`` selects with ``scores + expert_bias``, updated by ``update_bias``.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int = 2, capacity_factor: float | None = 1.25,
                 aux_loss_weight: float = 0.01, z_loss_weight: float = 0.0, jitter_noise: float = 0.0,
                 gating: str = "softmax", bias_balancing: bool = False, bias_update_rate: float = 1e-3,
                 renormalize: bool | None = None):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_experts = positive_int("n_experts", n_experts)
        self.top_k = integer("top_k", top_k, 1, self.n_experts, f"(n_experts={self.n_experts})")
        self.capacity_factor = None if capacity_factor is None else positive_float(
            "capacity_factor", capacity_factor, "(or null = no capacity limit)")
        self.aux_loss_weight = non_negative_float("aux_loss_weight", aux_loss_weight, "(0 = off)")
        self.z_loss_weight = non_negative_float("z_loss_weight", z_loss_weight, "(0 = off)")
        self.jitter_noise = fraction("jitter_noise", jitter_noise, 0.0, 1.0, include_high=False)
        self.gating = choice("gating", gating, GATINGS)
        self.bias_balancing = boolean("bias_balancing", bias_balancing)
        self.bias_update_rate = non_negative_float("bias_update_rate", bias_update_rate)
        if renormalize is not None:
            boolean("renormalize", renormalize, "(or null = renormalise when top_k > 1)")
        self.renormalize = self.top_k > 1 if renormalize is None else renormalize
        self.weight = nn.Parameter(torch.empty(self.n_experts, self.d_model))
        self.register_buffer("expert_bias", torch.zeros(self.n_experts))  # persistent: checkpointed
        self.register_buffer("tokens_seen", torch.zeros(self.n_experts, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.d_model ** -0.5)

    def capacity(self, n_tokens: int) -> int | None:
        """Per-expert capacity for ``n_tokens`` tokens: ``ceil(capacity_factor * n_tokens * top_k / n_experts)``."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> RouteInfo:
        _check_d("x", x, self.d_model)
        lead, E, K = x.shape[:-1], self.n_experts, self.top_k
        h = x.reshape(-1, self.d_model).float()
        if self.training and self.jitter_noise > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(h, self.weight.float())  # (T, E), float32
        T = logits.size(0)
        if self.gating == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        select = scores.detach() + self.expert_bias if self.bias_balancing else scores.detach()
        indices = select.topk(K, dim=-1, sorted=True).indices  # (T, K)
        weights = scores.gather(-1, indices)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        counts = torch.bincount(indices.reshape(-1), minlength=E)
        keep, capacity = self._capacity_mask(indices)
        zero = logits.new_zeros(())
        n_assign = max(T * K, 1)
        aux = zero
        if self.aux_loss_weight > 0 and T > 0:
            aux = self.aux_loss_weight * E * (counts.to(probs.dtype) / n_assign * probs.mean(dim=0)).sum()
        z = zero
        if self.z_loss_weight > 0 and T > 0:
            z = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        if self.training and self.bias_balancing:
            with torch.no_grad():
                self.tokens_seen += counts
        dropped = (1.0 - keep.sum() / n_assign).float() if T > 0 else zero.detach()
        return RouteInfo(
            expert_indices=indices.reshape(*lead, K), expert_weights=weights.reshape(*lead, K),
            capacity_mask=keep.reshape(*lead, K), aux_loss=aux, z_loss=z, tokens_per_expert=counts,
            dropped_fraction=dropped.detach(), capacity=capacity,
        )

    def _capacity_mask(self, indices: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """``(T, K)`` bool: which assignments fit, claiming slots choice-rank-major then by token position."""
        T, K = indices.shape
        capacity = self.capacity(T)
        if capacity is None:
            return torch.ones_like(indices, dtype=torch.bool), None
        flat = indices.t().reshape(-1)  # priority order: all first choices (token order), then all second, ...
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        starts = counts.cumsum(0) - counts
        sorted_pos = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        position = torch.empty_like(sorted_pos)
        position[order] = sorted_pos  # slot of each assignment within its expert
        return (position < capacity).view(K, T).t(), capacity

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor | None = None, group=None) -> torch.Tensor:
        """``expert_bias += bias_update_rate * sign(mean(load) - load)``; returns the load used.

        ``load`` = ``tokens_per_expert`` if given, else ``tokens_seen`` (counted since the last update, then reset).
        ``group``: all-reduce (sum) the load over it first (the data-parallel group), so replicas stay equal."""
        if not self.bias_balancing:
            raise ValueError("update_bias needs bias_balancing=True (the bias is not used otherwise)")
        source = self.tokens_seen if tokens_per_expert is None else torch.as_tensor(tokens_per_expert)
        if source.shape != (self.n_experts,):
            raise ValueError(f"tokens_per_expert must have shape ({self.n_experts},), got {tuple(source.shape)}")
        load = source.to(device=self.expert_bias.device, dtype=torch.float32).clone()
        if group is not None:
            dist.all_reduce(load, group=group)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        if tokens_per_expert is None:
            self.tokens_seen.zero_()
        return load

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, gating={self.gating}, "
                f"aux_loss_weight={self.aux_loss_weight}, "
                f"z_loss_weight={self.z_loss_weight}, bias_balancing={self.bias_balancing}")
