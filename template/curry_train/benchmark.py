"""``python -m curry_train bench [NAME ...]``: measure primitives side by side, in one run.

Benchmarks are not tests: they print ratios measured on this machine (both sides in the same process,
burn-in first, then interleaved repeats so drift hits both sides alike) and write them as JSON to
``bench.out_dir``. Each bench is a function ``fn(cfg) -> dict`` registered in ``BENCHES``.

``loop``: the curry_train loop (``run_training_steps``: GA planning, token-normalised loss, metrics) against
a hand-written plain PyTorch loop on the same model and batches; target tokens/s ratio >= 0.98.
``ga``: gradient-accumulation parity: K=1 vs K=4 gradients and losses, on fixed-length and on padded
(variable-length) batches, with token and with micro-batch normalisation.
"""

from __future__ import annotations

import copy
import importlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Batches
from .loop import accumulate_gradients, build_optimizer, build_scheduler, run_training_steps
from .model import GPT, IGNORE_INDEX, GPTConfig
from .primitives import GradientAccumulation

# name -> "module:function"; imported lazily so one bench's dependencies never slow another.
BENCHES = {
    "loop": "curry_train.benchmark:bench_loop",
    "ga": "curry_train.benchmark:bench_ga_parity",
    "checkpoint": "curry_train.bench_checkpoint:bench_checkpoint",
    "pipeline": "curry_train.bench_pipeline:bench_pipeline",
    "recompute": "curry_train.bench_memory:bench_recompute",
    "sharding": "curry_train.bench_memory:bench_sharding",
}
# name -> what it prints (shown by `python -m curry_train bench --help`)
BENCH_HELP = {
    "loop": "curry_train loop vs a hand-written PyTorch loop, tokens/s ratio (target >= 0.98)",
    "ga": "gradient accumulation K=1 vs K=4: gradient error, fixed and padded batches, tokens vs mean/K",
    "checkpoint": "DCP save/load of model + AdamW: bytes per parameter, sync and async save time, Young/Daly",
    "pipeline": "every pipeline schedule at p=2, 4: analytic, simulated and measured bubble, timeline PNGs "
                "(target: GPipe, 1F1B within 0.05 of the simulator fed the run's own costs)",
    "recompute": "activation memory and step time: none, full, selective, every 2nd block (target: full <= 25%, <= 1.4x)",
    "sharding": "per-rank bytes and step time: DDP, ZeRO-1, FSDP2 shard_grad_op and full, bf16, N=2, 4 "
                "(target: FSDP2 within 1% of DDP/N)",
}


def run_accumulated_step(model, optimizer, microbatches, ga: GradientAccumulation, grad_clip: float = 0.0):
    """One optimizer step over ``microbatches`` with gradient accumulation; returns the mean token loss."""
    loss_sum, n_tokens = accumulate_gradients(model, microbatches, ga)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss_sum.item() / n_tokens


def build_model_and_batches(cfg):
    """The configured GPT, seeded as ``train`` seeds it, and the configured training batches."""
    from .train import build_batches, seed_everything

    seed_everything(cfg.seed)
    return GPT(GPTConfig.from_config(cfg.model)), build_batches(cfg)


def _plain_pytorch_steps(model, optimizer, scheduler, batches: Batches, start: int, n: int, grad_clip: float):
    """The baseline a user would write by hand: no primitives, mean cross-entropy, one batch per step."""
    for step in range(start, start + n):
        x, y = batches.global_batch(step)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
    return loss.item()


def bench_loop(cfg) -> dict:
    b = cfg.bench
    model, batches = build_model_and_batches(cfg)
    t = cfg.train
    sides = {}
    for name in ("curry_train", "plain"):
        m = copy.deepcopy(model)
        opt = build_optimizer(m, t.lr, t.weight_decay, (t.beta1, t.beta2))
        sides[name] = {"model": m, "opt": opt, "sched": build_scheduler(opt, t.warmup_steps, t.steps, t.min_lr_ratio),
                       "seconds": 0.0, "step": 0}
    ga = GradientAccumulation(1)

    def run(name, n):
        s = sides[name]
        t0 = time.perf_counter()
        if name == "curry_train":
            run_training_steps(s["model"], s["opt"], s["sched"], batches, ga, s["step"] + n, start_step=s["step"],
                               grad_clip=t.grad_clip, log_every=0, progress=False)
        else:
            _plain_pytorch_steps(s["model"], s["opt"], s["sched"], batches, s["step"], n, t.grad_clip)
        s["step"] += n
        return time.perf_counter() - t0

    for name in sides:
        run(name, b.burn_in)
    ratios = []
    for r in range(b.repeats):  # interleave, alternating which side goes first
        order = ("curry_train", "plain") if r % 2 == 0 else ("plain", "curry_train")
        seconds = {name: run(name, b.steps_per_repeat) for name in order}
        for name in order:
            sides[name]["seconds"] += seconds[name]
        ratios.append(seconds["plain"] / seconds["curry_train"])
    tokens = b.repeats * b.steps_per_repeat * t.batch_size * t.seq_len
    tps = {name: tokens / s["seconds"] for name, s in sides.items()}
    ratio = statistics.median(ratios)  # per-round ratios: robust to load spikes that hit one round
    print(f"loop vs plain PyTorch ({cfg.model.name}, batch {t.batch_size}x{t.seq_len}, "
          f"{b.repeats}x{b.steps_per_repeat} interleaved steps after {b.burn_in} burn-in)")
    print(f"  curry_train loop : {tps['curry_train']:10.0f} tokens/s")
    print(f"  plain PyTorch    : {tps['plain']:10.0f} tokens/s")
    print(f"  ratio            : {ratio:.3f}   median of {b.repeats} rounds, min {min(ratios):.3f} max {max(ratios):.3f}"
          f"   (target >= 0.98: {'PASS' if ratio >= 0.98 else 'MISS'})")
    return {"tokens_per_s": tps, "ratio": ratio, "round_ratios": ratios, "target": 0.98}


def grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def ga_parity(model, x, y, k: int, normalization: str) -> tuple[float, torch.Tensor]:
    """Loss and flattened gradient of one global batch processed as ``k`` micro-batches."""
    ga = GradientAccumulation(k, normalization=normalization)
    micro = list(zip(x.chunk(k), y.chunk(k)))
    model.zero_grad(set_to_none=True)
    loss_sum, n = accumulate_gradients(model, micro, ga)
    return loss_sum.item() / n, grad_vector(model)


def bench_ga_parity(cfg, k: int = 4) -> dict:
    """Max |grad(K=k) - grad(K=1)| relative to max |grad(K=1)|, for fixed and padded batches, both normalisations."""
    model, batches = build_model_and_batches(cfg)
    rows = []
    for variable_length in (False, True):
        data = Batches(batches.tokens, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed,
                       variable_length=variable_length, min_len=cfg.data.min_len)
        x, y = data.global_batch(0)
        loss_ref, g_ref = ga_parity(model, x, y, 1, "tokens")
        for normalization in ("tokens", "microbatches"):
            loss_k, g_k = ga_parity(model, x, y, k, normalization)
            rows.append({
                "batch": "padded" if variable_length else "fixed-length",
                "normalization": normalization,
                "loss_diff": abs(loss_k - loss_ref),
                "grad_rel_err": ((g_k - g_ref).abs().max() / g_ref.abs().max()).item(),
            })
    print(f"GA parity: K=1 vs K={k} on one global batch of {cfg.train.batch_size}x{cfg.train.seq_len}")
    print(f"  {'batch':13s} {'normalization':13s} {'|loss diff|':>12s} {'max rel grad err':>17s}")
    for r in rows:
        print(f"  {r['batch']:13s} {r['normalization']:13s} {r['loss_diff']:12.2e} {r['grad_rel_err']:17.2e}")
    return {"k": k, "rows": rows}


def run_benches(cfg, names: list[str] | None = None) -> dict:
    names = names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown bench {unknown}; choose from {list(BENCHES)}")
    results = {}
    out_dir = Path(cfg.bench.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        module, fn = BENCHES[name].split(":")
        print(f"\n== bench {name} ==", flush=True)
        results[name] = getattr(importlib.import_module(module), fn)(cfg)
        (out_dir / f"{name}.json").write_text(json.dumps(results[name], indent=2, default=float))
    print(f"\nresults written to {out_dir}/")
    return results
