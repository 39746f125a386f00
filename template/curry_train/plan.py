"""``python -m curry_train plan``: memory, bubble, communication and step time per layout, before renting GPUs.

A model, not a promise. For every layout ``dp x tp x pp x cp`` of the GPUs, every sharding mode, recompute mode and
micro-batch size, per GPU:

* **model states**: ``primitives.distributed_optimizer.zero_bytes_per_rank`` (ZeRO paper, Rajbhandari et al. 2019)
  on the ``Psi / (tp * pp)`` parameters a rank holds, over its ``dp`` ranks (mixed precision: 2 + 2 + 12 bytes per
  parameter; ``--precision fp32``: 4 + 4 + 8);
* **activations** per transformer layer and micro-batch, in bytes at 2-byte activations (Korthikanti et al. 2022,
  TP with sequence parallelism): ``34 s b h / t`` without recompute for fused attention (SDPA/flash: the
  ``s x s`` scores are not stored; ``attention="eager"`` adds the paper's ``5 a s^2 b`` for materialised scores,
  softmax and its dropout mask), ``22 s b h / t`` with selective recompute (``primitives.recompute``'s policy keeps
  the matmul and attention outputs: q, k, v, attention, out-proj, 4h up, down, plus the layer input = 11 values),
  ``2 s b h / t`` with full recompute (the layer input only); ``s`` is the sequence a rank holds (``seq / cp``);
  times the layers of a stage and the micro-batches a 1F1B stage holds (``min(p, m)``: the first stage's in-flight
  count), plus the final norm's input and output (``4 s b h``) and the fp32 logits (``4 s b V / t``). Checked
  against ``activation_memory`` of the reference GPT (tests/test_plan.py);
* **pipeline bubble**: ``primitives.pipeline.sim.simulate`` (uniform stages), the same simulator the pipeline skill
  and bench use;
* **communication per step**, bytes one GPU sends (``DP_VOLUME``): DP ``k (d-1)/d`` times the rank's 2-byte gradients
  with ``k = 2`` for DDP's all-reduce, ZeRO-1's reduce-scatter + all-gather and FSDP ``shard_grad_op``'s one
  all-gather + reduce-scatter, ``k = 3`` for FSDP ``full`` (all-gather in forward and again in backward); TP four all-reduces
  of ``b s h`` per layer and micro-batch (two forward, two backward; + two with full recompute); PP one activation
  and one gradient of ``b s h`` per micro-batch; CP ``cp - 1`` K/V blocks forward, twice that backward;
* **step time**: ``6 Psi tokens`` FLOPs (x 4/3 with full recompute) over ``gpus x peak x MFU``, stretched by the
  bubble, plus each axis's bytes over its link (TP and CP inside a node, DP and PP across nodes when the job
  spans more than one), with no overlap assumed.

A layout fits when states + activations <= ``memory x headroom``. Layouts are ranked fitting first, then by step
time; the first is recommended with its ``torchrun`` command line.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from .primitives._checks import positive_float, positive_int
from .primitives.distributed_optimizer import SHARDINGS, zero_bytes_per_rank
from .primitives.pipeline.sim import simulate

GB = 1e9
DP_VOLUME = {"no_shard": 2, "zero1": 2, "shard_grad_op": 2, "full": 3}  # x (d-1)/d x the rank's gradient bytes
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer: parameters and the sizes the activation formula needs."""

    params: float
    n_layer: int
    d_model: int
    n_head: int
    vocab: int = 32000
    seq: int = 4096

    @classmethod
    def from_params(cls, params: float, seq: int = 4096, vocab: int = 32000) -> "Shape":
        """Sizes for ``params`` by the usual aspect ratio (``12 L d^2 = params``, ``d = 128 L``), heads of 128: an
        assumption, printed with the plan; give the real sizes when you have them."""
        positive_float("--params", params)
        d = max(128, round((params * 128 / 12) ** (1 / 3) / 128) * 128)
        layers = max(1, round(params / (12 * d * d)))
        return cls(params, layers, d, d // 128, vocab, seq)


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


@dataclass
class Estimate:
    layout: Layout
    states_bytes: dict = field(default_factory=dict)
    activation_bytes: float = 0.0
    total_bytes: float = 0.0
    fits: bool = False
    bubble: float = 0.0
    comm_bytes: dict = field(default_factory=dict)
    step_s: float = 0.0
    microbatches: int = 0
    excluded: str | None = None


def activation_bytes_per_layer(shape: Shape, micro_batch: int, tp: int = 1, cp: int = 1, recompute: str = "none",
                               bytes_per_value: int = 2, attention: str = "sdpa") -> float:
    """Bytes one layer keeps for backward per micro-batch (the module docstring gives the terms)."""
    s, b, h, a = shape.seq / cp, micro_batch, shape.d_model, shape.n_head
    per_value = bytes_per_value / 2  # the coefficients count 2-byte activations
    coefficient = {"full": 2, "selective": 22, "none": 34}[recompute]
    scores = 5 * a * s * s * b if attention == "eager" and recompute == "none" else 0
    return (coefficient * s * b * h + scores) / tp * per_value


def activation_bytes(shape: Shape, micro_batch: int, layers: int, in_flight: int = 1, tp: int = 1, cp: int = 1,
                     recompute: str = "none", bytes_per_value: int = 2, attention: str = "sdpa") -> float:
    """A rank's activation bytes: ``in_flight`` micro-batches of ``layers`` layers, the final norm and the logits."""
    s = shape.seq / cp
    per_layer = activation_bytes_per_layer(shape, micro_batch, tp, cp, recompute, bytes_per_value, attention)
    final_norm = 2 * s * micro_batch * shape.d_model * bytes_per_value
    logits = 4 * s * micro_batch * shape.vocab / tp
    return per_layer * layers * in_flight + final_norm + logits


@lru_cache(maxsize=None)
def pipeline_bubble(p: int, m: int, kind: str = "1f1b") -> float:
    """The simulator's bubble fraction for ``p`` stages and ``m`` micro-batches (uniform stages, free transfers)."""
    return 0.0 if p == 1 else simulate(kind, p, m).bubble_fraction


def estimate(shape: Shape, hw: Hardware, layout: Layout, global_batch_tokens: int, precision: str = "mixed") -> Estimate:
    """Every number of one layout (``Estimate.excluded`` says why a layout cannot run at all)."""
    L = layout
    est = Estimate(L)
    rows = global_batch_tokens / shape.seq
    reasons = [(shape.n_layer % L.pp, f"{shape.n_layer} layers not divisible by pp={L.pp}"),
               (shape.n_head % L.tp, f"{shape.n_head} heads not divisible by tp={L.tp}"),
               (shape.seq % (2 * L.cp) if L.cp > 1 else 0, f"seq {shape.seq} not divisible by 2*cp={2 * L.cp}"),
               (rows % (L.dp * L.micro_batch), f"{rows:g} rows per step not divisible by dp x micro-batch = "
                                               f"{L.dp} x {L.micro_batch}"),
               (L.tp > hw.gpus_per_node, f"tp={L.tp} spans nodes of {hw.gpus_per_node} GPUs")]
    est.excluded = next((why for bad, why in reasons if bad), None)
    if est.excluded:
        return est
    m = int(rows // (L.dp * L.micro_batch))
    est.microbatches = m
    if L.pp > 1 and m < L.pp:
        est.excluded = f"{m} micro-batches per step < pp={L.pp} stages (1F1B needs at least one per stage)"
        return est
    psi_rank = shape.params / (L.tp * L.pp)
    est.states_bytes = zero_bytes_per_rank(psi_rank, L.dp, L.sharding, precision)
    layers = shape.n_layer // L.pp
    in_flight = min(L.pp, m) if L.pp > 1 else 1
    est.activation_bytes = activation_bytes(shape, L.micro_batch, layers, in_flight, L.tp, L.cp, L.recompute,
                                            2 if precision == "mixed" else 4)
    est.total_bytes = est.states_bytes["total"] + est.activation_bytes
    est.fits = est.total_bytes <= hw.memory_gb * GB * hw.headroom
    est.bubble = pipeline_bubble(L.pp, m)
    bsh = L.micro_batch * (shape.seq / L.cp) * shape.d_model * 2
    grad_bytes = 2 * psi_rank
    est.comm_bytes = {
        "dp": DP_VOLUME[L.sharding] * (L.dp - 1) / L.dp * grad_bytes if L.dp > 1 else 0.0,
        "tp": (6 if L.recompute == "full" else 4) * 2 * (L.tp - 1) / L.tp * bsh * layers * m if L.tp > 1 else 0.0,
        "pp": 2 * bsh * m if L.pp > 1 else 0.0,
        "cp": 3 * (L.cp - 1) * 2 * bsh * layers * m if L.cp > 1 else 0.0,
    }
    flops = 6 * shape.params * global_batch_tokens * (4 / 3 if L.recompute == "full" else 1.0)
    compute = flops / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)
    multi_node = hw.gpus > hw.gpus_per_node
    link = {"tp": hw.intra_gbps, "cp": hw.intra_gbps,
            "dp": hw.inter_gbps if multi_node else hw.intra_gbps, "pp": hw.inter_gbps if multi_node else hw.intra_gbps}
    est.step_s = compute / (1 - est.bubble) + sum(est.comm_bytes[k] / (link[k] * GB) for k in est.comm_bytes)
    return est


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(hw: Hardware, micro_batches=(1, 2, 4), shardings=SHARDINGS, recomputes=RECOMPUTE) -> list[Layout]:
    out = []
    for tp in divisors(hw.gpus):
        for pp in divisors(hw.gpus // tp):
            for cp in divisors(hw.gpus // (tp * pp)):
                dp = hw.gpus // (tp * pp * cp)
                for sharding in shardings:
                    if dp == 1 and sharding != "no_shard":
                        continue
                    for recompute in recomputes:
                        for mb in micro_batches:
                            out.append(Layout(dp, tp, pp, cp, sharding, recompute, mb))
    return out


def plan(shape: Shape, hw: Hardware, global_batch_tokens: int, precision: str = "mixed") -> list[Estimate]:
    """Every candidate layout, fitting ones first, fastest first."""
    positive_int("--gpus", hw.gpus)
    positive_int("--global-batch-tokens", global_batch_tokens)
    estimates = [estimate(shape, hw, layout, global_batch_tokens, precision) for layout in candidates(hw)]
    runnable = [e for e in estimates if e.excluded is None]
    if not runnable:
        raise ValueError(f"no layout can run: {estimates[0].excluded} (and every other layout likewise); change "
                         "--global-batch-tokens, --seq or the sizes")
    return sorted(runnable, key=lambda e: (not e.fits, e.step_s, e.total_bytes))


def command(e: Estimate, hw: Hardware, shape: Shape) -> str:
    L = e.layout
    nodes = math.ceil(hw.gpus / hw.gpus_per_node)
    per_node = min(hw.gpus, hw.gpus_per_node)
    rows = L.dp * L.micro_batch * e.microbatches
    steps = (f"parallel.n_microbatches={e.microbatches}" if L.pp > 1
             else f"train.gradient_accumulation_steps={e.microbatches}")
    recompute = {"none": "false", "selective": "selective", "full": "full"}[L.recompute]
    return (f"torchrun --nnodes {nodes} --nproc-per-node {per_node} -m curry_train train parallel.dp={L.dp} "
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


def markdown(shape: Shape, hw: Hardware, estimates: list[Estimate], global_batch_tokens: int, top: int = 10,
             precision: str = "mixed") -> str:
    out = [f"# plan: {shape.params / 1e9:g}B parameters ({shape.n_layer} layers, d {shape.d_model}, {shape.n_head} "
           f"heads, seq {shape.seq}) on {hw.gpus} GPUs of {hw.memory_gb:g} GB; {global_batch_tokens:,} tokens per step",
           "", f"Model states alone over {hw.gpus} data-parallel GPUs ({precision} precision Adam):", "",
           *zero_table(shape, hw.gpus, precision), "",
           f"Assumed: peak {hw.peak_tflops:g} TFLOP/s at MFU {hw.mfu:g}, {hw.intra_gbps:g} GB/s in a node of "
           f"{hw.gpus_per_node}, {hw.inter_gbps:g} GB/s across, usable memory {hw.headroom:.0%}; no overlap of "
           "communication with compute. A model, not a measurement.", "",
           "| # | dp x tp x pp x cp | sharding | recompute | mb x m | states GB | activations GB | fits | bubble | "
           "comm GB (dp/tp/pp/cp) | step s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(estimates[:top], 1):
        L, c = e.layout, e.comm_bytes
        out.append(f"| {i} | {L.dp} x {L.tp} x {L.pp} x {L.cp} | {L.sharding} | {L.recompute} | {L.micro_batch} x "
                   f"{e.microbatches} | {e.states_bytes['total'] / GB:.1f} | {e.activation_bytes / GB:.1f} | "
                   f"{'yes' if e.fits else 'NO'} | {e.bubble:.3f} | {c['dp'] / GB:.2f}/{c['tp'] / GB:.2f}/"
                   f"{c['pp'] / GB:.2f}/{c['cp'] / GB:.2f} | {e.step_s:.2f} |")
    best = estimates[0]
    if best.fits:
        out += ["", f"Recommended: #1, the fastest layout that fits ({best.total_bytes / GB:.1f} of "
                    f"{hw.memory_gb:g} GB). Run it with:", "", f"    {command(best, hw, shape)}"]
    else:
        out += ["", f"Nothing fits: the smallest layout needs {min(e.total_bytes for e in estimates) / GB:.1f} GB per GPU "
                    f"of {hw.memory_gb * hw.headroom:.1f} usable. Add GPUs or memory, or shorten the sequence."]
    return "\n".join(out)


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m curry_train plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, help="parameters, e.g. 7.5e9 (sizes by the usual aspect ratio)")
    parser.add_argument("--layers", type=int, help="transformer layers (with --hidden and --heads: exact sizes)")
    parser.add_argument("--hidden", type=int, help="model width d")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--memory-gb", type=float, default=80.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--global-batch-tokens", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--precision", choices=("mixed", "fp32"), default="mixed")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="every estimate as JSON instead of Markdown")
    args = parser.parse_args(argv)
    if args.layers and args.hidden and args.heads:
        params = args.params or 12 * args.layers * args.hidden ** 2 + args.vocab * args.hidden
        shape = Shape(params, args.layers, args.hidden, args.heads, args.vocab, args.seq)
    elif args.params:
        shape = Shape.from_params(args.params, args.seq, args.vocab)
    else:
        raise ValueError("give --params, or --layers, --hidden and --heads (and --vocab, --seq)")
    hw = Hardware(positive_int("--gpus", args.gpus), positive_int("--gpus-per-node", args.gpus_per_node),
                  positive_float("--memory-gb", args.memory_gb), positive_float("--peak-tflops", args.peak_tflops),
                  positive_float("--mfu", args.mfu))
    estimates = plan(shape, hw, args.global_batch_tokens, args.precision)
    if args.json:
        print(json.dumps({"shape": asdict(shape), "hardware": asdict(hw),
                          "estimates": [{**asdict(e), "command": command(e, hw, shape)} for e in estimates[:args.top]]},
                         indent=1))
    else:
        print(markdown(shape, hw, estimates, args.global_batch_tokens, args.top, args.precision))
    return 0
