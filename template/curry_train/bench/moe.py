"""``python -m curry_train bench moe``: mixture of experts measured: load balance, dropped tokens, all-to-all bytes,
step time against a dense MLP of equal active parameters.

The model is this bench's own small decoder (``MoEDecoder``: token + position embeddings, ``n_layer`` pre-norm
blocks of causal attention and an MLP, final norm, untied head), not the configured one: the MLP of every block is
a ``primitives.moe.MoEMLP`` (``n_experts`` SwiGLU experts of hidden ``d_ff``, ``top_k``, ``capacity_factor``) or, for
the dense side, one SwiGLU MLP of hidden ``top_k * d_ff`` (the same active parameters per token). Data: the configured
batches (``train.batch_size`` x ``train.seq_len``, ``data.*``), AdamW at ``train.lr``, seed ``seed``.

1. Balancing: ``steps`` training steps from the same initial weights under three settings: ``none`` (no balancing),
   ``aux loss`` (Switch load-balancing loss, ``aux_loss_weight``) and ``bias`` (DeepSeek-V3 auxiliary-loss-free:
   ``update_moe_biases`` after every step at ``bias_update_rate``). Per setting: tokens routed to each expert over
   the run (per layer; the returned counts), the max/mean load per step (mean over the run and at the last step),
   the fraction of assignments dropped at capacity, and the mean cross-entropy of the last 5 steps. With ``out_dir``
   a histogram PNG of the per-expert share (``moe.png``).
2. Expert parallelism: ``launch`` 2 gloo ranks (``ep_size``), each with half the batch and its half of the experts
   (``MoEMLP.from_dense``); every ``dist.all_to_all_single`` call is counted (bytes of the input buffer, split into
   rows kept on the rank and rows sent to the other) in forward and backward, per step, against the formula
   ``2 * T * top_k * d_model * 4`` bytes per layer forward (``T`` = the rank's tokens; fp32).
3. Step time (forward, backward, AdamW) of the dense decoder and of the MoE decoder with each expert
   implementation (``grouped_mm``, ``bmm``, ``loop``): median over ``timing_rounds`` interleaved rounds after one
   burn-in step, ratio = median of per-round ratios to dense.

Threads: ``threads=1`` (default) runs parts 1 and 3 single-threaded (each EP rank of part 2 is single-threaded
too, as ``launch`` sets it) and restores the previous count afterwards: on a 2-core machine shared with other jobs,
two OpenMP threads made the same MoE step 5-30x slower, with a spread that hid every difference between the
implementations (measured; one thread: 52-70 ms, stable). ``threads=None`` keeps torch's setting.

Tables are printed as markdown.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..data import build_batches, seed_everything
from ..distributed import launch
from ..primitives.moe import MoEMLP, moe_aux_loss, update_moe_biases
from .common import interleaved_rounds, median_ratio

VOCAB = 256  # byte tokens (data.py)
BALANCING = ("none", "aux loss", "bias")
IMPLS = ("grouped_mm", "bmm", "loop")


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d_model, hidden, bias=False), nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp: nn.Module):
        super().__init__()
        self.n_head = n_head
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = mlp

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


class MoEDecoder(nn.Module):
    """Token ids ``(B, T)`` -> logits; ``moe=None`` gives dense SwiGLU MLPs of hidden ``dense_hidden``, else
    ``MoEMLP(d_model, **moe)`` in every block."""

    def __init__(self, d_model: int, n_layer: int, n_head: int, block_size: int, moe: dict | None = None,
                 dense_hidden: int = 0):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        mlp = (lambda: MoEMLP(d_model, **moe)) if moe is not None else (lambda: SwiGLU(d_model, dense_hidden))
        self.blocks = nn.ModuleList(Block(d_model, n_head, mlp()) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def moe_layers(self) -> list[MoEMLP]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoEMLP)]


def _ce(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)


def _settings(s: dict) -> dict:
    """MoEMLP keyword arguments for one balancing setting (``s``: the bench's sizes and weights)."""
    base = dict(d_ff=s["d_ff"], n_experts=s["n_experts"], top_k=s["top_k"], capacity_factor=s["capacity_factor"])
    return {
        "none": {**base, "aux_loss_weight": 0.0},
        "aux loss": {**base, "aux_loss_weight": s["aux_loss_weight"]},
        "bias": {**base, "aux_loss_weight": 0.0, "bias_balancing": True, "bias_update_rate": s["bias_update_rate"]},
    }


def _build(s: dict, seed: int, moe: dict | None, block_size: int) -> MoEDecoder:
    seed_everything(seed)
    return MoEDecoder(s["d_model"], s["n_layer"], s["n_head"], block_size, moe=moe,
                      dense_hidden=s["top_k"] * s["d_ff"])


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _active_params(model: MoEDecoder) -> int:
    """Parameters a token uses: everything but the experts it is not routed to (``top_k`` of ``n_experts``)."""
    total = _n_params(model)
    for layer in model.moe_layers():
        per_expert = sum(w.numel() for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2)
                         if w is not None) // layer.experts.n_local
        total -= (layer.experts.n_local - layer.router.top_k) * per_expert
    return total


def _balancing_run(s: dict, setting: str, moe: dict, batches, cfg, steps: int) -> dict:
    model = _build(s, cfg.seed, moe, cfg.train.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    layers = model.moe_layers()
    counts = torch.zeros(len(layers), s["n_experts"], dtype=torch.long)
    imbalance, dropped, losses = [], [], []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = batches.global_batch(step)
        ce = _ce(model, x, y)
        (ce + moe_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if setting == "bias":
            update_moe_biases(model)
        loads = torch.stack([m.tokens_per_expert for m in layers])
        counts += loads
        imbalance.append((loads.max(1).values / loads.float().mean(1)).mean().item())
        dropped.append(statistics.mean(m.dropped_fraction.item() for m in layers))
        losses.append(ce.item())
    seconds = time.perf_counter() - t0
    total = counts.sum(0)
    return {
        "setting": setting, "tokens_per_expert": counts.tolist(),
        "max_over_mean_run": (total.max() / total.float().mean()).item(),
        "max_over_mean_per_step": statistics.mean(imbalance), "max_over_mean_last": imbalance[-1],
        "dropped_fraction": statistics.mean(dropped), "dropped_fraction_last": dropped[-1],
        "final_loss": statistics.mean(losses[-5:]), "ms_per_step": 1000 * seconds / steps,
    }


class _CountingAllToAll:
    """Wraps ``dist.all_to_all_single``: bytes of every call's input, split into rows kept and rows sent away."""

    def __init__(self, rank: int):
        self.rank, self.phase, self.calls = rank, "forward", []
        self.original = dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        ws = dist.get_world_size(group)
        rows = input_split_sizes or [input.size(0) // ws] * ws
        row_bytes = input[0].numel() * input.element_size() if input.size(0) else 0
        kind = "counts" if input.dtype == torch.long else "tokens"
        self.calls.append({"phase": self.phase, "kind": kind, "bytes": input.numel() * input.element_size(),
                           "remote_bytes": sum(r for i, r in enumerate(rows) if i != self.rank) * row_bytes})
        return self.original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def _ep_rank(rank, world_size, s, seed, lr, plain_cfg, steps):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(plain_cfg)
    moe = _settings(s)["aux loss"]
    dense = _build(s, seed, moe, cfg.train.seq_len)
    model = copy.deepcopy(dense)
    for block in model.blocks:
        block.mlp = MoEMLP.from_dense(block.mlp, dist.group.WORLD)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    replicated = [p for n, p in model.named_parameters() if ".experts.w" not in n]
    batches = build_batches(cfg)
    counter = _CountingAllToAll(rank)
    dist.all_to_all_single = counter
    try:
        per_step, tokens, kept = [], 0, []
        for step in range(steps):
            x, y = batches.microbatches(step, rank, world_size, 1)[0]
            counter.phase, start = "forward", len(counter.calls)
            loss = (_ce(model, x, y) + moe_aux_loss(model)) / world_size  # summed over ranks: the global mean
            # rows this rank dispatches (its kept assignments) + rows it computes for the others and sends back
            kept.append(sum(sum(m.experts.last_counts["sent"]) + sum(m.experts.last_counts["received"])
                            for m in model.moe_layers()))
            counter.phase = "backward"
            loss.backward()
            for p in replicated:  # router, attention, embeddings: data parallel over the same ranks
                dist.all_reduce(p.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            per_step.append(counter.calls[start:])
            tokens = x.numel()
    finally:
        dist.all_to_all_single = counter.original
    return {"calls": per_step, "tokens": tokens, "kept": kept}


def _ep_bytes(s: dict, cfg, steps: int, ep_size: int) -> dict:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    ranks = launch(_ep_rank, ep_size, s, cfg.seed, cfg.train.lr, plain, steps, timeout=300)
    n_layer, top_k, d = s["n_layer"], s["top_k"], s["d_model"]
    rows = []
    for rank, r in enumerate(ranks):
        def per_step(phase, kind, key="bytes"):
            return statistics.mean(sum(c[key] for c in calls if c["phase"] == phase and c["kind"] == kind)
                                   for calls in r["calls"])
        formula = 2 * r["tokens"] * top_k * d * 4 * n_layer
        rows.append({
            "rank": rank, "tokens": r["tokens"], "formula_forward_bytes": formula,
            "rows_forward_bytes": statistics.mean(r["kept"]) * d * 4,
            "forward_bytes": per_step("forward", "tokens"), "backward_bytes": per_step("backward", "tokens"),
            "forward_remote_bytes": per_step("forward", "tokens", "remote_bytes"),
            "backward_remote_bytes": per_step("backward", "tokens", "remote_bytes"),
            "count_bytes": per_step("forward", "counts"),
            "calls_per_step": statistics.mean(len(c) for c in r["calls"]),
        })
    return {"ep_size": ep_size, "n_layer": n_layer, "steps": steps, "rows": rows}


def _timing(s: dict, cfg, rounds: int) -> list[dict]:
    x, y = build_batches(cfg).global_batch(0)
    base = _settings(s)["aux loss"]
    sides = {"dense": _build(s, cfg.seed, None, cfg.train.seq_len)}
    for impl in IMPLS:
        sides[f"moe {impl}"] = _build(s, cfg.seed, {**base, "impl": impl}, cfg.train.seq_len)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=cfg.train.lr) for name, m in sides.items()}

    def step(name):
        t0 = time.perf_counter()
        model = sides[name]
        (_ce(model, x, y) + moe_aux_loss(model)).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in sides:
        step(name)  # burn-in
    seconds = interleaved_rounds(step, list(sides), rounds)
    tokens = x.numel()
    return [{"model": name, "params": _n_params(m), "active_params": _active_params(m),
             "step_ms": 1000 * statistics.median(seconds[name]),
             "tokens_per_s": tokens / statistics.median(seconds[name]),
             "ratio_to_dense": median_ratio(seconds[name], seconds["dense"])} for name, m in sides.items()]


def plot_moe(result: dict, path):
    """Per-expert share of the routed assignments over the run, one panel per balancing setting, bars per layer."""
    from .plots import COLORS, plt, save

    runs = result["balancing"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), sharey=True, squeeze=False)
    colors = [COLORS["F"], COLORS["B"], COLORS["W"], COLORS["I"]]
    for ax, run in zip(axes[0], runs):
        layers = run["tokens_per_expert"]
        n_exp = len(layers[0])
        width = 0.8 / len(layers)
        for i, counts in enumerate(layers):
            total = sum(counts)
            ax.bar([e + (i - (len(layers) - 1) / 2) * width for e in range(n_exp)], [c / total for c in counts],
                   width, color=colors[i % len(colors)], label=f"layer {i}")
        ax.axhline(1 / n_exp, color="black", linestyle="--", linewidth=0.8, label="uniform")
        ax.set_xticks(range(n_exp))
        ax.set_xlabel("expert")
        ax.set_title(f"{run['setting']}: max/mean {run['max_over_mean_run']:.2f}, dropped "
                     f"{100 * run['dropped_fraction']:.1f}%", fontsize=9, loc="left")
    axes[0, 0].set_ylabel("share of routed assignments")
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"MoE tokens per expert over {result['steps']} steps (top-{result['sizes']['top_k']} of "
                 f"{result['sizes']['n_experts']}, capacity factor {result['sizes']['capacity_factor']})", fontsize=10)
    return save(fig, path)


def bench_moe(cfg, steps: int = 30, n_experts: int = 8, top_k: int = 2, d_model: int = 64, n_layer: int = 2,
              n_head: int = 4, d_ff: int = 128, capacity_factor: float = 1.25, aux_loss_weight: float = 0.01,
              bias_update_rate: float = 0.01, ep_size: int = 2, ep_steps: int = 3, timing_rounds: int = 7,
              threads: int | None = 1, out_dir=None) -> dict:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench_moe(cfg, steps, n_experts, top_k, d_model, n_layer, n_head, d_ff, capacity_factor,
                          aux_loss_weight, bias_update_rate, ep_size, ep_steps, timing_rounds, out_dir)
    finally:
        torch.set_num_threads(previous)


def _bench_moe(cfg, steps, n_experts, top_k, d_model, n_layer, n_head, d_ff, capacity_factor, aux_loss_weight,
               bias_update_rate, ep_size, ep_steps, timing_rounds, out_dir) -> dict:
    torch.manual_seed(cfg.seed)
    s = dict(n_experts=n_experts, top_k=top_k, d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=d_ff,
             capacity_factor=capacity_factor, aux_loss_weight=aux_loss_weight, bias_update_rate=bias_update_rate)
    B, T = cfg.train.batch_size, cfg.train.seq_len
    batches = build_batches(cfg)
    print(f"MoE decoder: {n_layer} blocks, d_model {d_model}, {n_experts} SwiGLU experts of d_ff {d_ff}, top-{top_k}, "
          f"capacity factor {capacity_factor} (capacity {math.ceil(capacity_factor * B * T * top_k / n_experts)} "
          f"per expert at {B}x{T} tokens), softmax gating, AdamW lr {cfg.train.lr}, {steps} steps, fp32, "
          f"threads: {torch.get_num_threads()}")
    runs = [_balancing_run(s, name, kw, batches, cfg, steps) for name, kw in _settings(s).items()]
    print("\n| balancing | max/mean load (run) | max/mean per step (mean) | last step | dropped | dropped last step "
          "| loss (last 5) | ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        weight = {"none": "", "aux loss": f" (w={aux_loss_weight})",
                  "bias": f" (rate={bias_update_rate})"}[r["setting"]]
        print(f"| {r['setting']}{weight} | {r['max_over_mean_run']:.3f} | {r['max_over_mean_per_step']:.3f} | "
              f"{r['max_over_mean_last']:.3f} | {100 * r['dropped_fraction']:.2f}% | "
              f"{100 * r['dropped_fraction_last']:.2f}% | {r['final_loss']:.3f} | {r['ms_per_step']:.0f} |")
    print("\nTokens per expert over the run (layer 0 | layer 1 ...):\n")
    print("| balancing | " + " | ".join(f"e{e}" for e in range(n_experts)) + " |")
    print("|---|" + "---|" * n_experts)
    for r in runs:
        cells = [" / ".join(str(layer[e]) for layer in r["tokens_per_expert"]) for e in range(n_experts)]
        print(f"| {r['setting']} | " + " | ".join(cells) + " |")

    ep = _ep_bytes(s, cfg, ep_steps, ep_size)
    print(f"\nAll-to-all bytes per step at EP={ep_size} (gloo, fp32, {n_layer} MoE layers, top-{top_k}, d_model "
          f"{d_model}; mean over {ep_steps} steps; formula = 2 * T * top_k * d_model * 4 B per layer forward, summed "
          f"over layers; sent = this rank's assignments left after capacity drops, received = rows it computes for "
          f"the other ranks' tokens and returns; bytes include the rows a rank keeps for itself):\n")
    print("| rank | tokens T | formula fwd | (sent + received rows) * d * 4 | measured fwd | "
          "of which to the other rank | measured bwd | to the other rank | counts exchange | all-to-all calls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ep["rows"]:
        print(f"| {r['rank']} | {r['tokens']} | {r['formula_forward_bytes']:,} | {r['rows_forward_bytes']:,.0f} | "
              f"{r['forward_bytes']:,.0f} ({r['forward_bytes'] / r['formula_forward_bytes']:.3f}) | "
              f"{r['forward_remote_bytes']:,.0f} | "
              f"{r['backward_bytes']:,.0f} | {r['backward_remote_bytes']:,.0f} | {r['count_bytes']:,.0f} | "
              f"{r['calls_per_step']:.0f} |")

    timing = _timing(s, cfg, timing_rounds)
    print(f"\nStep time (fwd + bwd + AdamW), batch {B}x{T}, median of {timing_rounds} interleaved rounds; dense MLP "
          f"hidden = top_k * d_ff = {top_k * d_ff}:\n")
    print("| model | parameters | active per token | step | tokens/s | vs dense |")
    print("|---|---|---|---|---|---|")
    for r in timing:
        print(f"| {r['model']} | {r['params']:,} | {r['active_params']:,} | {r['step_ms']:.1f} ms | "
              f"{r['tokens_per_s']:,.0f} | {r['ratio_to_dense']:.2f}x |")
    result = {"sizes": s, "steps": steps, "batch": [B, T], "balancing": runs, "ep": ep, "timing": timing}
    if out_dir is not None:
        from pathlib import Path

        result["png"] = str(plot_moe(result, Path(out_dir) / "moe.png"))
        print(f"\nhistogram: {result['png']}")
    return result
