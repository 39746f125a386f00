"""``python -m curry_train plan``: memory, bubble, communication and step time per layout, before renting GPUs.

A model, not a promise. For every layout ``dp x tp x pp x cp`` (``ep`` experts axis inside dp for a mixture of
experts), pipeline schedule, sharding mode, recompute mode and micro-batch size, per GPU:

* **model states** (``model_state_bytes``): ``primitives.distributed_optimizer.zero_bytes_per_rank`` (ZeRO paper,
  Rajbhandari et al. 2019) on the dense parameters the fullest rank holds over its ``dp`` ranks (``Psi_d / (tp
  pp)``; for the reference GPT's exact sizes ``Shape.rank_params``: replicated norms and row biases, embeddings on
  the first stage, the head on the last; within 1% of a dp2 x pp2 x tp2 run, tests/test_compose.py) over its ``dp x
  cp`` ranks (ZeRO-1 and FSDP2 shard over the cp ranks too, which hold the same weights), plus the expert ``Psi_e /
  (pp ep)`` (whole on every tp rank) over the ``dp / ep`` ranks holding the same experts (mixed precision: 2 + 2 +
  12 bytes per parameter; ``--precision fp32``: 4 + 4 + 8, which is also what curry_train's bf16 keeps: fp32 shards).
  FSDP2's ``shard_grad_op`` shards the parameters at rest as well and holds them whole from forward to backward:
  ``16 Psi / N`` at rest + ``Psi`` parameter bytes at its peak; so does any FSDP2 pipeline stage; ``full`` with
  its default levers holds its last unit (2 of the layers). Checked against ``memory_report()`` on gloo ranks,
  every sharding mode, N = 2 and 4 (tests/test_plan.py);
* **activations** per transformer layer and micro-batch, in bytes at 2-byte activations (Korthikanti et al. 2022,
  TP with sequence parallelism): ``34 s b h / t`` without recompute for fused attention (SDPA/flash: the
  ``s x s`` scores are not stored; ``attention="eager"`` adds the paper's ``5 a s^2 b``), ``22 s b h / t`` with
  selective recompute (``primitives.recompute``'s policy keeps q, k, v, attention, out-proj, 4h up, down and the
  layer input = 11 values), ``2 s b h / t`` with full recompute (the layer input only); ``s = seq / cp``. In an MoE
  layer the MLP's share (19 of 34, 10 of 22) is scaled by ``top_k F / (4 h)`` (a token's values in ``top_k``
  experts of width ``F`` against the dense ``4h``; not measured) and not divided by ``t`` (the experts run whole
  on every tp rank). Times the layers of a pipeline stage and the
  stages a rank holds in flight (``in_flight_stages``: the peak over the schedule's own action lists of forwards
  done minus backwards done, ``B`` or ``W`` freeing a stage: GPipe ``m``, 1F1B ``min(p, m)``, interleaved 1F1B
  ``(v-1) p + 2 (p-1) + 1`` stages of ``L / (p v)`` layers, ...), plus the final norm (``4 s b h``) and the fp32
  logits (``4 s b V / t``). Checked against ``activation_memory`` of the reference GPT (tests/test_plan.py);
* **pipeline bubble** (``pipeline_bubble``): ``primitives.pipeline.sim.simulate`` of the schedule (uniform stages,
  ``f = 1/v``, ``b = 2/v`` per stage). For ``m > 2p`` the simulator runs at ``m = 2p`` and its idle time, constant
  once the pipeline is full (tests/test_plan.py checks it against direct simulation), is carried over:
  ``bubble(m) = idle / (idle + 3 m)``;
* **communication per step**, bytes one GPU sends (``DP_VOLUME``): DP ``k (d-1)/d`` times the rank's 2-byte gradients
  with ``k = 2`` for DDP's all-reduce, ZeRO-1's reduce-scatter + all-gather and FSDP ``shard_grad_op``, ``k = 3`` for
  FSDP ``full``; TP four all-reduces of ``b s h`` per layer and micro-batch (+ two with full recompute; half of it
  in an MoE layer, whose MLP tp leaves whole); PP one activation and one gradient of ``b s h`` per micro-batch; CP
  ``cp - 1`` K/V blocks forward, twice that backward;
  EP ``2 T top_k h`` values per MoE layer forward (dispatch + combine, the formula ``bench moe`` checks; ``T`` the
  rank's tokens), the same again backward, ``(ep-1)/ep`` of it leaving the rank;
* **step time**: ``6 Psi_active tokens`` FLOPs (x 4/3 with full recompute) over ``gpus x peak x MFU``, stretched by
  the bubble, plus each axis's bytes over its link, with no overlap. Ranks are laid out ``pp-dp-cp-tp`` (tp
  innermost, curry_train's ``parallel.order``): an axis of size ``n`` and stride ``k`` (the product of the axes
  inside it) stays in a node when ``n k <= gpus_per_node``, else it uses the inter-node bandwidth; tp never spans
  nodes (excluded with the reason).

A layout fits when states + activations <= ``memory x headroom``. Layouts are ranked fitting first, then by step
time; the first is recommended with its ``torchrun`` command line.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field

from .plan_inputs import Shape, in_flight_stages, model_overrides, pipeline_bubble, with_experts
from .plan_memory import activation_bytes, activation_bytes_per_layer, model_state_bytes
from .primitives._checks import positive_float, positive_int
from .primitives.distributed_optimizer import SHARDINGS, zero_bytes_per_rank
from .primitives.pipeline.sim import KINDS, default_stages_per_rank, normalize_kind

__all__ = ["Shape", "Hardware", "Layout", "Estimate", "model_state_bytes", "activation_bytes", "estimate", "plan",
           "pipeline_bubble", "in_flight_stages", "candidates", "command", "plan_main", "activation_bytes_per_layer"]

GB = 1e9
DP_VOLUME = {"no_shard": 2, "zero1": 2, "shard_grad_op": 2, "full": 3}  # x (d-1)/d x the rank's gradient bytes
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int = 8
    memory_gb: float = 80.0
    peak_tflops: float = 989.0  # H100 SXM bf16 dense
    mfu: float = 0.4
    intra_gbps: float = 450.0  # NVLink, per GPU per direction
    inter_gbps: float = 50.0  # 400 Gb/s InfiniBand per GPU
    headroom: float = 0.9


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    cp: int
    sharding: str
    recompute: str
    micro_batch: int
    schedule: str = "1f1b"
    v: int = 1  # pipeline stages per rank
    ep: int = 1


@dataclass
class Estimate:
    layout: Layout
    states_bytes: dict = field(default_factory=dict)
    activation_bytes: float = 0.0
    total_bytes: float = 0.0
    fits: bool = False
    bubble: float = 0.0
    in_flight: int = 0  # pipeline stages whose activations a rank holds at its peak
    comm_bytes: dict = field(default_factory=dict)
    inter_node: list = field(default_factory=list)  # axes whose groups cross nodes
    step_s: float = 0.0
    microbatches: int = 0
    excluded: str | None = None
    unsupported: str | None = None  # why ``python -m curry_train train`` cannot run it yet (other frameworks can)


def _crosses_nodes(L: Layout, hw: Hardware) -> list[str]:
    """Axes whose groups span nodes, ranks laid out pp-dp-cp-tp (tp innermost): size x stride > gpus_per_node."""
    axes = {"tp": (L.tp, 1), "cp": (L.cp, L.tp), "ep": (L.ep, L.tp * L.cp), "dp": (L.dp, L.tp * L.cp),
            "pp": (L.pp, L.tp * L.cp * L.dp)}
    return [k for k, (n, stride) in axes.items() if n > 1 and n * stride > hw.gpus_per_node]


def estimate(shape: Shape, hw: Hardware, layout: Layout, global_batch_tokens: int, precision: str = "mixed") -> Estimate:
    """Every number of one layout (``Estimate.excluded`` says why a layout cannot run at all)."""
    L = layout
    est = Estimate(L)
    rows = global_batch_tokens / shape.seq
    stages = L.pp * L.v
    reasons = [(shape.n_layer % stages, f"{shape.n_layer} layers not divisible by pp x stages per rank = {stages}"),
               (shape.n_head % L.tp, f"{shape.n_head} heads not divisible by tp={L.tp}"),
               (shape.seq % (2 * L.cp) if L.cp > 1 else 0, f"seq {shape.seq} not divisible by 2*cp={2 * L.cp}"),
               (rows % (L.dp * L.micro_batch), f"{rows:g} rows per step not divisible by dp x micro-batch = "
                                               f"{L.dp} x {L.micro_batch}"),
               (L.tp > hw.gpus_per_node, f"tp={L.tp} spans nodes of {hw.gpus_per_node} GPUs (tp needs NVLink: "
                                         f"tp <= --gpus-per-node)"),
               (L.ep > 1 and (not shape.experts or shape.experts % L.ep or L.dp % L.ep),
                f"ep={L.ep} must divide the experts ({shape.experts}) and dp={L.dp}")]
    est.excluded = next((why for bad, why in reasons if bad), None)
    if est.excluded:
        return est
    est.unsupported = train_support(L)
    m = int(rows // (L.dp * L.micro_batch))
    est.microbatches = m
    if L.pp > 1:
        try:
            est.bubble = pipeline_bubble(L.pp, m, L.schedule, L.v)
            est.in_flight = in_flight_stages(L.pp, m, L.schedule, L.v)
        except ValueError as e:
            est.excluded = f"{m} micro-batches per step: {e}"
            return est
    else:
        est.in_flight = 1
    rank = shape.rank_params(L.tp, L.pp, L.schedule in ("zbv", "dualpipev")) if shape.positions else None
    # ZeRO-1 and FSDP2 shard over dp x cp (the cp ranks of a replica hold the same weights: ParallelState.fsdp_mesh)
    est.states_bytes = model_state_bytes(shape.params, L.dp * L.cp, L.sharding, precision, L.tp, L.pp,
                                         shape.expert_params, L.ep, rank_params=rank, n_layer=shape.n_layer)
    layers = shape.n_layer / stages
    value_bytes = 2 if precision == "mixed" else 4
    est.activation_bytes = activation_bytes(shape, L.micro_batch, layers, est.in_flight, L.tp, L.cp, L.recompute,
                                            value_bytes, moe_layers=shape.moe_layers / stages)
    est.total_bytes = est.states_bytes["peak"] + est.activation_bytes
    est.fits = est.total_bytes <= hw.memory_gb * GB * hw.headroom
    bsh = L.micro_batch * (shape.seq / L.cp) * shape.d_model * 2
    rank_layers = shape.n_layer // L.pp
    grad_bytes = 2 * (shape.params - shape.expert_params) / (L.tp * L.pp)
    expert_grad_bytes = 2 * shape.expert_params / (L.pp * L.ep)
    dp_experts = L.dp // L.ep
    tp_layers = rank_layers - shape.moe_layers / L.pp / 2  # an MoE layer: the attention's all-reduces only
    est.comm_bytes = {
        "dp": DP_VOLUME[L.sharding] * ((L.dp - 1) / L.dp * grad_bytes
                                       + (dp_experts - 1) / dp_experts * expert_grad_bytes),
        "tp": (6 if L.recompute == "full" else 4) * 2 * (L.tp - 1) / L.tp * bsh * tp_layers * m if L.tp > 1 else 0.0,
        "pp": 2 * bsh * m if L.pp > 1 else 0.0,
        "cp": 3 * (L.cp - 1) * 2 * bsh * rank_layers * m if L.cp > 1 else 0.0,
        "ep": 2 * 2 * bsh * shape.top_k * m * (L.ep - 1) / L.ep * shape.moe_layers / L.pp if L.ep > 1 else 0.0,
    }
    flops = 6 * shape.active_params * global_batch_tokens * (4 / 3 if L.recompute == "full" else 1.0)
    compute = flops / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)
    est.inter_node = _crosses_nodes(L, hw)
    est.step_s = compute / (1 - est.bubble) + sum(
        b / ((hw.inter_gbps if k in est.inter_node else hw.intra_gbps) * GB) for k, b in est.comm_bytes.items())
    return est


def train_support(L: Layout) -> str | None:
    """Why ``curry_train train`` refuses this layout today (the same rules as ``config.validate``), or None."""
    rules = [(L.ep > 1 and L.tp > 1, "ep with tp (the experts stay whole on every tp rank; use ep=1)")]
    return next((why for bad, why in rules if bad), None)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(hw: Hardware, micro_batches=(1, 2, 4), shardings=SHARDINGS, recomputes=RECOMPUTE,
               schedules=tuple(KINDS), experts: int = 0) -> list[Layout]:
    """Every grid of ``hw.gpus`` GPUs with each sharding, recompute, micro-batch and (pp > 1) schedule at its
    default stages per rank; with ``experts``, every ``ep`` dividing both dp and the experts. With tp > 1 and
    dp > 1 the shardings are FSDP2's (full, shard_grad_op): DDP and ZeRO-1 take no tensor-parallel parameters."""
    out = []
    for tp in divisors(hw.gpus):
        for pp in divisors(hw.gpus // tp):
            for cp in divisors(hw.gpus // (tp * pp)):
                dp = hw.gpus // (tp * pp * cp)
                eps = [e for e in divisors(dp) if experts % e == 0] if experts else [1]
                kinds = schedules if pp > 1 else ("1f1b",)
                for ep, kind, sharding, recompute, mb in ((e, k, s, r, b) for e in eps for k in kinds
                                                         for s in shardings for r in recomputes for b in micro_batches):
                    if dp == 1 and sharding != "no_shard":
                        continue
                    if tp > 1 and dp > 1 and sharding in ("no_shard", "zero1"):
                        continue  # DDP and ZeRO-1 take no DTensor parameters: tp runs with FSDP2 (torchtitan has no DDP)
                    v = default_stages_per_rank(kind) if pp > 1 else 1
                    out.append(Layout(dp, tp, pp, cp, sharding, recompute, mb, kind, v, ep))
    return out


def plan(shape: Shape, hw: Hardware, global_batch_tokens: int, precision: str = "mixed",
         schedules=tuple(KINDS)) -> list[Estimate]:
    """Every candidate layout, fitting ones first, fastest first."""
    positive_int("--gpus", hw.gpus)
    positive_int("--global-batch-tokens", global_batch_tokens)
    estimates = [estimate(shape, hw, layout, global_batch_tokens, precision)
                 for layout in candidates(hw, schedules=schedules, experts=shape.experts)]
    runnable = [e for e in estimates if e.excluded is None]
    if not runnable:
        raise ValueError(f"no layout can run: {estimates[0].excluded} (and every other layout likewise); change "
                         "--global-batch-tokens, --seq or the sizes")
    return sorted(runnable, key=lambda e: (not e.fits, e.step_s, e.total_bytes))


def command(e: Estimate, hw: Hardware, shape: Shape, overrides=()) -> str:
    """The ``torchrun`` line for ``e``: ``overrides``, the model overrides the shape came from, else the reference
    GPT of the shape's sizes (``model_overrides``)."""
    L = e.layout
    nodes = math.ceil(hw.gpus / hw.gpus_per_node)
    per_node = min(hw.gpus, hw.gpus_per_node)
    rows = L.dp * L.micro_batch * e.microbatches
    steps = (f"parallel.pp_schedule={L.schedule} parallel.pp_stages_per_rank={L.v} parallel.n_microbatches="
             f"{e.microbatches}" if L.pp > 1 else f"train.gradient_accumulation_steps={e.microbatches}")
    recompute = {"none": "false", "selective": "selective", "full": "full"}[L.recompute]
    extra = "".join(f" {o}" for o in (overrides or model_overrides(shape)))
    extra += f" parallel.ep={L.ep}" if L.ep > 1 else ""
    return (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} -m curry_train train{extra} parallel.dp={L.dp} "
            f"parallel.tp={L.tp} parallel.pp={L.pp} parallel.cp={L.cp} parallel.sharding={L.sharding} "
            f"train.recompute={recompute} train.batch_size={rows} train.seq_len={shape.seq} {steps}")


def zero_table(shape: Shape, gpus: int, precision: str = "mixed") -> list[str]:
    """Per-GPU model-state bytes of each ZeRO stage for the whole model over ``gpus`` data-parallel ranks."""
    names = {"no_shard": "DDP", "zero1": "ZeRO-1", "shard_grad_op": "ZeRO-2", "full": "ZeRO-3 / FSDP"}
    lines = ["| stage | params | grads | optimizer | total per GPU |", "|---|---|---|---|---|"]
    for sharding, name in names.items():
        z = zero_bytes_per_rank(shape.params, gpus, sharding, precision)
        lines.append(f"| {name} | {z['params'] / GB:.1f} GB | {z['grads'] / GB:.1f} GB | "
                     f"{z['optimizer_state'] / GB:.1f} GB | {z['total'] / GB:.1f} GB |")
    return lines


def _layout_name(L: Layout) -> str:
    return f"{L.dp} x {L.tp} x {L.pp} x {L.cp}" + (f" ep {L.ep}" if L.ep > 1 else "")


def markdown(shape: Shape, hw: Hardware, estimates: list[Estimate], global_batch_tokens: int, top: int = 10,
             precision: str = "mixed", overrides=()) -> str:
    moe = (f"; MoE: {shape.experts} experts top-{shape.top_k} in {shape.moe_layers} layers, "
           f"{shape.active_params / 1e9:.3g}B active of {shape.params / 1e9:.3g}B" if shape.experts else "")
    out = [f"# plan: {shape.params / 1e9:g}B parameters ({shape.n_layer} layers, d {shape.d_model}, {shape.n_head} "
           f"heads, seq {shape.seq}{moe}) on {hw.gpus} GPUs of {hw.memory_gb:g} GB "
           f"({math.ceil(hw.gpus / hw.gpus_per_node)} node(s) of {min(hw.gpus, hw.gpus_per_node)}); "
           f"{global_batch_tokens:,} tokens per step", "",
           f"Model states alone over {hw.gpus} data-parallel GPUs ({precision} precision Adam):", "",
           *zero_table(shape, hw.gpus, precision), "",
           f"Assumed: peak {hw.peak_tflops:g} TFLOP/s at MFU {hw.mfu:g}, {hw.intra_gbps:g} GB/s in a node of "
           f"{hw.gpus_per_node}, {hw.inter_gbps:g} GB/s across, usable memory {hw.headroom:.0%}; no overlap of "
           "communication with compute. A model, not a measurement.", "",
           "| # | dp x tp x pp x cp | schedule | sharding | recompute | mb x m | states GB | activations GB | fits | "
           "bubble | comm GB (dp/tp/pp/cp/ep) | across nodes | step s | curry_train train |", "|---" * 14 + "|"]
    for i, e in enumerate(estimates[:top], 1):
        L, c = e.layout, e.comm_bytes
        sched = "-" if L.pp == 1 else L.schedule + (f" v{L.v}" if L.v > 1 else "")
        out.append(f"| {i} | {_layout_name(L)} | {sched} | {L.sharding} | {L.recompute} | {L.micro_batch} x "
                   f"{e.microbatches} | {e.states_bytes['peak'] / GB:.1f} | {e.activation_bytes / GB:.1f} | "
                   f"{'yes' if e.fits else 'NO'} | {e.bubble:.3f} | "
                   f"{'/'.join(f'{c[k] / GB:.2f}' for k in ('dp', 'tp', 'pp', 'cp', 'ep'))} | "
                   f"{','.join(e.inter_node) or '-'} | {e.step_s:.2f} | {e.unsupported or 'yes'} |")
    best = estimates[0]
    if best.fits:
        out += ["", f"Recommended: #1, the fastest layout that fits ({best.total_bytes / GB:.1f} of "
                    f"{hw.memory_gb:g} GB)."]
        runs = next(((i, e) for i, e in enumerate(estimates, 1) if e.fits and e.unsupported is None), None)
        if best.unsupported is None:
            out += ["Run it with:", "", f"    {command(best, hw, shape, overrides)}"]
        elif runs is None:
            out += [f"`curry_train train` runs none of the fitting layouts yet (#1 needs {best.unsupported}); "
                    "torchtitan or Megatron-LM run them."]
        else:
            i, e = runs
            out += [f"`curry_train train` does not run it yet ({best.unsupported}); the fastest fitting layout it "
                    f"runs is #{i} ({e.step_s / best.step_s:.2f}x #1's step time):", "",
                    f"    {command(e, hw, shape, overrides)}"]
    else:
        out += ["", f"Nothing fits: the smallest layout needs {min(e.total_bytes for e in estimates) / GB:.1f} GB per GPU "
                    f"of {hw.memory_gb * hw.headroom:.1f} usable. Add GPUs or memory, or shorten the sequence."]
    return "\n".join(out)


def _shape(args) -> tuple[Shape, list[str]]:
    for flag, value, check in (("--seq", args.seq, positive_int), ("--params", args.params, positive_float)):
        if value is not None:
            check(flag, value)
    if args.experts is None:
        with_experts(None, None, args.top_k, args.moe_every, args.expert_hidden)  # flags needing --experts: an error
    if args.overrides:
        if args.params or args.layers or args.hidden or args.heads or args.vocab or args.experts is not None:
            raise ValueError("give the model either as overrides (model=moe model.n_layer=8 ...) or as --params / "
                             "--layers --hidden --heads [--experts], not both")
        from .config import load_config

        cfg = load_config(args.overrides)
        return Shape.from_model_config(cfg.model, seq=args.seq or cfg.train.seq_len), list(args.overrides)
    seq = positive_int("--seq", args.seq or 4096)
    vocab = positive_int("--vocab", args.vocab or 32000)
    sizes = (args.layers, args.hidden, args.heads)
    if any(x is not None for x in sizes) and any(x is None for x in sizes):
        raise ValueError("--layers, --hidden and --heads go together (the exact sizes); or give --params alone")
    if args.layers is not None:
        params = args.params or 12 * args.layers * args.hidden ** 2 + vocab * args.hidden
        shape = Shape(params, positive_int("--layers", args.layers), positive_int("--hidden", args.hidden),
                      positive_int("--heads", args.heads), vocab, seq)
        return with_experts(shape, args.experts, args.top_k, args.moe_every, args.expert_hidden), []
    if args.experts is not None:
        raise ValueError("--experts needs the exact sizes --layers, --hidden and --heads (the expert banks' size "
                         "comes from the width), or model overrides such as model=moe")
    if args.params:
        return Shape.from_params(args.params, seq, vocab), []
    raise ValueError("give --params, or --layers, --hidden and --heads (and --vocab, --seq), or model overrides "
                     "(model=moe)")


def _gpus(args) -> int:
    per_node = positive_int("--gpus-per-node", args.gpus_per_node)
    if args.nodes is not None:
        gpus = positive_int("--nodes", args.nodes) * per_node
        if args.gpus is not None and args.gpus != gpus:
            raise ValueError(f"--gpus {args.gpus} != --nodes {args.nodes} x --gpus-per-node {per_node} = {gpus}; "
                             "give one of --gpus and --nodes")
        return gpus
    if args.gpus is None:
        raise ValueError("give --gpus N, or --nodes N (with --gpus-per-node G)")
    gpus = positive_int("--gpus", args.gpus)
    if gpus > per_node and gpus % per_node:
        raise ValueError(f"--gpus {gpus} spans nodes but is not a multiple of --gpus-per-node {per_node}")
    return gpus


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m curry_train plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="the model as train takes it, e.g. model=moe model.n_layer=8")
    parser.add_argument("--params", type=float, help="parameters, e.g. 7.5e9 (sizes by the usual aspect ratio)")
    parser.add_argument("--layers", type=int, help="transformer layers (with --hidden and --heads: exact sizes)")
    parser.add_argument("--hidden", type=int, help="model width d")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--vocab", type=int, help="vocabulary (default 32000)")
    parser.add_argument("--seq", type=int, help="sequence length (default 4096; with overrides train.seq_len)")
    parser.add_argument("--experts", type=int, help="mixture of experts: experts per MoE layer (>= 2)")
    parser.add_argument("--top-k", type=int, help="experts per token (default 2)")
    parser.add_argument("--moe-every", type=int, help="every N-th layer is MoE (default 1: all)")
    parser.add_argument("--expert-hidden", type=int, help="SwiGLU hidden width of an expert (default 8d/3)")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--nodes", type=int, help="nodes (GPUs = nodes x --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--memory-gb", type=float, default=80.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--intra-gbps", type=float, default=450.0, help="GB/s per GPU inside a node")
    parser.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    parser.add_argument("--schedules", default=",".join(KINDS),
                        help=f"pipeline schedules to consider, comma-separated (default: all of {','.join(KINDS)})")
    parser.add_argument("--global-batch-tokens", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--precision", choices=("mixed", "fp32"), default="mixed")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="every estimate as JSON instead of Markdown")
    args = parser.parse_args(argv)
    positive_int("--top", args.top)
    schedules = tuple(dict.fromkeys(normalize_kind(k.strip()) for k in args.schedules.split(",") if k.strip()))
    if not schedules:
        raise ValueError(f"--schedules is empty; choose from {', '.join(KINDS)}")
    hw = Hardware(_gpus(args), args.gpus_per_node, positive_float("--memory-gb", args.memory_gb),
                  positive_float("--peak-tflops", args.peak_tflops), positive_float("--mfu", args.mfu),
                  positive_float("--intra-gbps", args.intra_gbps), positive_float("--inter-gbps", args.inter_gbps))
    shape, overrides = _shape(args)
    estimates = plan(shape, hw, args.global_batch_tokens, args.precision, schedules)
    if args.json:
        print(json.dumps({"shape": {**asdict(shape), "active_params": shape.active_params}, "hardware": asdict(hw),
                          "estimates": [{**asdict(e), "command": command(e, hw, shape, overrides)}
                                        for e in estimates[:args.top]]}, indent=1))
    else:
        print(markdown(shape, hw, estimates, args.global_batch_tokens, args.top, args.precision, overrides))
    return 0
