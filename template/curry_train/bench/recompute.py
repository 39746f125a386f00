"""``python -m curry_train bench recompute``: activation memory saved against step time spent.

The configured model and batch (``user_model``: the GPT or ``model._target_``, ``train.batch_size`` x ``train.seq_len``;
its ``train.loss`` if named) under no recompute, full,
selective, and full on every 2nd block. Per mode: bytes kept for backward after the forward and peak bytes over
forward + backward (``activation_memory``), and the time of one training step (forward, backward, AdamW) as the
median of per-round ratios to no recompute over ``bench.repeats`` interleaved rounds of ``bench.steps_per_repeat``
steps after ``bench.burn_in``. Target: full keeps <= 25% of the activations at <= 1.4x the step time.
Next to each measured ``activation_bytes``: ``plan.py``'s prediction for the reference GPT (``predicted``, the same
``activation_bytes`` formula ``python -m curry_train plan`` uses, at 4-byte values; None for a ``model._target_``).
Runs on ``device`` (``machine.bench_device``: CUDA when available). ``peak=False`` (``--quick``) skips the peak
(on CPU its memory timeline is the slow part): ``peak_bytes`` and ``peak_ratio`` are then None.
A model whose blocks are not found (``primitives.blocks``) is skipped with one line saying why.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

from ..plan import Shape, activation_bytes, activation_bytes_per_layer
from ..primitives import activation_memory, apply_recompute
from ..primitives.blocks import NoBlocksError, find_blocks
from ..user_model import model_name, n_params, user_target
from .machine import bench_device, synchronize
from .common import (MIB, build_model_and_batches, interleaved_rounds, median_ratio, quiet_stderr, train_step,
                     user_loss)

RECOMPUTE_MODES = {"none": None, "full": ("full", 1), "selective": ("selective", 1), "full every 2nd": ("full", 2)}


class _MeanLoss(nn.Module):
    """``model`` and a user's ``loss_fn(model, (x, y)) -> (loss_sum, n_valid)`` as one module returning the mean
    loss, so that ``activation_memory`` (which calls a module on a batch) measures that loss's forward."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y):
        loss_sum, n_valid = self.loss_fn(self.model, (x, y))
        return loss_sum / n_valid


def predicted_activation_bytes(cfg, mode: str) -> float | None:
    """``plan.py``'s activation bytes for ``mode`` (a ``RECOMPUTE_MODES`` key) on the configured GPT and batch at fp32:
    ``every_n`` = 2 checkpoints ``n_layer // 2`` blocks fully and keeps the rest; None when the model is not the GPT."""
    if user_target(cfg.model) is not None:
        return None
    shape = Shape.from_model_config(cfg.model, seq=cfg.train.seq_len)
    b, L, spec = cfg.train.batch_size, shape.n_layer, RECOMPUTE_MODES[mode]
    kind, every_n = spec or ("none", 1)
    done = L // every_n  # apply_recompute checkpoints the every_n-th, 2*every_n-th, ... block
    moe_share = shape.moe_layers / L
    kept = activation_bytes(shape, b, L - done, recompute="none", bytes_per_value=4, moe_layers=moe_share * (L - done))
    if kind == "full":
        return kept + done * activation_bytes_per_layer(shape, b, recompute="full", bytes_per_value=4)
    return activation_bytes(shape, b, L, recompute=kind, bytes_per_value=4, moe_layers=shape.moe_layers)


def bench_recompute(cfg, peak: bool = True) -> dict:
    device = bench_device(cfg)
    base, batches = build_model_and_batches(cfg)
    base.to(device)
    x, y = (t.to(device) for t in batches.global_batch(0))
    b, t = cfg.bench, cfg.train
    loss_fn = user_loss(cfg)
    sides = {}
    for name, spec in RECOMPUTE_MODES.items():
        m = copy.deepcopy(base)
        if spec:
            try:
                apply_recompute(m, spec[0], every_n=spec[1])
            except NoBlocksError as e:
                print(f"recompute: skipped for {model_name(cfg)}: {e}")
                return {"skipped": str(e), "model": model_name(cfg)}
        sides[name] = {"model": m, "opt": torch.optim.AdamW(m.parameters(), lr=t.lr)}
        measured, batch = (m, (x, y)) if loss_fn is None else (_MeanLoss(m, loss_fn), {"x": x, "y": y})
        with quiet_stderr():  # the CPU profiler prints two USDT lines per profile on stderr
            sides[name].update(activation_memory(measured, batch, peak=peak))

    def run(name, n):
        s = sides[name]
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(s["model"], s["opt"], x, y, loss_fn=loss_fn)
        synchronize(device)
        return time.perf_counter() - t0

    names = list(sides)
    for name in names:
        run(name, b.burn_in)
    seconds = interleaved_rounds(lambda name: run(name, b.steps_per_repeat), names, b.repeats)
    ref = sides["none"]
    rows = []
    for name in names:
        s = sides[name]
        rows.append({
            "mode": name,
            "activation_bytes": s["activation_bytes"],
            "activation_ratio": s["activation_bytes"] / ref["activation_bytes"],
            "predicted_activation_bytes": predicted_activation_bytes(cfg, name),
            "peak_bytes": s["peak_bytes"],
            "peak_ratio": s["peak_bytes"] / ref["peak_bytes"] if peak else None,
            "step_ms": 1000 * statistics.median(seconds[name]) / b.steps_per_repeat,  # robust to load spikes
            "time_ratio": median_ratio(seconds[name], seconds["none"]),
        })
    full = next(r for r in rows if r["mode"] == "full")
    ok = full["activation_ratio"] <= 0.25 and full["time_ratio"] <= 1.4
    print(f"recompute on {model_name(cfg)} ({len(find_blocks(base))} blocks, {n_params(base):,} parameters), batch "
          f"{t.batch_size}x{t.seq_len}, fp32, device {x.device}; step (fwd+bwd+AdamW): median over {b.repeats} "
          f"interleaved rounds of {b.steps_per_repeat} steps, ratio = median of per-round ratios to none")
    print(f"  {'mode':15s} {'activations':>12s} {'predicted':>12s} {'ratio':>6s} {'peak fwd+bwd':>13s} {'ratio':>6s} "
          f"{'step':>9s} {'ratio':>6s}")
    for r in rows:
        pred = r["predicted_activation_bytes"]
        print(f"  {r['mode']:15s} {r['activation_bytes'] / MIB:8.1f} MiB "
              + (f"{pred / MIB:8.1f} MiB " if pred is not None else f"{'-':>12s} ") + f"{r['activation_ratio']:6.3f} "
              + (f"{r['peak_bytes'] / MIB:9.1f} MiB {r['peak_ratio']:6.3f} " if peak else f"{'-':>13s} {'-':>6s} ")
              + f"{r['step_ms']:6.1f} ms {r['time_ratio']:6.2f}")
    print(f"  target: full keeps <= 25% of activations at <= 1.4x step time: {'PASS' if ok else 'MISS'}")
    return {"rows": rows, "target_pass": ok, "batch": [t.batch_size, t.seq_len], "model": model_name(cfg)}
