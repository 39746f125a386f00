"""Kill criterion: stop a run early when its loss is clearly worse than a baseline's at the same number of tokens.

``KillCriterion(baseline_losses_by_tokens, seed_losses)`` compares a run's loss ``L(T)`` after ``T`` training tokens
with the baseline curve ``B(T)`` (linear interpolation between its points) and a noise band ``sigma(T)``:

* ``sigma(T)`` = standard deviation (``ddof=1``) across the ``seed_losses`` curves at ``T``: runs of the baseline
  configuration with other seeds (init and data order), so it holds both the batch-to-batch noise of one step's
  loss and the seed-to-seed spread. Without seed curves: ``default_noise * B(T)`` (default 0.02, i.e. 2% of the
  loss: a stated guess; measure it with seeds).
* the gap ``L(T) - B(T)`` is one *strike* when it exceeds ``threshold = margin * sigma(T) * sqrt(1 + 1/n_base)``
  (``margin`` default 3); ``n_base`` is the number of runs averaged into ``B`` (1 for a given curve, the number of
  seed curves when ``B`` is their mean), so the threshold is ``margin`` standard deviations of the difference of two
  noisy losses. A non-finite loss is a strike too.
* ``patience`` (default 3) strikes in a row: ``kill``. Any check within the band resets the count. Before
  ``min_tokens`` and past the end of the baseline curve the decision is ``continue`` (nothing to compare with).

``smoothing`` (default None: raw losses) applies one bias-corrected EMA, weight ``a``, alike to the run's losses
(check by check) and to every curve (point by point): use it when the run is checked at every step and the curves
hold every step's training loss (``run_training_steps`` histories), where one step's loss is noisy; the noise band
then shrinks with it, by about ``sqrt(a / (2 - a))`` for uncorrelated steps.

The rule is one-sided: a run *better* than the baseline is never killed. ``on_step(step, metrics)`` plugs into
``loop.run_training_steps(on_step=...)``: it adds ``metrics["tokens"]`` (the step's global valid tokens) to a running
total (``start_tokens`` for a resumed run) and raises ``KillRun`` (its ``decision`` attached) when the rule fires.
Curves are ``{tokens: loss}``, a list of ``(tokens, loss)`` pairs, or a ``run_training_steps`` history (a list of
metrics dicts: the tokens summed step by step, ``curve_from_history``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..primitives._checks import non_negative_float, non_negative_int, positive_float, positive_int
from .common import open_fraction

CONTINUE, KILL = "continue", "kill"


class KillRun(RuntimeError):
    """Raised by ``KillCriterion.on_step`` when the kill rule fires; ``.decision`` says why."""

    def __init__(self, decision: "KillDecision"):
        super().__init__(f"kill criterion fired at step {decision.step}: {decision.reason}")
        self.decision = decision


@dataclass
class KillDecision:
    decision: str  # "continue" | "kill"
    reason: str
    tokens: int
    loss: float
    baseline: float | None = None
    gap: float | None = None
    threshold: float | None = None
    strikes: int = 0
    step: int | None = None


def curve_from_history(history, start_tokens: int = 0) -> list[tuple[int, float]]:
    """``(tokens seen after the step, loss of the step)`` for each metrics dict of a ``run_training_steps`` history."""
    total, curve = start_tokens, []
    for i, m in enumerate(history):
        if not isinstance(m, dict) or "tokens" not in m or "loss" not in m:
            raise ValueError(f"history[{i}] must be a metrics dict with 'tokens' and 'loss' (run_training_steps), "
                             f"got {m!r}")
        total += int(m["tokens"])
        curve.append((total, float(m["loss"])))
    return curve


def ema(values, smoothing: float) -> np.ndarray:
    """Bias-corrected exponential moving average: ``A_i = (1 - a) A_{i-1} + a x_i``,
    ``S_i = A_i / (1 - (1 - a)^(i+1))``."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = (1 - smoothing) * avg + smoothing * float(v)
        out.append(avg / (1 - (1 - smoothing) ** (i + 1)))
    return np.array(out)


def as_curve(curve, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, losses)`` sorted by tokens, from a dict, a list of pairs or a history; one-line errors naming
    ``name``."""
    if isinstance(curve, dict):
        pairs = list(curve.items())
    elif isinstance(curve, (list, tuple)) and curve and isinstance(curve[0], dict):
        pairs = curve_from_history(curve)
    elif isinstance(curve, (list, tuple)):
        pairs = list(curve)
    else:
        raise ValueError(f"{name} must be a dict tokens -> loss, a list of (tokens, loss) pairs or a "
                         f"run_training_steps history, got {type(curve).__name__}")
    try:
        pairs = sorted((float(t), float(v)) for t, v in pairs)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold (tokens, loss) number pairs") from None
    if len(pairs) < 2:
        raise ValueError(f"{name} must have at least 2 points (tokens, loss), got {len(pairs)}")
    tokens = np.array([t for t, _ in pairs])
    losses = np.array([v for _, v in pairs])
    if (tokens < 0).any() or not np.isfinite(losses).all():
        raise ValueError(f"{name} must have tokens >= 0 and finite losses")
    return tokens, losses


class KillCriterion:
    """Decide ``continue`` / ``kill`` for a run against a baseline curve and its seed noise (module docstring).

    ``baseline_losses_by_tokens``: the baseline curve, or None to use the mean of ``seed_losses``.
    ``seed_losses``: a list of >= 2 curves of the baseline configuration run with other seeds (or None).
    """

    def __init__(self, baseline_losses_by_tokens, seed_losses=None, margin: float = 3.0, patience: int = 3, *,
                 default_noise: float = 0.02, min_tokens: int = 0, start_tokens: int = 0,
                 smoothing: float | None = None):
        if smoothing is not None:
            open_fraction("smoothing", smoothing, include_one=True, note="(or None: raw losses)")
        self.smoothing = smoothing
        self._avg, self._n = 0.0, 0
        self.margin = positive_float("margin", margin, "(standard deviations of the noise)")
        self.patience = positive_int("patience", patience, "(strikes in a row before a kill)")
        self.default_noise = positive_float("default_noise", default_noise, "(fraction of the baseline loss)")
        self.min_tokens = non_negative_int("min_tokens", min_tokens)
        self.tokens_seen = non_negative_int("start_tokens", start_tokens)
        if seed_losses is not None:
            if not isinstance(seed_losses, (list, tuple)) or len(seed_losses) < 2:
                raise ValueError("seed_losses must be a list of at least 2 curves (runs of the baseline with other "
                                 f"seeds) or None, got {type(seed_losses).__name__} of "
                                 f"{len(seed_losses) if isinstance(seed_losses, (list, tuple)) else '?'}")
            self.seeds = [self._smooth(as_curve(c, f"seed_losses[{i}]")) for i, c in enumerate(seed_losses)]
        else:
            self.seeds = []
        if baseline_losses_by_tokens is None:
            if not self.seeds:
                raise ValueError("baseline_losses_by_tokens must be a curve, or None with seed_losses given "
                                 "(the baseline is then their mean)")
            grid = self.seeds[0][0]
            self.base = (grid, np.mean([np.interp(grid, t, v) for t, v in self.seeds], axis=0))
            self.n_base = len(self.seeds)
        else:
            self.base = self._smooth(as_curve(baseline_losses_by_tokens, "baseline_losses_by_tokens"))
            self.n_base = 1
        self.strikes = 0
        self.history: list[KillDecision] = []

    def _smooth(self, curve: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return curve if self.smoothing is None else (curve[0], ema(curve[1], self.smoothing))

    def noise(self, tokens: float) -> float:
        """``sigma(T)``: the std across the seed curves at ``tokens``, or ``default_noise * B(T)``."""
        if self.seeds:
            return float(np.std([np.interp(tokens, t, v) for t, v in self.seeds], ddof=1))
        return self.default_noise * float(np.interp(tokens, *self.base))

    def check(self, tokens: int, loss: float, step: int | None = None) -> KillDecision:
        """One comparison at ``tokens`` (total seen so far); updates the strike count and returns the decision."""
        tokens = int(non_negative_float("tokens", tokens))
        loss = float(loss)
        if self.smoothing is not None and math.isfinite(loss):  # the same EMA as the curves got, over the checks
            self._n += 1
            self._avg = (1 - self.smoothing) * self._avg + self.smoothing * loss
            loss = self._avg / (1 - (1 - self.smoothing) ** self._n)
        lo, hi = self.base[0][0], self.base[0][-1]
        decision = KillDecision(CONTINUE, "", tokens, loss, step=step)
        if not math.isfinite(loss):
            self.strikes += 1
            decision.reason = f"non-finite loss {loss}"
        elif tokens < max(self.min_tokens, lo) or tokens > hi:
            self.strikes = 0
            where = "before min_tokens" if tokens < self.min_tokens else "outside the baseline curve"
            decision.reason = f"{tokens:,} tokens: {where} ({int(lo):,} .. {int(hi):,}), not compared"
        else:
            base = float(np.interp(tokens, *self.base))
            sigma = self.noise(tokens)
            threshold = self.margin * sigma * math.sqrt(1 + 1 / self.n_base)
            gap = loss - base
            decision.baseline, decision.gap, decision.threshold = base, gap, threshold
            self.strikes = self.strikes + 1 if gap > threshold else 0
            decision.reason = (f"loss {loss:.4f} vs baseline {base:.4f} at {tokens:,} tokens: gap {gap:+.4f} "
                               f"{'>' if gap > threshold else '<='} {self.margin:g} x noise {sigma:.4f} x "
                               f"sqrt(1 + 1/{self.n_base}) = {threshold:.4f}")
        decision.strikes = self.strikes
        if self.strikes >= self.patience:
            decision.decision = KILL
            decision.reason += f"; {self.strikes} strikes in a row (patience {self.patience})"
        self.history.append(decision)
        return decision

    def on_step(self, step: int, metrics: dict) -> None:
        """``run_training_steps(on_step=kill.on_step)``: raise ``KillRun`` when the rule fires."""
        self.tokens_seen += int(metrics["tokens"])
        decision = self.check(self.tokens_seen, float(metrics["loss"]), step)
        if decision.decision == KILL:
            raise KillRun(decision)

    @property
    def decision(self) -> KillDecision | None:
        """The latest decision (None before the first check)."""
        return self.history[-1] if self.history else None
