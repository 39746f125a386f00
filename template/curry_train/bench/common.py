"""Helpers the benches share: the configured model and batches, one training step, interleaved timing rounds and
their per-round ratios, a flat gradient, a quiet stderr for the profiler.

The model is ``user_model.build_model(cfg)`` (the reference GPT, or the user's ``model._target_``) and the loss
``user_model.build_loss(cfg)`` (``model_io.forward_loss_sum``, or the user's ``train.loss._target_``), both
``(model, (x, y)) -> (loss_sum, n_valid)``: every bench runs on whatever model the config names.

``run_accumulated_step`` (one optimizer step with gradient accumulation) is used by no bench: it is the short
form of the loop that ``skills/primitive-gradient-accumulation`` points to, tested in ``tests/test_benchmark.py``.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from ..data import build_batches, seed_everything
from ..loop import accumulate_gradients, build_optimizer, build_scheduler
from ..primitives import GradientAccumulation
from ..primitives.model_io import forward_loss_sum
from ..user_model import build_loss, build_model

MIB = 2**20


def build_model_and_batches(cfg):
    """The configured model (``user_model.build_model``), seeded as ``train`` seeds it, and the training batches."""
    seed_everything(cfg.seed)
    return build_model(cfg), build_batches(cfg)


def user_loss(cfg) -> Callable | None:
    """The user's ``train.loss`` as ``(model, (x, y)) -> (loss_sum, n_valid)``, or None (the token loss on logits)."""
    return build_loss(cfg) if cfg.train.loss is not None else None


def train_step(model, optimizer, x, y, after_forward: Callable | None = None, loss_fn: Callable | None = None):
    """One optimizer step on one batch, normalised as ``train`` normalises (sum of token losses over the valid-token
    count, all-reduced over the ranks when a process group is up). ``loss_fn(model, (x, y)) -> (loss_sum, n_valid)``
    (``user_model.build_loss``). ``after_forward()``, if given, runs between forward and backward (to read what the
    forward left in memory); returns its result."""
    ga = GradientAccumulation(1)
    optimizer.zero_grad(set_to_none=True)
    loss_sum, n = (loss_fn or forward_loss_sum)(model, (x, y))
    ga.plan([int(n)])  # K = 1: the count the loss saw, all-reduced when a process group is up
    result = after_forward() if after_forward is not None else None
    ga.backward_loss(loss_sum, n, 0).backward()
    optimizer.step()
    return result


def training_sides(model, cfg, names: Sequence[str] = ("curry_train", "plain")) -> dict[str, dict]:
    """One deep copy of ``model`` per side of a side-by-side timing, each with its own AdamW and warmup-cosine
    schedule from ``cfg.train``: ``{name: {"model", "opt", "sched", "step": 0}}``."""
    t = cfg.train
    sides = {}
    for name in names:
        m = copy.deepcopy(model)
        opt = build_optimizer(m, t.lr, t.weight_decay, (t.beta1, t.beta2))
        sides[name] = {"model": m, "opt": opt, "sched": build_scheduler(opt, t.warmup_steps, t.steps, t.min_lr_ratio),
                       "step": 0}
    return sides


def interleaved_rounds(run: Callable[[str], float], names: Sequence[str], repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds of ``run(name)`` (which returns the seconds it measured) for every side, in ``names``
    order on even rounds and reversed on odd ones, so drift over the run hits every side alike; seconds per round."""
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name].append(run(name))
    return seconds


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``: robust to a load spike that hits one round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (``statistics.quantiles``, inclusive method); one value gives itself twice."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def run_accumulated_step(model, optimizer, microbatches, ga: GradientAccumulation, grad_clip: float = 0.0):
    """One optimizer step over ``microbatches`` with gradient accumulation; returns the mean token loss."""
    loss_sum, n_tokens = accumulate_gradients(model, microbatches, ga)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss_sum.item() / n_tokens


def grad_vector(model) -> torch.Tensor:
    """Every parameter's gradient, flattened into one vector (parameters without a gradient skipped)."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C++ writes bypass ``sys.stderr``); restored even on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
