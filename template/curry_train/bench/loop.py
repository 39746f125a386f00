"""``python -m curry_train bench loop``: the curry_train loop against a hand-written PyTorch loop.

Both train copies of the configured model (``user_model``: the GPT, or ``model._target_``) on the configured
batches with the same AdamW, warm-up + cosine schedule and gradient clipping: one through ``run_training_steps``
(gradient-accumulation planning at K=1, token-normalised loss, metrics), the other through a plain loop (mean
cross-entropy on the logits, ``backward``, ``step``; with a ``train.loss`` its ``loss_sum / n_valid``). After
``bench.burn_in`` steps per side, ``bench.repeats`` interleaved rounds of ``bench.steps_per_repeat`` steps; the
ratio is the median over rounds of plain time / curry_train time (tokens/s of curry_train over plain's).
Target: ratio >= 0.98, the loop costs at most 2% of a step.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..data import Batches
from ..loop import run_training_steps
from ..model import IGNORE_INDEX
from ..primitives import GradientAccumulation
from ..primitives.model_io import logits_of
from ..user_model import model_name
from .common import build_model_and_batches, interleaved_rounds, median_ratio, training_sides, user_loss


def _plain_pytorch_steps(model, optimizer, scheduler, batches: Batches, start: int, n: int, grad_clip: float,
                         loss_fn=None):
    """The baseline a user would write by hand: no primitives, mean cross-entropy (or ``loss_fn``'s sum over its
    count), one batch per step."""
    for step in range(start, start + n):
        x, y = batches.global_batch(step)
        if loss_fn is None:
            logits = logits_of(model(x))
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX)
        else:
            loss_sum, n_valid = loss_fn(model, (x, y))
            loss = loss_sum / n_valid
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()


def bench_loop(cfg) -> dict:
    b = cfg.bench
    model, batches = build_model_and_batches(cfg)
    t = cfg.train
    sides = training_sides(model, cfg)
    ga = GradientAccumulation(1)
    loss_fn = user_loss(cfg)

    def run(name, n):
        s = sides[name]
        t0 = time.perf_counter()
        if name == "curry_train":
            run_training_steps(s["model"], s["opt"], s["sched"], batches, ga, s["step"] + n, start_step=s["step"],
                               grad_clip=t.grad_clip, log_every=0, progress=False, loss_fn=loss_fn)
        else:
            _plain_pytorch_steps(s["model"], s["opt"], s["sched"], batches, s["step"], n, t.grad_clip, loss_fn)
        s["step"] += n
        return time.perf_counter() - t0

    for name in sides:
        run(name, b.burn_in)
    seconds = interleaved_rounds(lambda name: run(name, b.steps_per_repeat), tuple(sides), b.repeats)
    tokens = b.repeats * b.steps_per_repeat * t.batch_size * t.seq_len
    tps = {name: tokens / sum(seconds[name]) for name in sides}
    ratios = [p / c for p, c in zip(seconds["plain"], seconds["curry_train"])]
    ratio = median_ratio(seconds["plain"], seconds["curry_train"])
    print(f"loop vs plain PyTorch ({model_name(cfg)}, batch {t.batch_size}x{t.seq_len}, "
          f"{b.repeats}x{b.steps_per_repeat} interleaved steps after {b.burn_in} burn-in)")
    print(f"  curry_train loop : {tps['curry_train']:10.0f} tokens/s")
    print(f"  plain PyTorch    : {tps['plain']:10.0f} tokens/s")
    print(f"  ratio            : {ratio:.3f}   median of {b.repeats} rounds, min {min(ratios):.3f} max {max(ratios):.3f}"
          f"   (target >= 0.98: {'PASS' if ratio >= 0.98 else 'MISS'})")
    return {"tokens_per_s": tps, "ratio": ratio, "round_ratios": ratios, "round_seconds": seconds, "target": 0.98}
