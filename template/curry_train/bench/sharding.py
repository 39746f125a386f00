"""``python -m curry_train bench sharding``: per-rank memory and step time of every sharding mode.

``launch`` N ranks for each N in ``bench.world_sizes`` (null = from the machine, ``machine.world_sizes``: 2 and 4
on >= 4 cores or GPUs), nccl with a GPU per rank where the bench device is CUDA and there are >= 2 GPUs, else gloo
on CPU (``machine.rank_backend``); each trains the configured model (``user_model``: the GPT or ``model._target_``,
with its ``train.loss`` if named) on its share of the configured batch under
every sharding mode (fp32, and bf16 for the FSDP2 modes), interleaved round by round (``bench.repeats`` rounds
of one step after ``bench.burn_in``), and reports the largest per-rank bytes (MiB) of parameters, gradients and
optimizer state (``memory_report``), the unsharded parameter bytes held from forward to backward, and the step
time (the slowest rank's) against DDP. Next to them: the ZeRO paper's formulas for this model's Psi. Target:
FSDP2 per-rank totals within 1% of 1/N of DDP's. A model whose blocks are not found (``primitives.blocks``) is
skipped with one line saying why.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from omegaconf import OmegaConf

from ..distributed import launch
from ..primitives import DistributedOptimizer
from ..primitives.blocks import NoBlocksError, require_blocks
from ..primitives.distributed_optimizer import zero_bytes_per_rank
from ..user_model import build_model, model_name, n_params
from . import machine
from .common import MIB, build_model_and_batches, interleaved_rounds, median_ratio, train_step, user_loss

SHARDING_MODES = [("no_shard", None), ("zero1", None), ("shard_grad_op", None), ("full", None),
                  ("shard_grad_op", "bf16"), ("full", "bf16")]
ZERO_NAME = {"no_shard": "DDP", "zero1": "ZeRO-1", "shard_grad_op": "ZeRO-2", "full": "ZeRO-3"}


def _sharding_rank(rank, ws, cfg, backend="gloo"):
    cfg = OmegaConf.create(cfg)  # launched with the plain, resolved dict
    device = machine.rank_device(backend, rank)
    model, batches = build_model_and_batches(cfg)
    model.to(device)
    x, y = (t.to(device) for t in batches.microbatches(0, rank, ws, 1)[0])
    loss_fn = user_loss(cfg)
    b = cfg.bench
    sides = {}
    for sharding, precision in SHARDING_MODES:
        d = DistributedOptimizer.wrap(copy.deepcopy(model), sharding, mixed_precision=precision, lr=cfg.train.lr)
        sides[(sharding, precision)] = {"d": d}

    def step(key):
        d = sides[key]["d"]
        return train_step(d.model, d.optimizer, x, y, lambda: d.memory_report()["unsharded_param_bytes"], loss_fn=loss_fn)

    def timed(key):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        sides[key]["held"] = step(key)
        machine.synchronize(device)
        return time.perf_counter() - t0

    for key in sides:
        for _ in range(b.burn_in):
            step(key)
    seconds = interleaved_rounds(timed, list(sides), b.repeats)
    return {f"{s}|{p}": {"memory": v["d"].memory_report(), "held": v["held"], "seconds": seconds[(s, p)]}
            for (s, p), v in sides.items()}


def bench_sharding(cfg, world_sizes=None) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    world_sizes = world_sizes if world_sizes is not None else machine.world_sizes(cfg)
    backend = machine.rank_backend(cfg)
    model = build_model(cfg)
    try:
        require_blocks(model, purpose="FSDP2's per-block sharding")
    except NoBlocksError as e:
        print(f"sharding: skipped for {model_name(cfg)}: {e}")
        return {"skipped": str(e), "model": model_name(cfg)}
    psi = n_params(model)
    results = {}
    print(f"sharding on {model_name(cfg)}, Psi = {psi:,} parameters ({4 * psi / MIB:.2f} MiB fp32), AdamW, batch "
          f"{cfg.train.batch_size}x{cfg.train.seq_len} split over N {backend} ranks; bytes: largest rank, after backward + step;"
          f" time: median of {cfg.bench.repeats} interleaved steps, ratio to DDP")
    print(f"  {'mode':27s} {'N':>2s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'total':>7s} {'/(DDP/N)':>8s} "
          f"{'optim/(DDP/N)':>13s} {'held f->b':>9s} {'ZeRO fp32':>9s} {'ZeRO mixed':>10s} {'step':>8s} {'vs DDP':>6s}")
    ok = True
    for ws in world_sizes:
        ranks = launch(_sharding_rank, ws, plain, backend, timeout=600, backend=backend)
        ddp_total = max(r["no_shard|None"]["memory"]["total"] for r in ranks)
        ddp_optim = max(r["no_shard|None"]["memory"]["optimizer_state"] for r in ranks)
        ddp_round = [max(ts) for ts in zip(*(r["no_shard|None"]["seconds"] for r in ranks))]
        rows = []
        for sharding, precision in SHARDING_MODES:
            key = f"{sharding}|{precision}"
            mems = [r[key]["memory"] for r in ranks]
            worst = max(mems, key=lambda m: m["total"])
            times = [max(ts) for ts in zip(*(r[key]["seconds"] for r in ranks))]  # a step ends when the slowest rank does
            row = {
                "mode": f"{sharding}{' bf16' if precision else ''}", "sharding": sharding, "precision": precision or "fp32",
                "world_size": ws, "params": worst["params"], "grads": worst["grads"],
                "optimizer_state": worst["optimizer_state"], "total": worst["total"],
                "ratio_to_ddp_over_n": worst["total"] / (ddp_total / ws),
                "optim_ratio_to_ddp_over_n": max(m["optimizer_state"] for m in mems) / (ddp_optim / ws),
                "held_fwd_bwd": max(r[key]["held"] for r in ranks),
                "zero_fp32": zero_bytes_per_rank(psi, ws, sharding, "fp32")["total"],
                "zero_mixed": zero_bytes_per_rank(psi, ws, sharding, "mixed")["total"],
                "step_ms": 1000 * statistics.median(times),
                "time_ratio": median_ratio(times, ddp_round),
            }
            rows.append(row)
            if sharding in ("shard_grad_op", "full") and row["ratio_to_ddp_over_n"] > 1.01:
                ok = False
            print(f"  {ZERO_NAME[sharding] + ' ' + row['mode']:27s} {ws:2d} {row['params'] / MIB:7.3f} "
                  f"{row['grads'] / MIB:7.3f} {row['optimizer_state'] / MIB:7.3f} {row['total'] / MIB:7.3f} "
                  f"{row['ratio_to_ddp_over_n']:8.3f} {row['optim_ratio_to_ddp_over_n']:13.3f} "
                  f"{row['held_fwd_bwd'] / MIB:9.3f} {row['zero_fp32'] / MIB:9.3f} "
                  f"{row['zero_mixed'] / MIB:10.3f} {row['step_ms']:5.0f} ms {row['time_ratio']:6.2f}")
        results[str(ws)] = rows
    print(f"  target: FSDP2 per-rank totals within 1% of DDP/N: {'PASS' if ok else 'MISS'}")
    print("  ZeRO formulas (Adam): fp32 DDP 16Psi, ZeRO-1 8Psi+8Psi/N, ZeRO-2 4Psi+12Psi/N, ZeRO-3 16Psi/N; mixed "
          "DDP 16Psi, ZeRO-1 4Psi+12Psi/N, ZeRO-2 2Psi+14Psi/N, ZeRO-3 16Psi/N")
    return {"n_params": psi, "rows": results, "target_pass": ok, "backend": backend}
