"""LR range test (Smith 2015, "Cyclical Learning Rates"; fastai's ``lr_find``): one short run with the learning rate
growing exponentially, to pick the peak LR before spending compute on a sweep.

``lr_range_test(model, batches)`` takes ``steps`` AdamW steps (``loop.build_optimizer``: decay on matrices only;
each step is ``loop.accumulate_gradients``, clipped to ``grad_clip`` as the loop clips), step ``i`` at
``lr_i = lr_min * (lr_max / lr_min) ** (i / (steps - 1))``, one batch per step. It records the mean token loss
``L_i`` of each step's batch and a smoothed curve, the bias-corrected exponential moving average
``S_i = A_i / (1 - (1 - a) ** (i + 1))``, ``A_i = (1 - a) A_{i-1} + a L_i`` with ``a = smoothing``. It stops at
divergence: ``S_i > diverge_factor * min(S_0 .. S_i)`` or a non-finite loss.

Two suggestions, both returned:

* ``lr_steepest``: where the smoothed curve falls fastest, the minimum of ``dS / d ln(lr)`` (central differences)
  over the points before the smoothed minimum: the middle of the falling region. The EMA lags the raw loss by
  about ``(1 - a) / a`` steps, and the loss at step ``i`` is the result of every update before it, so this reads
  the LR at which training, so far, has made the fastest progress (fastai's ``steep`` on the same curve).
* ``lr_diverge_tenth``: one tenth of the LR where the run diverged (None when it did not diverge: raise
  ``lr_max``).

``suggested`` is the smaller of the two (``rule`` says which): the steepest point of a noisy curve can sit close
to the edge, and a tenth of the divergence LR bounds it. The stop rule uses the EMA as it comes, so divergence is
seen a few steps late (at a higher LR): one tenth of it is on the safe side. The plot shows the raw losses too.

The model is used in place and restored exactly afterwards (weights, buffers, gradients, train/eval flags and the
caller's RNG state, ``common.restored``); the AdamW it steps is its own and is dropped; no optimizer of yours is
touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loop import accumulate_gradients, build_optimizer
from ..primitives import GradientAccumulation
from ..primitives._checks import non_negative_float, positive_float, positive_int
from .common import (check_loss_fn, check_model, configured_model, fmt, markdown_table, model_device, open_fraction,
                     restored, to_device)


@dataclass
class LRRangeResult:
    """The sweep: ``lrs[i]`` and ``losses[i]`` / ``smoothed[i]`` for each step taken, and the suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    diverged_at: int | None
    lr_steepest: float | None
    lr_diverge_tenth: float | None
    suggested: float
    rule: str
    lr_min_loss: float = field(default=float("nan"))

    @property
    def lr_diverge(self) -> float | None:
        return None if self.diverged_at is None else self.lrs[self.diverged_at]

    def smoothed_at(self, lr: float) -> float:
        """The smoothed loss at the sweep point nearest ``lr`` (in log space)."""
        i = min(range(len(self.lrs)), key=lambda j: abs(math.log(self.lrs[j] / lr)))
        return self.smoothed[i]

    def markdown(self) -> str:
        rows = [("steepest descent of the smoothed loss", fmt(self.lr_steepest, 3)),
                ("divergence", fmt(self.lr_diverge, 3) if self.diverged_at is not None else "not reached"),
                ("divergence / 10", fmt(self.lr_diverge_tenth, 3)),
                ("minimum of the smoothed loss", fmt(self.lr_min_loss, 3)),
                (f"**suggested** ({self.rule})", f"**{fmt(self.suggested, 3)}**")]
        return markdown_table(["LR", "value"], rows) + \
            f"\n\n{len(self.lrs)} steps from {fmt(self.lrs[0], 3)}; smoothed loss {fmt(self.smoothed[0])} -> " \
            f"min {fmt(min(self.smoothed))}"

    def plot(self, path) -> Path:
        """PNG: raw and smoothed loss against the LR (log axis), the two suggestions and the divergence point."""
        from ..bench.plots import COLORS, plt, save

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(self.lrs, self.losses, color="lightgrey", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color=COLORS["F"], linewidth=1.6, label="smoothed")
        marks = [(self.lr_steepest, COLORS["W"], "steepest"), (self.lr_diverge_tenth, COLORS["I"], "divergence / 10"),
                 (self.lr_diverge, COLORS["B"], "divergence")]
        for lr, color, label in marks:
            if lr is not None:
                ax.axvline(lr, color=color, linestyle="--", linewidth=1, label=f"{label} {lr:.2g}")
        ax.set_xscale("log")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        low, high = min(finite), self.smoothed[0]
        ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.5 * (high - low + 1e-9))
        ax.set_xlabel("learning rate")
        ax.set_ylabel("mean token loss")
        ax.set_title(f"LR range test: suggested {self.suggested:.2g} ({self.rule})", fontsize=9, loc="left")
        ax.legend(fontsize=7, frameon=False)
        return save(fig, path)


def _batch_source(batches):
    """``i -> batch`` for a ``data.Batches`` (step ``i``'s global batch), a list of batches (cycled), one
    ``(x, y)`` pair or dict (repeated), or a function ``i -> batch``."""
    if hasattr(batches, "global_batch"):
        return batches.global_batch
    if callable(batches):
        return batches
    one = (isinstance(batches, (tuple, list)) and len(batches) == 2
           and all(isinstance(t, torch.Tensor) for t in batches)) or isinstance(batches, dict)
    if one:
        return lambda i: batches
    if isinstance(batches, (list, tuple)) and batches:
        return lambda i: batches[i % len(batches)]
    raise ValueError(f"batches must be a data.Batches, a non-empty list of batches, one (x, y) pair or a function "
                     f"step -> batch, got {type(batches).__name__}")


def _steepest(lrs: list[float], smoothed: list[float], end: int) -> float | None:
    """LR of the most negative ``dS/d ln(lr)`` over points ``1 .. end`` (central differences)."""
    logs = [math.log(lr) for lr in lrs]
    best, best_lr = 0.0, None
    for i in range(1, min(end, len(lrs) - 2) + 1):
        slope = (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1])
        if slope < best:
            best, best_lr = slope, lrs[i]
    return best_lr


def lr_range_test(model, batches, loss_fn=None, lr_min: float = 1e-6, lr_max: float = 1.0, steps: int = 100,
                  smoothing: float = 0.05, diverge_factor: float = 4.0, *, weight_decay: float = 0.1,
                  betas=(0.9, 0.95), grad_clip: float = 1.0, accumulation: int = 1) -> LRRangeResult:
    """Sweep the LR exponentially from ``lr_min`` to ``lr_max`` over ``steps`` steps (module docstring); the model
    comes back exactly as it was. ``batches``: a ``data.Batches``, a list of batches, one batch, or ``i -> batch``;
    a batch is ``(x, y)`` or a dict with ``labels``/``targets``. ``loss_fn(model, batch) -> (loss_sum, n_valid)``.
    Each step is ``loop.accumulate_gradients``: with ``accumulation=K`` (a ``data.Batches`` only) step ``i``'s batch
    runs as K micro-batches, normalised by its token count as training does; the loss is the step's mean token loss.
    """
    check_model(model)
    check_loss_fn(loss_fn)
    lr_min, lr_max = positive_float("lr_min", lr_min), positive_float("lr_max", lr_max)
    if lr_max <= lr_min:
        raise ValueError(f"lr_max must be > lr_min = {lr_min:g}, got {lr_max:g}")
    steps = positive_int("steps", steps)
    if steps < 5:
        raise ValueError(f"steps must be an integer >= 5 (a curve needs points), got {steps}")
    smoothing = open_fraction("smoothing", smoothing, include_one=True, note="(1 = no smoothing)")
    diverge_factor = positive_float("diverge_factor", diverge_factor)
    if diverge_factor <= 1:
        raise ValueError(f"diverge_factor must be a number > 1, got {diverge_factor:g}")
    non_negative_float("weight_decay", weight_decay)
    non_negative_float("grad_clip", grad_clip, "(0 = no clipping)")
    accumulation = positive_int("accumulation", accumulation, "(micro-batches per step)")
    if accumulation > 1 and not hasattr(batches, "microbatches"):
        raise ValueError(f"accumulation={accumulation} needs batches to be a data.Batches (it splits each step's "
                         "batch)")
    get = _batch_source(batches)
    ga = GradientAccumulation(accumulation)
    device = model_device(model)
    ratio = lr_max / lr_min
    lrs_all = [lr_min * ratio ** (i / (steps - 1)) for i in range(steps)]
    lrs, losses, smoothed = [], [], []
    diverged_at = None
    with restored(model):
        model.train()
        optimizer = build_optimizer(model, lr_min, weight_decay, tuple(betas))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        avg, best = 0.0, math.inf
        for i, lr in enumerate(lrs_all):
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = batches.microbatches(i, 0, 1, accumulation) if accumulation > 1 else [get(i)]
            loss_sum, n_tokens = accumulate_gradients(model, [to_device(mb, device) for mb in micro], ga,
                                                      loss_fn=loss_fn)  # zeroes the gradients, then backward
            value = float(loss_sum) / max(n_tokens, 1)
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                smoothed.append(math.inf)
                diverged_at = i
                break
            avg = (1 - smoothing) * avg + smoothing * value
            s = avg / (1 - (1 - smoothing) ** (i + 1))
            smoothed.append(s)
            best = min(best, s)
            if s > diverge_factor * best:
                diverged_at = i
                break
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        del optimizer
    finite = [(s, i) for i, s in enumerate(smoothed) if math.isfinite(s)]
    if not finite:
        raise ValueError(f"the loss was non-finite from the first step at lr_min={lr_min:g}: run stage1 preflight "
                         "(curry_train.workflow.preflight) on this model and batch")
    _, i_min = min(finite)
    lr_steep = _steepest(lrs, smoothed, i_min)
    lr_tenth = None if diverged_at is None else lrs[diverged_at] / 10
    candidates = [(lr, name) for lr, name in ((lr_steep, "steepest descent"), (lr_tenth, "divergence / 10"))
                  if lr is not None]
    if candidates:
        suggested, rule = min(candidates)
        rule = f"{rule}, the smaller of the two" if len(candidates) == 2 else f"{rule}, the only one found"
    else:
        suggested, rule = lrs[i_min] / 10, "minimum of the smoothed loss / 10 (no falling region, no divergence)"
    return LRRangeResult(lrs, losses, smoothed, diverged_at, lr_steep, lr_tenth, suggested, rule, lrs[i_min])


def lr_range_main(argv: list[str] | None = None) -> int:
    """``python -m curry_train lr-range [--steps N] [--lr-min X] [--lr-max X] [--plot PATH] [overrides]``: the LR range
    test on the configured model as ``train`` builds it in one process and its training batches (weight decay, betas,
    gradient clip and accumulation steps from ``train.*``); prints the table, writes the plot when asked; returns 0."""
    import argparse

    from ..config import load_config, validate
    from ..data import build_batches
    from ..user_model import build_loss, model_name

    parser = argparse.ArgumentParser(
        prog="python -m curry_train lr-range",
        description="LR range test: train the configured model for --steps steps with the learning rate growing "
                    "exponentially from --lr-min to --lr-max; prints the steepest-descent and divergence/10 "
                    "suggestions (the model is not saved).")
    parser.add_argument("--steps", type=int, default=100, help="steps of the sweep (default 100)")
    parser.add_argument("--lr-min", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    parser.add_argument("--lr-max", type=float, default=1.0, help="last learning rate (default 1)")
    parser.add_argument("--plot", default=None, help="write the curve to this PNG")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train")
    args = parser.parse_args(argv)
    cfg = load_config(args.overrides)
    validate(cfg)
    t = cfg.train
    model, _, _ = configured_model(cfg)
    loss_fn = build_loss(cfg) if t.loss is not None else None
    result = lr_range_test(model, build_batches(cfg), loss_fn, args.lr_min, args.lr_max, args.steps,
                           weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), grad_clip=t.grad_clip,
                           accumulation=t.gradient_accumulation_steps)
    print(f"LR range test: {model_name(cfg)}, batch {t.batch_size} x {t.seq_len}\n")
    print(result.markdown())
    if args.plot:
        print(f"plot: {result.plot(args.plot)}")
    return 0
