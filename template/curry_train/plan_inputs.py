"""The inputs of ``plan.py``: the model's ``Shape`` (from sizes, from a parameter count, from the reference GPT's
config, with a mixture of experts) and the pipeline numbers taken from ``primitives.pipeline.sim``: the bubble and
the stages a rank holds in flight, per schedule. The formulas are in ``plan.py``'s docstring."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .primitives._checks import integer, positive_float, positive_int
from .primitives.pipeline.sim import action_lists, check_schedule, simulate


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer: parameters and the sizes the activation formula needs. With a mixture of experts
    ``params`` is the total, ``expert_params`` the expert banks' share of it (``moe_layers`` layers of ``experts``
    experts, ``top_k`` per token, hidden ``expert_hidden``)."""

    params: float
    n_layer: int
    d_model: int
    n_head: int
    vocab: int = 32000
    seq: int = 4096
    experts: int = 0
    top_k: int = 0
    moe_layers: int = 0
    expert_params: float = 0.0
    expert_hidden: int = 0
    moe_every: int = 1
    positions: int = 0  # learned position-embedding rows (the reference GPT's block_size); 0 = sizes not exact
    tied: bool = True  # head shares the token embedding's weight

    @property
    def active_params(self) -> float:
        """Parameters one token uses: everything but the ``experts - top_k`` idle experts of each MoE layer."""
        return self.params - (self.expert_params * (1 - self.top_k / self.experts) if self.experts else 0.0)

    def rank_params(self, tp: int = 1, pp: int = 1, v_style: bool = False) -> float:
        """Dense parameters (all but the expert banks, which split over ep) the fullest rank holds at tp x pp, for
        the exact sizes of ``from_model_config`` (``positions`` > 0; else ``(params - expert_params) / (tp pp)``), as
        ``parallelize`` lays them out: per block the linears' weights and the column biases split over tp, the two
        LayerNorms (``4d``) and the row biases (``2d``) replicated (an MoE block: its two LayerNorms, the attention's
        row bias and its router, replicated: tp leaves the MoE whole); the token and position embeddings (``V d +
        positions d``) on the first stage, the final LayerNorm (``2d``) and the head (``V d``: the tied weight's own
        copy when the stages differ) on the last, replicated over tp when tied, split by vocabulary when untied.
        ``v_style``: the first and last stages share a rank."""
        dense = self.params - self.expert_params
        if not self.positions:
            return dense / (tp * pp)
        d, V = self.d_model, self.vocab
        embed = (V * d if self.tied else V * d / tp) + self.positions * d
        head = 2 * d + (V * d if self.tied else V * d / tp)
        blocks = dense - (V * d + self.positions * d + 2 * d + (0 if self.tied else V * d))
        routers = self.moe_layers * self.experts * d
        dense_layers = self.n_layer - self.moe_layers
        replicated = 6 * d * dense_layers + 5 * d * self.moe_layers + routers
        per_rank_blocks = ((blocks - replicated) / tp + replicated) / pp
        if pp == 1:
            return per_rank_blocks + embed + head - (V * d if self.tied else 0)  # one tied weight
        first = per_rank_blocks + embed + (head if v_style else 0)
        return max(first, per_rank_blocks + head)

    @classmethod
    def from_params(cls, params: float, seq: int = 4096, vocab: int = 32000) -> "Shape":
        """Sizes for ``params`` by the usual aspect ratio (``12 L d^2 = params``, ``d = 128 L``), heads of 128: an
        assumption, printed with the plan; give the real sizes when you have them."""
        positive_float("--params", params)
        d = max(128, round((params * 128 / 12) ** (1 / 3) / 128) * 128)
        layers = max(1, round(params / (12 * d * d)))
        return cls(params, layers, d, d // 128, vocab, seq)

    @classmethod
    def from_model_config(cls, model, seq: int | None = None) -> "Shape":
        """The reference GPT's exact sizes from its config (``model.GPTConfig`` or Hydra's ``cfg.model``, e.g.
        ``model=moe``): embeddings ``V d + block d`` (+ ``V d`` untied head), per block two LayerNorms ``4d``,
        attention ``4 d^2 + 4 d``, MLP ``2 d F + F + d`` (``F = mlp_ratio d``) or, in an MoE block, router ``E d``
        + ``E`` SwiGLU experts ``3 d F``; final LayerNorm ``2d``. ``seq`` defaults to ``block_size``."""
        get = (lambda k, default=None: model.get(k, default)) if hasattr(model, "get") else \
            (lambda k, default=None: getattr(model, k, default))
        if get("n_embd") is None:
            raise ValueError("plan reads the reference GPT's model.n_layer / n_embd / n_head (a model._target_ has "
                             "none): give --layers, --hidden and --heads instead")
        L, d, heads, V, block = (int(get(k)) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size"))
        F, E = int(get("mlp_ratio", 4)) * d, int(get("moe_experts", 0) or 0)
        moe_layers = sum(1 for i in range(L) if i % int(get("moe_every", 1)) == 0) if E else 0
        expert_params = moe_layers * E * 3 * d * F
        dense_mlp = (L - moe_layers) * (2 * d * F + F + d) + moe_layers * E * d
        params = V * d + block * d + (0 if get("tie_embeddings", True) else V * d) + L * (4 * d + 4 * d * d + 4 * d) \
            + dense_mlp + expert_params + 2 * d
        return cls(params, L, d, heads, V, int(seq or block), E, int(get("moe_top_k", 2)) if E else 0, moe_layers,
                   float(expert_params), F if E else 0, int(get("moe_every", 1)), block,
                   bool(get("tie_embeddings", True)))


def with_experts(shape: Shape, experts, top_k, moe_every, expert_hidden) -> Shape:
    """``shape`` with ``experts`` SwiGLU experts of hidden ``expert_hidden`` (default ``8d/3``: a dense MLP's
    ``8 d^2``) replacing the MLP in every ``moe_every``-th layer: ``E x 3 d F`` expert + ``E d`` router parameters
    each, instead of the dense ``8 d^2``."""
    if experts is None:
        for flag, value in (("--top-k", top_k), ("--moe-every", moe_every), ("--expert-hidden", expert_hidden)):
            if value is not None:
                raise ValueError(f"{flag} needs --experts E (the experts per MoE layer)")
        return shape
    E = integer("--experts", experts, 2, None, "(a mixture of experts has at least 2)")
    k = integer("--top-k", 2 if top_k is None else top_k, 1, E, f"(--experts {E})")
    every = positive_int("--moe-every", 1 if moe_every is None else moe_every)
    d = shape.d_model
    F = positive_int("--expert-hidden", expert_hidden) if expert_hidden is not None else round(8 * d / 3)
    n = len(range(0, shape.n_layer, every))
    expert_params = n * E * 3 * d * F
    return replace(shape, params=shape.params + n * (expert_params / n + E * d - 8 * d * d), experts=E, top_k=k,
                   moe_layers=n, expert_params=float(expert_params), expert_hidden=F, moe_every=every)


def _ref_microbatches(p: int, m: int) -> int:
    return 2 * p if m > 2 * p else m


@lru_cache(maxsize=None)
def _idle(kind: str, p: int, m: int, v: int) -> float:
    """Mean idle time per rank of the simulated step, stages of cost ``f = 1/v``, ``b = 2/v`` (3 per micro-batch)."""
    return simulate(kind, p, m, v, f=1 / v, b=2 / v).makespan - 3 * m


def pipeline_bubble(p: int, m: int, kind: str = "1f1b", v: int | None = None) -> float:
    """The simulator's bubble fraction for ``p`` ranks, ``m`` micro-batches, ``v`` stages per rank (uniform stages,
    free transfers): ``idle / (idle + 3 m)`` with the idle time simulated at ``min(m, 2p)`` micro-batches (constant
    from ``2p`` on: the pipeline is full; tests/test_plan.py checks it against ``simulate`` at larger ``m``)."""
    if p == 1:
        return 0.0
    kind, v = check_schedule(kind, p, m, v)
    idle = _idle(kind, p, _ref_microbatches(p, m), v)
    return idle / (idle + 3 * m)


@lru_cache(maxsize=None)
def _peak(kind: str, p: int, m: int, v: int) -> int:
    peak = 0
    for ops in action_lists(kind, p, m, v):
        alive = 0
        for a in ops:
            alive += {"F": 1, "B": -1, "W": -1}.get(a.kind, 0)
            peak = max(peak, alive)
    return peak


def in_flight_stages(p: int, m: int, kind: str = "1f1b", v: int | None = None) -> int:
    """Peak over ranks and time of stages whose activations a rank holds: per rank, walk its action list, +1 per
    ``F``, -1 per ``B`` or ``W`` (an ``I`` keeps the inputs ``W`` needs). GPipe gives ``m``, 1F1B ``min(p, m)``,
    interleaved 1F1B ``(v-1) p + 2 (p-1) + 1``; every kind but GPipe reaches its peak by ``m = 2p``."""
    if p == 1:
        return 1
    kind, v = check_schedule(kind, p, m, v)
    return m if kind == "gpipe" else _peak(kind, p, _ref_microbatches(p, m), v)


def model_overrides(shape: Shape) -> list[str]:
    """The reference GPT of ``shape``'s sizes as ``train`` overrides (``block_size`` = the planned sequence). Its MoE
    experts have hidden ``model.mlp_ratio x d`` (4d), not ``--expert-hidden``."""
    out = [f"model.n_layer={shape.n_layer}", f"model.n_embd={shape.d_model}", f"model.n_head={shape.n_head}",
           f"model.vocab_size={shape.vocab}", f"model.block_size={shape.seq}"]
    if shape.experts:
        out += [f"model.moe_experts={shape.experts}", f"model.moe_top_k={shape.top_k}",
                f"model.moe_every={shape.moe_every}"]
    return out
