"""``python -m curry_train bench [NAME ...] [--quick]``: measure primitives side by side, in one run, as a report.

Benchmarks are not tests: they print what they measured on this machine, with the target where a bench has one.
The timed comparisons (``loop``, ``recompute``, ``sharding``, ``mfu``) run every side in one run, burn-in first,
then interleaved rounds (``common.interleaved_rounds``) so drift hits all sides alike, and report medians of
per-round ratios. Each bench is a function ``fn(cfg, **kwargs) -> dict`` registered in ``BENCHES``; its keyword
defaults are its full-run settings, ``QUICK`` holds the reduced ones, ``bench_kwargs`` resolves what a run uses.

Every run writes a new folder ``bench.out_dir/<timestamp>/`` (``report.new_run_dir``, never an earlier one):
``report.md`` (every table, the machine, the config, the command), ``report.json`` (every number) and the PNGs,
rewritten after each bench so that a run stopped half way keeps what it measured.

One module per bench (``loop``, ``ga``, ``recompute``, ``sharding``, ``pipeline``, ``checkpoint``, ``mfu``, ``faults``, ``tp``, ``cp``, ``moe``,
``data``, ``compose``),
helpers they share in ``common``, device and rank counts in ``machine``, plots in ``plots``, the report in ``report``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import sys
import textwrap
import time

# name -> "module:function"; imported lazily so one bench's dependencies never slow another.
BENCHES = {
    "loop": "curry_train.bench.loop:bench_loop",
    "ga": "curry_train.bench.ga:bench_ga_parity",
    "checkpoint": "curry_train.bench.checkpoint:bench_checkpoint",
    "pipeline": "curry_train.bench.pipeline:bench_pipeline",
    "recompute": "curry_train.bench.recompute:bench_recompute",
    "sharding": "curry_train.bench.sharding:bench_sharding",
    "mfu": "curry_train.bench.mfu:bench_mfu",
    "faults": "curry_train.bench.faults:bench_faults",
    "cp": "curry_train.bench.cp:bench_cp",
    "moe": "curry_train.bench.moe:bench_moe",
    "tp": "curry_train.bench.tp:bench_tp",
    "data": "curry_train.bench.data:bench_data",
    "compose": "curry_train.bench.compose:bench_compose",
}
# name -> what it prints (shown by `python -m curry_train bench --help`)
BENCH_HELP = {
    "loop": "curry_train loop vs a hand-written PyTorch loop, tokens/s ratio (target >= 0.98)",
    "ga": "gradient accumulation K=1 vs K=4: gradient error, fixed and padded batches, tokens vs mean/K",
    "checkpoint": "DCP save/load of model + AdamW: bytes per parameter, sync and async save time, Young/Daly; a "
                  "100M-param state vs the disk's own MB/s, per save phase and FileSystemWriter option (target >= 50%)",
    "pipeline": "every pipeline schedule at p ranks from the CPU cores (2, 4): analytic, simulated and measured "
                "bubble, timeline PNGs (target: every schedule within 0.05 of the simulator fed the run's own costs)",
    "recompute": "activation memory and step time: none, full, selective, every 2nd block (target: full <= 25%, <= 1.4x)",
    "sharding": "per-rank bytes and step time: DDP, ZeRO-1, FSDP2 shard_grad_op and full, bf16, N from the machine "
                "(target: FSDP2 within 1% of DDP/N)",
    "mfu": "model FLOPs per step (FlopCounterMode) over a torch.mm peak measured in the run: MFU, tokens/s and "
           "step time of the curry_train loop and of a plain PyTorch loop",
    "faults": "damaged checkpoints (truncated, flipped bytes, garbage or missing metadata, stale pointer) and NaN "
              "steps, done on purpose: what the resume does, the warning, whether the final loss is the clean run's",
    "cp": "ring attention (context parallel) at cp ranks vs full SDPA in one process: bytes saved for backward per "
          "rank, bytes sent per rank vs the formula, forward+backward time",
    "moe": "mixture of experts: tokens per expert and dropped tokens with no balancing, aux loss, bias balancing; "
           "all-to-all bytes at EP=2 vs the formula; step time vs a dense MLP of equal active parameters",
    "tp": "tensor (and sequence) parallel at tp ranks vs one process: parameter and activation bytes per rank, "
          "collectives counted by CommDebugMode vs the formula, step time",
    "data": "memmapped prepared-data loader vs training steps (target >= 50x) and prepare vs tokenizers' own "
            "encode_batch throughput (target >= 0.7)",
    "compose": "composed layouts (HSDP, FSDP2 pipeline stages, tp and cp inside them) at 4 and 8 ranks: per-rank "
               "bytes vs /plan (target: within 1%), loss vs one process, step time vs one process",
}
# `--quick` (what `make bench` runs): config overrides, applied before the user's (which win), and keyword arguments
# per bench. Fewer rounds and steps, small batches, N = 2 only, two pipeline kinds on a 4-block model; checkpoint's
# large state at 5M parameters, 3 rounds, 1 repeat, 4 of 8 FileSystemWriter options (its report says so); faults
# on a 5-step run saving every 2 steps, 5 of its 14 damage cases; compose: one layout (pp2 x dp2, FSDP2) at 4 ranks, 3 steps; data: a 512-id BPE.
QUICK = {
    "overrides": ["bench.burn_in=1", "bench.repeats=2", "bench.steps_per_repeat=1", "bench.world_sizes=[2]",
                  "train.batch_size=8", "train.seq_len=64", "bench.pipeline_batch_size=16"],
    "benches": {
        "pipeline": {"kinds": ("1f1b", "zbv"), "m": 4, "n_layer": 4, "steps": 2},
        "recompute": {"peak": False},
        "mfu": {"peak_size": 1024, "peak_repeats": 3, "repeats": 5},
        "moe": {"steps": 5},
        "cp": {"seq_lens": (256, 512)},
        "tp": {"tp_sizes": (2,)},
        "checkpoint": {"large_params": 5_000_000, "large_rounds": 3, "large_repeats": 1,
                       "dcp_options": ("default", "thread_count=2", "record_crc32=False", "sync_files=False")},
        "data": {"vocab_size": 512, "loader_batches": 10},
        "faults": {"steps": 5, "every": 2, "cases": ("truncated shard", "missing .metadata", "integrity.json deleted",
                                                     "code-running pickle as .metadata", "everything damaged")},
        "compose": {"world_sizes": (4,), "steps": 3,
                    "names": ("pp2 x dp2, FSDP2 full",)},
    },
}


def quick_help() -> str:
    """``QUICK`` as text for ``bench --help``."""
    kwargs = "; ".join(f"{name} " + ", ".join(f"{k}={v}" for k, v in kw.items())
                       for name, kw in QUICK["benches"].items())
    return textwrap.fill(f"--quick sets {' '.join(QUICK['overrides'])}; and {kwargs}", 110, subsequent_indent="  ")


def _function(name: str):
    module, fn = BENCHES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def check_names(names: list[str]) -> None:
    """An unknown bench name is one ``ValueError`` line listing the benches."""
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")


def bench_kwargs(cfg, name: str, quick: bool = False) -> dict:
    """The keyword arguments ``name`` runs with: its function's defaults, ``QUICK``'s with ``quick``, and rank counts
    left at None (``world_sizes``, ``pp_sizes``) taken from the machine (``machine.world_sizes``)."""
    from .machine import world_sizes

    params = {k: p.default for k, p in inspect.signature(_function(name)).parameters.items()
              if p.default is not p.empty and k != "out_dir"}
    if quick:
        params.update(QUICK["benches"].get(name, {}))
    for key in ("world_sizes", "pp_sizes"):
        if key in params and params[key] is None:
            params[key] = tuple(world_sizes(cfg, name))
    return params


class _Tee(io.TextIOBase):
    """Write to the real stdout and keep a copy (the bench's printed tables go into report.md verbatim)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def run_benches(cfg, names: list[str] | None = None, quick: bool = False, command: str | None = None) -> dict:
    """Run ``names`` (default: all) and write the report folder after each; returns ``{name: result}``."""
    from . import report

    names = names or list(BENCHES)
    check_names(names)
    run_dir = report.new_run_dir(cfg.bench.out_dir)
    meta = {**report.metadata(cfg, names, quick, command), "seconds": {}}
    results, printed, figures = {}, {}, {}
    print(f"bench run folder: {run_dir}", flush=True)
    for name in names:
        fn = _function(name)
        kwargs = bench_kwargs(cfg, name, quick)
        if "out_dir" in inspect.signature(fn).parameters:
            kwargs["out_dir"] = run_dir
        print(f"\n== bench {name} ==", flush=True)
        tee = _Tee(sys.stdout)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(tee):
            results[name] = fn(cfg, **kwargs)
        meta["seconds"][name] = time.perf_counter() - t0
        printed[name] = tee.copy.getvalue()
        figures[name] = report.plot(name, results[name], run_dir)
        report.write_report(run_dir, results, printed, meta, figures)
    took = ", ".join(f"{n} {t:.1f} s" for n, t in meta["seconds"].items())
    print(f"\nreport: {run_dir / 'report.md'} (numbers in report.json, plots beside them); {took}")
    return results
