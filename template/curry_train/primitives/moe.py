"""Mixture of experts: a top-k router, a bank of expert MLPs with expert parallelism, and ``MoEMLP`` (both together).

Routing: ``router.py`` (``TopKRouter``: softmax/sigmoid gating, top-k, capacity and drop order, Switch aux loss,
z-loss, jitter, DeepSeek-V3 bias balancing; ``RouteInfo``).

Experts (``Experts``). ``E`` expert MLPs stored as batched weights: ``w1`` ``(E, D, F)``, ``w3`` ``(E, D, F)``
(GLU only), ``w2`` ``(E, F, D)``; an expert computes ``act(x @ w1[e]) * (x @ w3[e]) @ w2[e]`` (GLU, SwiGLU with
``activation="silu"``) or ``act(x @ w1[e]) @ w2[e]``. Dispatch: the kept assignments are sorted by expert
(stable ``argsort`` of their expert ids), the token rows gathered in that order, so expert ``e``'s tokens are one
contiguous slice; combine: each output row times its routing weight, ``index_add`` back into token order.
``shared_expert=True`` adds an always-on dense MLP of the same kind (DeepSeek-MoE) to every token's output.

What is batched: each projection (``w1``, ``w3``, ``w2``) is **one** grouped matmul over all local experts.
``impl="grouped_mm"``: ``torch._grouped_mm(x_sorted, w, offs=cumsum(counts))`` (no padding, no host sync;
private PyTorch API: tested here on CPU float32, where rows must be a multiple of 16 bytes; on CUDA it wants bf16
on sm90+, not tested here);
``impl="bmm"``: rows scattered into an ``(E, C, D)`` buffer padded to ``C`` = the largest expert's count, one
``torch.bmm`` per projection (public API, any device and dtype; computes the padding too: up to
``E * capacity = capacity_factor * T * K`` rows with a capacity, up to ``E`` times the largest expert when dropless); ``impl="loop"``: one matmul per expert on
``split`` slices (the baseline). ``impl="auto"`` (default) picks ``grouped_mm`` on CPU when the dtype and
alignment allow, else ``bmm``. Measured (``python -m curry_train bench moe``: 2 MoE blocks, 8 experts, top-2,
2048 tokens, CPU, one thread, torch 2.13), training step relative to a dense MLP of equal active parameters:
grouped_mm 1.12x, loop 1.19x, bmm 1.46x (the padding to the largest expert costs more than it saves in kernel
launches on CPU, where ``_grouped_mm`` itself runs one ``mm`` per expert inside a single op). On GPU the loop's
per-expert launches and host syncs are what grouped_mm removes; see ``skills/primitive-moe``.

Expert parallelism (``ep_group`` of size ``ep``; ``E % ep == 0``). Rank ``r`` of the group holds experts
``[r * E/ep, (r + 1) * E/ep)`` (its ``w1``/``w2``/``w3`` are that shard); the router and the shared expert are
replicated. Every rank routes its own tokens. Per MoE layer and forward:

1. ``all_to_all_single`` of the per-expert counts (``E`` int64 per rank): each rank learns how many rows it
   receives from every rank for each of its local experts;
2. dispatch: ``all_to_all_single`` of the sorted token rows with uneven ``input_split_sizes`` (rows for each
   destination rank) and ``output_split_sizes`` (rows from each source rank), ``kept * D`` elements sent per rank
   (``kept = T * K`` minus drops);
3. the received rows are re-sorted by local expert, computed by the grouped matmuls, un-sorted;
4. combine: the reverse ``all_to_all_single`` (each rank returns the rows it received, computed); weighting and
   ``index_add`` at the source.

So 2 all-to-alls of ``T * K * D`` elements per layer forward (plus the tiny counts exchange) and 2 in backward
(``_AllToAll``, an autograd Function whose backward is the all-to-all with the splits swapped;
``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated in torch 2.13). The rows a
rank sends to itself stay in memory; on average ``(ep - 1) / ep`` of them cross the network. Every rank of the
group must run every MoE forward and backward, in the same order (they are collectives), also when it receives
no rows: the expert matmuls then run on zero rows, so the backward's collectives still happen. Gradients: the
expert shard's ``.grad`` holds the sum over all ranks' tokens routed to it; the router and the shared expert get
only this rank's tokens, like any replicated parameter (data parallelism over the same ranks reduces them).
``Experts.from_dense(dense, ep_group)`` / ``MoEMLP.from_dense`` build a rank's shard from full weights.

The training-loop contract (``MoEMLP``): each forward stores ``aux_loss = route.aux_loss + route.z_loss`` on
the module; the model's loss must add the sum over its MoE layers, ``loss = ce + moe_aux_loss(model)`` (with
gradient accumulation, scale it like the main loss of a micro-batch), and, with bias balancing,
``update_moe_biases(model, group)`` runs after ``optimizer.step()``.

Where no forward has the whole loss (pipeline stages: the last stage's loss sees only the logits),
``attach_aux_losses(model, scale)`` puts the balancing loss into the backward instead (Megatron-LM's
``MoEAuxLossAutoScaler``, which its router applies to the routing probabilities): every ``MoEMLP`` output passes
through ``AuxLossScaler``, the identity in forward whose backward also gives that layer's ``aux_loss`` the
gradient ``scale``. Whatever back-propagates through the layer's output then back-propagates ``scale * aux_loss``
too: ``scale = 1 / forwards per optimizer step`` is the loop's ``moe_aux_loss(model) / K``.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ._checks import boolean, choice, positive_int
from .router import RouteInfo, TopKRouter, _check_d

__all__ = ["AuxLossScaler", "Experts", "MoEMLP", "RouteInfo", "TopKRouter", "attach_aux_losses", "moe_aux_loss",
           "update_moe_biases"]

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
IMPLS = ("auto", "grouped_mm", "bmm", "loop")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse all-to-all (splits swapped)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        out = grad.new_empty((sum(input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return out, None, None, None


class _DenseMLP(nn.Module):
    """The shared expert: one always-on MLP, GLU or plain, same activation as the routed experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str, glu: bool):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False) if glu else None
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        h = self.act(self.w1(x))
        return self.w2(h * self.w3(x) if self.w3 is not None else h)


def _group_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    if not dist.is_initialized():
        raise ValueError("ep_group needs torch.distributed initialised (or ep_group=None for no expert parallelism)")
    return dist.get_world_size(group), dist.get_rank(group)


class Experts(nn.Module):
    """``experts(x, route_info) -> y`` of ``x``'s shape: the routed experts' weighted sum (+ the shared expert).

    ``n_experts`` experts of hidden size ``d_ff``; ``activation`` "silu" | "gelu" | "relu"; ``glu`` gated
    (``w3``) or plain MLP; ``ep_group`` None or the expert-parallel process group (this rank holds
    ``n_local = n_experts / ep`` experts, from ``expert_offset``); ``shared_expert`` adds a dense MLP of hidden
    size ``shared_d_ff`` (default ``d_ff``); ``impl`` "auto" | "grouped_mm" | "bmm" | "loop" (module docstring).
    Initialisation: ``w1``, ``w3`` uniform(+-1/sqrt(D)), ``w2`` uniform(+-1/sqrt(F)) (``nn.Linear``'s bounds).
    ``last_counts`` after a forward: rows this rank sent to (``"sent"``, per destination rank) and received from
    (``"received"``, per source rank) the all-to-all (lists of ints, EP only), and rows computed per local
    expert (``"computed"``, an int64 tensor).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, activation: str = "silu", glu: bool = True,
                 ep_group=None, shared_expert: bool = False, shared_d_ff: int | None = None, impl: str = "auto"):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.d_ff = positive_int("d_ff", d_ff)
        self.n_experts = positive_int("n_experts", n_experts)
        self.activation = choice("activation", activation, tuple(ACTIVATIONS))
        self.glu = boolean("glu", glu)
        self.impl = choice("impl", impl, IMPLS)
        boolean("shared_expert", shared_expert)
        ep, rank = _group_size_rank(ep_group)
        if self.n_experts % ep:
            raise ValueError(f"n_experts must be divisible by the expert-parallel size {ep}, got {self.n_experts}")
        self.ep_group, self.ep_size, self.ep_rank = (ep_group if ep > 1 else None), ep, rank
        self.n_local = self.n_experts // ep
        self.expert_offset = rank * self.n_local
        self.w1 = nn.Parameter(torch.empty(self.n_local, self.d_model, self.d_ff))
        self.w3 = nn.Parameter(torch.empty(self.n_local, self.d_model, self.d_ff)) if self.glu else None
        self.w2 = nn.Parameter(torch.empty(self.n_local, self.d_ff, self.d_model))
        self.shared = None
        if shared_expert:
            shared_d_ff = self.d_ff if shared_d_ff is None else positive_int("shared_d_ff", shared_d_ff)
            self.shared = _DenseMLP(self.d_model, shared_d_ff, self.activation, self.glu)
        self.last_counts: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w1, self.d_model), (self.w3, self.d_model), (self.w2, self.d_ff)):
            if w is not None:
                nn.init.uniform_(w, -fan_in ** -0.5, fan_in ** -0.5)

    @property
    def local_experts(self) -> slice:
        """The global expert ids this rank holds: ``slice(expert_offset, expert_offset + n_local)``."""
        return slice(self.expert_offset, self.expert_offset + self.n_local)

    @classmethod
    def from_dense(cls, dense: "Experts", ep_group) -> "Experts":
        """This rank's expert-parallel shard of ``dense`` (an ``Experts`` holding all experts): the same weights for
        experts ``local_experts``, the shared expert copied; ``ep_group=None`` gives a full copy."""
        if dense.n_local != dense.n_experts:
            raise ValueError("from_dense needs an Experts holding every expert (built with ep_group=None)")
        shard = cls(dense.d_model, dense.d_ff, dense.n_experts, dense.activation, dense.glu, ep_group,
                    shared_expert=dense.shared is not None,
                    shared_d_ff=dense.shared.w1.out_features if dense.shared is not None else None, impl=dense.impl)
        shard.to(device=dense.w1.device, dtype=dense.w1.dtype)
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                if getattr(dense, name) is not None:
                    getattr(shard, name).copy_(getattr(dense, name)[shard.local_experts])
            if dense.shared is not None:
                shard.shared.load_state_dict(dense.shared.state_dict())
        return shard

    def _pick_impl(self, x: torch.Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        aligned = all((n * x.element_size()) % 16 == 0 for n in (self.d_model, self.d_ff))
        if hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and x.dtype == torch.float32 and aligned:
            return "grouped_mm"
        return "bmm"

    def _mlp(self, mm, x):
        h = ACTIVATIONS[self.activation](mm(x, self.w1))
        if self.w3 is not None:
            h = h * mm(x, self.w3)
        return mm(h, self.w2)

    def compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The local experts on rows ``x`` ``(n, D)`` sorted by local expert, ``counts[e]`` rows for expert ``e``."""
        impl = self._pick_impl(x)
        if impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            return self._mlp(lambda a, w: torch._grouped_mm(a, w, offs=offs), x)
        if impl == "loop":
            parts = x.split(counts.tolist())
            outs = [self._mlp(lambda a, w, e=e: a @ w[e], part) for e, part in enumerate(parts)]
            return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)
        # bmm: pad every expert's rows to the largest count C, one bmm per projection
        n, E = x.size(0), self.n_local
        cap = int(counts.max()) if n else 0
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)
        slot = expert * cap + torch.arange(n, device=x.device) - (counts.cumsum(0) - counts)[expert]
        buf = x.new_zeros(E * cap, self.d_model).index_copy(0, slot, x).view(E, cap, self.d_model)
        return self._mlp(torch.bmm, buf).reshape(E * cap, self.d_model)[slot]

    def forward(self, x: torch.Tensor, route_info: RouteInfo) -> torch.Tensor:
        _check_d("x", x, self.d_model)
        K = route_info.expert_indices.size(-1)
        if route_info.expert_indices.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"route_info is for tokens of shape {tuple(route_info.expert_indices.shape[:-1])}, "
                             f"x has {tuple(x.shape[:-1])}")
        xf = x.reshape(-1, self.d_model)
        expert = route_info.expert_indices.reshape(-1)
        kept = route_info.capacity_mask.reshape(-1).nonzero().squeeze(1)  # assignment ids t * K + k
        kept = kept[torch.argsort(expert[kept], stable=True)]  # sorted by expert, token order within an expert
        token, expert = kept // K, expert[kept]
        counts = torch.bincount(expert, minlength=self.n_experts)
        rows = xf[token]
        if self.ep_group is None:
            self.last_counts = {"computed": counts.detach()}
            out_rows = self.compute(rows, counts)
        else:
            out_rows = self._expert_parallel(rows, counts)
        weights = route_info.expert_weights.reshape(-1)[kept]
        dtype = torch.promote_types(out_rows.dtype, weights.dtype)
        y = xf.new_zeros(xf.size(0), self.d_model, dtype=dtype).index_add(
            0, token, out_rows.to(dtype) * weights.to(dtype)[:, None])
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.to(x.dtype).reshape(x.shape)

    def _expert_parallel(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Send ``rows`` (sorted by global expert, ``counts`` per expert) to the ranks holding their experts,
        compute there, return the results in the same order."""
        ep, E_local, group = self.ep_size, self.n_local, self.ep_group
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=group)  # E_local counts to/from every rank
        send = counts.view(ep, E_local).sum(1).tolist()
        recv = received.view(ep, E_local)
        recv_splits = recv.sum(1).tolist()
        x_in = _AllToAll.apply(rows, recv_splits, send, group)  # by source rank, then local expert
        local_expert = torch.repeat_interleave(torch.arange(E_local, device=rows.device).repeat(ep), received)
        order = torch.argsort(local_expert, stable=True)
        local_counts = recv.sum(0)
        self.last_counts = {"sent": send, "received": recv_splits, "computed": local_counts}
        y_sorted = self.compute(x_in[order], local_counts)
        y_in = y_sorted.new_empty(y_sorted.shape).index_copy(0, order, y_sorted)  # back to arrival order
        return _AllToAll.apply(y_in, send, recv_splits, group)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, local={self.n_local} from {self.expert_offset}, d_model={self.d_model}, "
                f"d_ff={self.d_ff}, activation={self.activation}, glu={self.glu}, impl={self.impl}")


class MoEMLP(nn.Module):
    """Router + experts as a drop-in MLP: ``moe(x) -> y`` of ``x``'s shape; ``moe.aux_loss`` holds this forward's
    weighted load-balancing + z-loss, which the model's loss must add (``moe_aux_loss(model)`` sums them).

    Arguments: those of ``TopKRouter`` and ``Experts``. After a forward, ``tokens_per_expert`` (routed, before
    drops) and ``dropped_fraction`` describe it. ``MoEMLP.from_dense(dense, ep_group)``: this rank's EP shard."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int = 2, capacity_factor: float | None = 1.25,
                 aux_loss_weight: float = 0.01, z_loss_weight: float = 0.0, jitter_noise: float = 0.0,
                 gating: str = "softmax", bias_balancing: bool = False, bias_update_rate: float = 1e-3,
                 renormalize: bool | None = None, activation: str = "silu", glu: bool = True,
                 shared_expert: bool = False, shared_d_ff: int | None = None, ep_group=None, impl: str = "auto"):
        super().__init__()
        self.router = TopKRouter(d_model, n_experts, top_k, capacity_factor, aux_loss_weight, z_loss_weight,
                                 jitter_noise, gating, bias_balancing, bias_update_rate, renormalize)
        self.experts = Experts(d_model, d_ff, n_experts, activation, glu, ep_group, shared_expert, shared_d_ff, impl)
        self.aux_loss = torch.zeros(())
        self.tokens_per_expert = torch.zeros(n_experts, dtype=torch.long)
        self.dropped_fraction = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.router(x)
        self.aux_loss = route.aux_loss + route.z_loss
        self.tokens_per_expert, self.dropped_fraction = route.tokens_per_expert, route.dropped_fraction
        return self.experts(x, route)

    def __getstate__(self):
        # deepcopy / pickle after a forward: the stored loss is a graph node, which cannot be copied
        state = super().__getstate__()
        return {**state, "aux_loss": state["aux_loss"].detach()}

    @classmethod
    def from_dense(cls, dense: "MoEMLP", ep_group) -> "MoEMLP":
        """A copy of ``dense`` (built with ``ep_group=None``) whose experts are this rank's shard over ``ep_group``."""
        experts = dense.experts
        dense.experts = None  # do not deep-copy the full expert bank
        try:
            moe = copy.deepcopy(dense)
        finally:
            dense.experts = experts
        moe.experts = Experts.from_dense(experts, ep_group)
        return moe


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` over ``model``'s ``MoEMLP`` layers (their last forward); add it to the training loss."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoEMLP)]
    return torch.stack(losses).sum() if losses else torch.zeros(())


class AuxLossScaler(torch.autograd.Function):
    """``AuxLossScaler.apply(output, aux_loss, scale)``: ``output`` unchanged in forward; in backward ``output``'s
    gradient passes through and ``aux_loss`` receives ``d(total)/d(aux_loss) = scale``, so the backward of any loss
    computed from ``output`` is the backward of ``loss + scale * aux_loss`` (Megatron-LM's ``MoEAuxLossAutoScaler``
    with its ``main_loss_backward_scale`` fixed per call)."""

    @staticmethod
    def forward(ctx, output, aux_loss, scale: float):
        ctx.scale, ctx.aux = float(scale), (aux_loss.shape, aux_loss.dtype, aux_loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        shape, dtype, device = ctx.aux
        return grad_output, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def attach_aux_losses(model: nn.Module, scale: float) -> list:
    """Forward hooks on every ``MoEMLP`` of ``model``: its output becomes ``AuxLossScaler.apply(output,
    layer.aux_loss, scale)`` whenever that loss needs a gradient (training; not under ``torch.no_grad``). Returns
    the hook handles (``handle.remove()`` undoes it). Use it instead of adding ``moe_aux_loss`` to the loss, not
    with it: the step would count the balancing loss twice."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (1 / forwards per optimizer step), got {scale}")

    def hook(layer, args, output):
        aux = layer.aux_loss
        if torch.is_grad_enabled() and aux.requires_grad:
            return AuxLossScaler.apply(output, aux, scale)
        return None

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoEMLP)]


def update_moe_biases(model: nn.Module, group=None) -> int:
    """``update_bias(group=group)`` on every router of ``model`` with bias balancing; call after
    ``optimizer.step()``. Returns how many routers were updated."""
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.bias_balancing]
    for r in routers:
        r.update_bias(group=group)
    return len(routers)
