"""``python -m curry_train bench [NAME ...]``: measure primitives side by side, in one run.

Benchmarks are not tests: they print what they measured on this machine, with the target where a bench has one,
and write it as JSON to ``bench.out_dir``. The timed comparisons (``loop``, ``recompute``, ``sharding``) run every
side in one run, burn-in first, then interleaved rounds (``common.interleaved_rounds``) so drift hits all sides
alike, and report medians of per-round ratios. Each bench is a function ``fn(cfg) -> dict`` registered in
``BENCHES``.

One module per bench (``loop``, ``ga``, ``recompute``, ``sharding``, ``pipeline``, ``checkpoint``), helpers they
share in ``common``, Gantt plots in ``plots``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# name -> "module:function"; imported lazily so one bench's dependencies never slow another.
BENCHES = {
    "loop": "curry_train.bench.loop:bench_loop",
    "ga": "curry_train.bench.ga:bench_ga_parity",
    "checkpoint": "curry_train.bench.checkpoint:bench_checkpoint",
    "pipeline": "curry_train.bench.pipeline:bench_pipeline",
    "recompute": "curry_train.bench.recompute:bench_recompute",
    "sharding": "curry_train.bench.sharding:bench_sharding",
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
