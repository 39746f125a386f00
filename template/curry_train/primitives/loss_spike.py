"""``LossSpikeWatchdog``: tell a sustained loss spike from ordinary noise, so a run can roll back and skip the data.

Per observed step ``t`` with a finite loss ``L_t`` (non-finite losses are the non-finite guard's business:
ignored here, neither history nor spike)::

    H     = the last ``window`` accepted losses (accepted = observed while no spike, never a spike loss)
    b     = median(H)                                   the baseline: robust to the outliers that remain
    f     = floor if floor is not None else min(H)      the ratio applies to the loss *minus* this floor
    spike = L_t - f > threshold_ratio * max(b - f, 1e-3 * |b|)

With the default ``floor=None`` (the window's minimum), ``b - f`` is the spread of ordinary losses below the
median (noise plus the downward trend inside the window), so ``threshold_ratio=5`` asks for a jump five times larger
than that spread, whatever the loss's scale (LM losses of 2-10 alike). ``floor=0`` makes it the plain ratio
``L > r * b``, far too lax at ``r = 5`` for an LM loss (3 -> 15): use ``r`` of 1.5-2 then, or ``floor`` near the
lowest loss you expect (the ``1e-3 * |b|`` term only keeps a flat history from calling every rise a spike).

It fires (``observe`` returns True) on the ``sustain_steps``-th spike step in a row, and only once ``min_history``
losses have been accepted (before that every finite loss is accepted: the baseline is still forming). A single
outlier followed by a normal loss only ends the run of spike steps; spike losses never enter ``H``. After acting
on it (rolling back), call ``reset()``: the run of spike steps is cleared, the accepted history kept.
``state_dict()`` is plain JSON (it fits a checkpoint's ``extra``), so the watchdog survives a resume.
"""

from __future__ import annotations

import math
import statistics

from ._checks import integer, positive_int
from ._config import config_getter

FLAT = 1e-3  # smallest spread, relative to the baseline: a perfectly flat history still needs a visible jump


class LossSpikeWatchdog:
    """``observe(step, loss) -> bool``: True when ``sustain_steps`` consecutive steps spiked (module docstring)."""

    def __init__(self, threshold_ratio: float = 5.0, sustain_steps: int = 3, min_history: int = 20,
                 window: int = 50, floor: float | None = None):
        if isinstance(threshold_ratio, bool) or not isinstance(threshold_ratio, (int, float)) \
                or not math.isfinite(threshold_ratio) or threshold_ratio <= 1:
            raise ValueError(f"threshold_ratio must be a number > 1 (spike: loss - floor > ratio x (baseline - floor))"
                             f", got {threshold_ratio!r}")
        self.threshold_ratio = float(threshold_ratio)
        self.sustain_steps = positive_int("sustain_steps", sustain_steps, "(consecutive spike steps that fire)")
        self.min_history = integer("min_history", min_history, 2, note="(losses seen before a spike can count)")
        self.window = integer("window", window, 2, note="(recent losses the baseline is the median of)")
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                                  or not math.isfinite(floor)):
            raise ValueError(f"floor must be a finite number or None (= the window's minimum loss), got {floor!r}")
        self.floor = None if floor is None else float(floor)
        self.reset(history=True)

    @classmethod
    def from_config(cls, cfg) -> "LossSpikeWatchdog":
        """From ``cfg`` (e.g. ``cfg.train.spike``): ``threshold_ratio``, ``sustain_steps``, ``min_history``,
        ``window``, ``floor``; other keys (``enabled``, ``max_rollbacks``) are the caller's."""
        get = config_getter(cfg)
        return cls(get("threshold_ratio", 5.0), get("sustain_steps", 3), get("min_history", 20), get("window", 50),
                   get("floor", None))

    # -- state -------------------------------------------------------------------------------------------------
    def reset(self, history: bool = False) -> None:
        """Forget the run of spike steps (after a rollback); ``history=True`` also forgets the accepted losses."""
        if history:
            self.history: list[float] = []
            self.seen = 0  # accepted losses ever (min_history counts these; history keeps the last `window`)
        self.spike_steps = 0  # spike steps in a row so far
        self.spike_start: int | None = None  # the step the current run of spike steps began at
        self.spike_loss = math.nan  # the latest spike loss

    @property
    def in_spike(self) -> bool:
        """A spike is in progress (at least one spike step, not yet reset): a checkpoint now may hold its damage."""
        return self.spike_steps > 0

    @property
    def baseline(self) -> float:
        """``median(H)`` (NaN while ``H`` is empty)."""
        return statistics.median(self.history) if self.history else math.nan

    def threshold(self) -> float:
        """The loss above which a step is a spike now (inf while fewer than ``min_history`` losses were accepted)."""
        if self.seen < self.min_history:
            return math.inf
        b = self.baseline
        f = min(self.history) if self.floor is None else self.floor
        return f + self.threshold_ratio * max(b - f, FLAT * abs(b))

    def state_dict(self) -> dict:
        return {"history": list(self.history), "seen": self.seen, "spike_steps": self.spike_steps,
                "spike_start": self.spike_start, "spike_loss": None if math.isnan(self.spike_loss) else self.spike_loss}

    def load_state_dict(self, state: dict) -> None:
        try:
            history = [float(x) for x in state["history"]][-self.window:]
            seen, run, start = int(state["seen"]), int(state["spike_steps"]), state["spike_start"]
            loss = math.nan if state.get("spike_loss") is None else float(state["spike_loss"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a LossSpikeWatchdog state_dict ({type(e).__name__}: {e}): {state!r:.200}") from None
        self.history, self.seen, self.spike_steps = history, seen, run
        self.spike_start, self.spike_loss = (None if start is None else int(start)), loss

    # -- the rule ----------------------------------------------------------------------------------------------
    def observe(self, step: int, loss: float) -> bool:
        """Record step ``step``'s loss; True if it is the ``sustain_steps``-th spike step in a row (or later)."""
        loss = float(loss)
        if not math.isfinite(loss):
            return False
        if loss > self.threshold():
            if self.spike_steps == 0:
                self.spike_start = int(step)
            self.spike_steps += 1
            self.spike_loss = loss
            return self.spike_steps >= self.sustain_steps
        self.reset()
        self.history = (self.history + [loss])[-self.window:]
        self.seen += 1
        return False

    def __repr__(self) -> str:
        return (f"LossSpikeWatchdog(threshold_ratio={self.threshold_ratio:g}, sustain_steps={self.sustain_steps}, "
                f"min_history={self.min_history}, window={self.window}, floor={self.floor})")
