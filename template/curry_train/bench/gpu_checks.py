"""The checks ``gpu-check`` runs (``gpu_check.CHECKS``), each ``check_*(ctx) -> {"rows", "notes", "skipped"}`` in a
process of its own. ``ctx``: ``device`` (cuda | cpu), ``ranks`` (N: the GPU count, or 2 CPU stand-in ranks),
``backend`` (nccl | gloo), ``standin`` (True: CPU stands in for the GPU, tiny settings), ``timeout_s`` (this
check's share of the budget; spawned ranks get 90% of it). ``skipped``: ``{part: why}`` for what this device
cannot run; ``CheckSkipped`` skips the whole check.

Each check calls the bench or training code it exercises with small settings; the numbers are what those print.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import statistics
import tempfile

import torch
import torch.distributed as dist

from ..distributed import launch, resolve_device
from .gpu_check import CheckSkipped

MIB = 2**20
BASE = ["train.warmup_steps=1", "train.progress=false", "train.log_every=0", "model.dropout=0.0"]
MODEL = {True: ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "train.seq_len=32"],  # CPU stand-in
         False: ["model=small", "train.seq_len=256"]}  # GPU: the ~10.8M-parameter GPT at its block size
ROUNDS = {True: ["bench.burn_in=1", "bench.repeats=2", "bench.steps_per_repeat=1"],
          False: ["bench.burn_in=3", "bench.repeats=10", "bench.steps_per_repeat=5"]}
TRAIN = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "train.seq_len=64"]  # nccl-train, both devices
STEPS, EVERY, SIGNAL_AT = 6, 2, 2  # nccl-train: steps, checkpoint interval, rank 0's SIGTERM after this step


def _overrides(ctx, *extra, rounds=False) -> list[str]:
    return [*BASE, *MODEL[ctx["standin"]], *(ROUNDS[ctx["standin"]] if rounds else ()), f"device={ctx['device']}",
            *extra]


def _launch(fn, ctx, *args, ranks=None):
    return launch(fn, ranks or ctx["ranks"], *args, timeout=0.9 * ctx["timeout_s"], backend=ctx["backend"])


# -- nccl ranks: the training loop, its SIGTERM agreement and DCP checkpoints ----------------------------------------

def _train_rank(rank, ws, overrides, folder):
    from ..config import load_config
    from ..stopping import SIGNAL_ENV, Preempted
    from ..train import train

    def run(name):
        return [(h["step"], h["loss"], h["tokens"] / h["tokens_per_s"])
                for h in train(load_config([*overrides, f"checkpoint.dir={folder}/{name}", f"checkpoint.every={EVERY}"]))]

    if rank == 0:  # only rank 0 is signalled: the others stop at the same step through the agreement all-reduce
        os.environ[SIGNAL_ENV] = f"{SIGNAL_AT}:TERM"
    try:
        run("ckpt")
        stopped = None
    except Preempted as e:
        stopped = str(e)
    os.environ.pop(SIGNAL_ENV, None)
    resumed, straight = run("ckpt"), run("straight")
    saved = sorted(p for p in os.listdir(f"{folder}/straight") if p.startswith("step-")) if rank == 0 else []
    return {"stopped": stopped, "resumed": resumed, "straight": straight, "backend": dist.get_backend(),
            "device": str(resolve_device("auto")), "saved": saved}


def check_train(ctx) -> dict:
    """``train`` (a 2-block GPT, STEPS steps, a DCP checkpoint every EVERY) on N ranks; rank 0 alone gets SIGTERM after
    step SIGNAL_AT; a second run resumes from the committed checkpoint; its losses against an uninterrupted run's."""
    n = ctx["ranks"]
    overrides = [*BASE, *TRAIN, f"device={ctx['device']}", f"train.batch_size={4 * n}", f"train.steps={STEPS}"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as folder:
        ranks = _launch(_train_rank, ctx, overrides, folder)
    r0 = ranks[0]
    first = {r["resumed"][0][0] for r in ranks}
    straight = {s: loss for s, loss, _ in r0["straight"]}
    rel = max(abs(loss - straight[s]) / abs(straight[s]) for r in ranks for s, loss, _ in r["resumed"])
    row = {"ranks": n, "backend": r0["backend"], "device": r0["device"],
           "ranks stopped by SIGTERM on rank 0": sum(r["stopped"] is not None for r in ranks),
           "resumed at step": "/".join(map(str, sorted(first))), "checkpoints kept (straight run)": " ".join(r0["saved"]),
           "loss first": r0["straight"][0][1], "loss last": r0["straight"][-1][1],
           "resumed vs straight max rel err": rel,
           "step ms (median after the first)": 1e3 * statistics.median(t for _, _, t in r0["straight"][1:])}
    ok = row["ranks stopped by SIGTERM on rank 0"] == n and first == {SIGNAL_AT + 1}
    return {"rows": [row], "notes": [f"{STEPS} steps (0-based), a checkpoint every {EVERY}: every rank stopped after "
                                     f"step {SIGNAL_AT} and resumed at step {SIGNAL_AT + 1}: {'yes' if ok else 'NO'}",
                                     f"rank 0's stop line: {r0['stopped']}"]}


# -- bf16 FSDP2 step against DDP ----------------------------------------------------------------------------------

SHARDING_SIDES = {"DDP fp32": ("no_shard", None, {}), "DDP bf16": ("no_shard", "bf16", {}),
                  "FSDP2 full fp32": ("full", None, {}), "FSDP2 full bf16": ("full", "bf16", {})}


def check_sharding(ctx) -> dict:
    """``bench.sharding``'s ranks on ``SHARDING_SIDES`` (interleaved rounds, no profiling) at N ranks: the fullest
    rank's bytes against DDP's / N and each side's step (slowest rank per round) against DDP fp32 and bf16."""
    from omegaconf import OmegaConf

    from ..config import load_config
    from .common import median_ratio
    from .sharding import _sharding_rank

    n = ctx["ranks"]
    cfg = load_config(_overrides(ctx, f"train.batch_size={8 * n}", rounds=True))
    ranks = _launch(_sharding_rank, ctx, OmegaConf.to_container(cfg, resolve=True), ctx["backend"], SHARDING_SIDES, 0)
    rounds = {k: [max(ts) for ts in zip(*(r[k]["seconds"] for r in ranks))] for k in SHARDING_SIDES}
    ddp = max(r["DDP fp32"]["memory"]["total"] for r in ranks)
    rows = []
    for key in SHARDING_SIDES:
        worst = max((r[key]["memory"] for r in ranks), key=lambda m: m["total"])
        rows.append({"side": key, "N": n, "params MiB": worst["params"] / MIB, "grads MiB": worst["grads"] / MIB,
                     "optimizer MiB": worst["optimizer_state"] / MIB, "total MiB": worst["total"] / MIB,
                     "total / (DDP/N)": worst["total"] / (ddp / n),
                     "step ms": 1e3 * statistics.median(rounds[key]),
                     "vs DDP fp32": median_ratio(rounds[key], rounds["DDP fp32"]),
                     "vs DDP bf16": median_ratio(rounds[key], rounds["DDP bf16"])})
    return {"rows": rows, "notes": [f"{cfg.model.name} GPT, batch {cfg.train.batch_size}x{cfg.train.seq_len} over "
                                    f"{n} {ctx['backend']} rank(s), AdamW; step: median of {cfg.bench.repeats} "
                                    "interleaved rounds, ratio = median of per-round ratios; bytes: memory_report "
                                    "(FSDP2 bf16 keeps fp32 shards)"]}


# -- MFU against the bf16 matmul peak ------------------------------------------------------------------------------

def check_mfu(ctx) -> dict:
    """``bench_mfu`` with the steps under bf16 autocast: model FLOPs / step time / the bf16 ``torch.mm`` peak."""
    from ..config import load_config
    from .mfu import bench_mfu

    cfg = load_config(_overrides(ctx, f"train.batch_size={4 if ctx['standin'] else 16}", rounds=True))
    with contextlib.redirect_stdout(io.StringIO()):
        r = bench_mfu(cfg, peak_size=256 if ctx["standin"] else None, peak_repeats=2 if ctx["standin"] else 5,
                      mixed_precision="bf16")
    peaks = r["peak_flops_per_s"]
    rows = [{"loop": row["loop"], "step ms": row["step_ms"], "tokens/s": row["tokens_per_s"],
             "TFLOP/s": row["achieved_flops_per_s"] / 1e12, "MFU % (bf16 peak)": 100 * row["mfu"]} for row in r["rows"]]
    return {"rows": rows, "notes": [
        f"{r['model']}, {r['tokens_per_step']} tokens per step, forward under torch.autocast(bf16) on {r['device']}; "
        f"model FLOPs per step {r['flops_per_step']:.4g} (FlopCounterMode, causal attention halved)",
        f"peak: torch.mm {r['peak_size']}x{r['peak_size']}, bf16 {peaks['bf16'] / 1e12:.4g} TFLOP/s (MFU's "
        f"denominator), fp32 {peaks['fp32'] / 1e12:.4g} TFLOP/s"]}


# -- PyTorch's CP path against ring attention and one process -----------------------------------------------------

TORCH_CP_CPU = ("PyTorch's CP path needs CUDA: torch 2.13 has no DTensor sharding strategy for the CPU flash-attention "
                "kernel (ContextParallel(implementation='torch') refuses a CPU module)")


def _cp_loss(model, impl, x, y):
    """Mean token loss and summed gradients of ``model`` with attention over the world group by ``impl``: the
    wrapper at N > 1 (``apply_context_parallel``), at N = 1 (where the wrapper runs plain SDPA) its SDPA mode."""
    from ..context_batches import cp_microbatch
    from ..primitives.context_parallel import _RingSDPA, _torch_cp_mesh, apply_context_parallel
    from ..primitives.model_io import forward_loss_sum

    group = dist.group.WORLD
    scope = contextlib.nullcontext()
    if dist.get_world_size() > 1:
        apply_context_parallel(model, group, causal=True, implementation=impl)
    else:
        scope = _RingSDPA(group, True, True, _torch_cp_mesh(model, group, True, True) if impl == "torch" else None)
    with scope:
        loss_sum, count = forward_loss_sum(model, cp_microbatch(model, group)((x, y)))
    total = torch.stack([loss_sum.detach(), count.to(loss_sum.dtype)])
    dist.all_reduce(total)
    (loss_sum / total[1]).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return (total[0] / total[1]).item(), grads


def _cp_rank(rank, ws, overrides, impls):
    from ..config import load_config
    from ..primitives.model_io import forward_loss_sum
    from .common import build_model_and_batches

    cfg = load_config(overrides)
    device = resolve_device(cfg.device)
    model, batches = build_model_and_batches(cfg)
    model.to(device)
    x, y = (t.to(device) for t in batches.global_batch(0))
    copies = {impl: copy.deepcopy(model) for impl in impls}
    loss_sum, count = forward_loss_sum(model, (x, y))
    (loss_sum / count).backward()
    ref = {k: p.grad for k, p in model.named_parameters()}
    out = {"one process": {"loss": (loss_sum / count).item(), "grad": 0.0}}
    for impl in impls:
        loss, grads = _cp_loss(copies[impl], impl, x, y)
        out[impl] = {"loss": loss, "grad": max((grads[k] - ref[k]).abs().max().item() for k in ref)}
    return out


def check_cp(ctx) -> dict:
    """Loss and gradients of the GPT with attention over N ranks: PyTorch's CP path and ring attention against one
    process (fp32; the torch path on CUDA only)."""
    n = ctx["ranks"]
    skipped = {"torch (PyTorch CP)": TORCH_CP_CPU} if ctx["device"] != "cuda" else {}
    impls = ("ring",) if skipped else ("ring", "torch")
    overrides = _overrides(ctx, "train.batch_size=2")
    ranks = _launch(_cp_rank, ctx, overrides, impls)
    names = {"one process": "one process (SDPA)", "ring": "ring (curry_train)", "torch": "torch (PyTorch CP)"}
    ref = ranks[0]["one process"]["loss"]
    rows = [{"attention": names[k], "loss": ranks[0][k]["loss"],
             "loss rel err": max(abs(r[k]["loss"] - ref) / abs(ref) for r in ranks),
             "grad max abs diff": max(r[k]["grad"] for r in ranks)} for k in ("one process", *impls)]
    return {"rows": rows, "skipped": skipped,
            "notes": [f"causal attention over {n} {ctx['backend']} rank(s), load-balanced shards, fp32, one batch; "
                      "grads all-reduced over the ranks vs one process"]}


# -- CUDA memory: recompute modes, and one composed layout --------------------------------------------------------

def check_recompute(ctx) -> dict:
    """``bench_recompute`` (none, full, selective, every 2nd block): bytes kept for backward and the peak over forward
    + backward (CUDA: ``memory_allocated`` / ``max_memory_allocated`` minus before), step time against none."""
    from ..config import load_config
    from .recompute import bench_recompute

    cfg = load_config(_overrides(ctx, f"train.batch_size={4 if ctx['standin'] else 16}", rounds=True))
    with contextlib.redirect_stdout(io.StringIO()):
        r = bench_recompute(cfg, peak=True)
    if "skipped" in r:
        raise CheckSkipped(r["skipped"])
    rows = [{"mode": row["mode"], "activations MiB": row["activation_bytes"] / MIB,
             "predicted MiB": (row["predicted_activation_bytes"] or float("nan")) / MIB,
             "peak fwd+bwd MiB": row["peak_bytes"] / MIB, "peak ratio": row["peak_ratio"],
             "step ms": row["step_ms"], "step ratio": row["time_ratio"]} for row in r["rows"]]
    how = "torch.cuda max_memory_allocated" if ctx["device"] == "cuda" else "the CPU profiler's memory timeline"
    return {"rows": rows, "notes": [f"{r['model']}, batch {r['batch'][0]}x{r['batch'][1]}, fp32; peak: {how}; target "
                                    f"full <= 25% of activations at <= 1.4x step: {'PASS' if r['target_pass'] else 'MISS'}"]}


def _compose_rank(rank, ws, runs, base):
    from .compose import run_layouts

    cuda = torch.cuda.is_available() and "device=cuda" in base
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = run_layouts(rank, ws, runs, base)
    return out | {"_peak": torch.cuda.max_memory_allocated() if cuda else None}


def check_compose(ctx) -> dict:
    """One composed layout on the largest power of two <= N (at most 8) ranks: FSDP2 full (no_shard on one rank)
    + bf16 + selective recompute + gradient accumulation 2, through ``train`` (``compose.run_layouts``): the fullest
    rank's model-state bytes against ``/plan``'s and, on CUDA, each rank's ``max_memory_allocated`` over the run."""
    from .compose import predicted_bytes

    ws = 1
    while ws * 2 <= min(ctx["ranks"], 8):
        ws *= 2
    sharding = "full" if ws > 1 else "no_shard"  # config.validate refuses FSDP2 in one process
    name = f"dp{ws} {'FSDP2 full' if ws > 1 else 'no_shard'} + bf16 + selective recompute + ga 2"
    layout = [f"parallel.sharding={sharding}", "parallel.mixed_precision=bf16", "train.recompute=selective",
              "train.gradient_accumulation_steps=2"]
    base = _overrides(ctx, f"train.batch_size={4 * ws}", "train.steps=3")
    ranks = _launch(_compose_rank, ctx, {name: layout}, base, ranks=ws)
    per = [r[name] for r in ranks]
    held = max((r["bytes"] for r in per), key=lambda b: sum(b.values()))
    plan = predicted_bytes(layout, ws, base)
    losses = [h["loss"] for h in per[0]["history"]]
    peak = max(r["_peak"] for r in ranks) if ranks[0]["_peak"] is not None else None
    row = {"layout": name, "ranks": ws, "model state MiB (fullest rank)": sum(held.values()) / MIB,
           "plan MiB": plan["total"] / MIB, "state / plan": sum(held.values()) / plan["total"],
           "CUDA peak MiB (max_memory_allocated, largest rank)": None if peak is None else peak / MIB,
           "loss first": losses[0], "loss last": losses[-1]}
    skipped = {} if peak is not None else {"CUDA peak": "no CUDA device in the ranks (CPU stand-in)"}
    return {"rows": [row], "skipped": skipped,
            "notes": [f"{len(losses)} steps of train; a block weight's mesh dims and placements: "
                      f"{per[0]['layouts'][0][1:] if ws > 1 else 'plain tensors (one rank)'}"]}
