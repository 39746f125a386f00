"""Ablation matrix (stage 6): which of K changes made a variant better, with a variance-aware verdict per change.

Two designs over runs that each have several seeds (a single seed per cell says nothing about noise):

* **leave-one-out** ``leave_one_out(results, full="V", without={"c1": "V-c1", ...})``: the full variant ``V`` against
  ``V`` with one change removed. Effect of ``c`` = ``mean(V - c) - mean(V)``: what removing it costs. Answers
  "what can I remove?".
* **additive** ``additive(results, ["base", "base+c1", "base+c1+c2", ...])``: each arm adds one change to the arm
  before it. Effect of the added change = ``mean(previous) - mean(arm)``. Answers "in what order to build"; the
  effects depend on the order.

The metric is lower-is-better (a loss); an effect > 0 means the change helps. Each cell is Welch's t-test
(``ablate.welch_t_test``) of the two arms' per-seed values, with ``min_effect`` the smallest effect that matters:

* ``helps``: ``p < alpha`` and effect ``>= min_effect``;  ``hurts``: ``p < alpha`` and effect ``<= -min_effect``;
* ``no effect``: the ``1 - alpha`` interval of the effect lies inside ``(-min_effect, min_effect)``;
* ``inconclusive``: otherwise: add seeds.

``results`` is ``{arm: [value per seed]}``, an ``ablate`` result (``AblationResult``: each arm's ``values``), or
``{arm: [metrics.jsonl path per seed]}`` (one JSON object per line, as ``run_training_steps`` histories written out;
the value of a run is the mean of ``metric`` over its last ``tail`` lines). ``MatrixResult.markdown()`` is the table,
``MatrixResult.heatmap(path)`` a PNG of the effects (rows: changes) annotated with the verdicts.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .ablate import AblationResult, TTestResult, welch_t_test
from .common import fmt, markdown_table, open_fraction

VERDICTS = ("helps", "hurts", "no effect", "inconclusive")


@dataclass
class Cell:
    change: str
    arm: str  # the arm measured against the reference
    reference: str
    effect: float  # > 0: the change helps (lower metric with it)
    test: TTestResult
    verdict: str
    n: tuple[int, int]  # seeds of (reference, arm)


@dataclass
class MatrixResult:
    design: str  # "leave-one-out" or "additive"
    metric: str
    cells: list[Cell]
    alpha: float
    min_effect: float

    def markdown(self) -> str:
        head = (f"{self.design} ablation of {self.metric} (lower is better; effect > 0 = the change helps; "
                f"Welch t-test, alpha {self.alpha}, min effect {fmt(self.min_effect)})\n\n")
        rows = [[c.change, f"{c.arm} vs {c.reference}", fmt(c.effect), f"[{fmt(c.test.ci[0])}, {fmt(c.test.ci[1])}]",
                 fmt(c.test.p, 3), f"{c.n[0]}/{c.n[1]}", c.verdict] for c in self.cells]
        return head + markdown_table(["change", "arms", "effect", "interval", "p", "seeds", "verdict"], rows)

    def heatmap(self, path) -> Path:
        """A PNG: one row per change, colour = effect (green helps, red hurts), text = effect and verdict."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        effects = [[c.effect] for c in self.cells]
        lim = max([abs(c.effect) for c in self.cells] + [self.min_effect, 1e-12])
        fig, ax = plt.subplots(figsize=(4.5, 0.6 + 0.5 * len(self.cells)))
        im = ax.imshow(effects, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
        for i, c in enumerate(self.cells):
            ax.text(0, i, f"{c.effect:+.4g}\n{c.verdict}", ha="center", va="center", fontsize=8)
        ax.set_yticks(range(len(self.cells)), [c.change for c in self.cells])
        ax.set_xticks([0], [f"effect on {self.metric}"])
        ax.set_title(self.design, fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def read_metrics(path, metric: str = "loss", tail: int = 1) -> float:
    """Mean of ``metric`` over the last ``tail`` JSON lines of ``path`` that hold it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"metrics file {str(p)!r} does not exist")
    values = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not a JSON line ({e.msg})") from None
            if isinstance(rec, dict) and isinstance(rec.get(metric), (int, float)):
                values.append(float(rec[metric]))
    if not values:
        raise ValueError(f"{p}: no line has a numeric {metric!r}")
    return statistics.fmean(values[-tail:])


def values_of(results, metric: str = "loss", tail: int = 1) -> dict[str, list[float]]:
    """``{arm: [value per seed]}`` from any accepted ``results`` (see the module docstring)."""
    if isinstance(results, AblationResult):
        return {a.name: [float(v) for v in a.values] for a in results.arms}
    if not isinstance(results, dict) or not results:
        raise ValueError(f"results must be a dict arm -> list of values or metrics files, or an ablate result; "
                         f"got {type(results).__name__}")
    out = {}
    for arm, runs in results.items():
        if not isinstance(runs, (list, tuple)):
            raise ValueError(f"results[{arm!r}] must be a list (one value or metrics file per seed), got "
                             f"{type(runs).__name__}")
        vals = []
        for r in runs:
            if isinstance(r, (str, Path)):
                vals.append(read_metrics(r, metric, tail))
            elif isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r):
                vals.append(float(r))
            else:
                raise ValueError(f"results[{arm!r}]: {r!r} is neither a finite number nor a metrics file path")
        out[arm] = vals
    return out


def _metric_name(results, metric: str) -> str:
    return results.metric if isinstance(results, AblationResult) else metric


def _verdict(t: TTestResult, effect: float, alpha: float, min_effect: float) -> str:
    if t.p < alpha and effect >= min_effect:
        return "helps"
    if t.p < alpha and effect <= -min_effect:
        return "hurts"
    if -min_effect < t.ci[0] and t.ci[1] < min_effect:
        return "no effect"
    return "inconclusive"


def _cell(values, change, arm, reference, alpha, min_effect) -> Cell:
    for name in (arm, reference):
        if name not in values:
            raise ValueError(f"no results for arm {name!r} (have {', '.join(values)})")
        if len(values[name]) < 2:
            raise ValueError(f"arm {name!r} has {len(values[name])} seed(s); every cell needs at least 2")
    t = welch_t_test(values[arm], values[reference], alpha)  # mean(arm) - mean(reference)
    return Cell(change, arm, reference, t.diff, t, _verdict(t, t.diff, alpha, min_effect),
                (len(values[reference]), len(values[arm])))


def _min_effect(values, reference, min_effect):
    if min_effect is None:
        return 0.01 * abs(statistics.fmean(values[reference]))
    if not isinstance(min_effect, (int, float)) or isinstance(min_effect, bool) or not min_effect >= 0:
        raise ValueError(f"min_effect must be a number >= 0, got {min_effect!r}")
    return float(min_effect)


def leave_one_out(results, full: str, without: dict, *, metric: str = "loss", tail: int = 1, alpha: float = 0.05,
                  min_effect: float | None = None) -> MatrixResult:
    """Leave-one-out matrix: for each ``change -> arm without it``, effect = ``mean(arm) - mean(full)``.

    ``min_effect`` defaults to 1% of the full variant's mean."""
    open_fraction("alpha", alpha)
    values = values_of(results, metric, tail)
    if not isinstance(without, dict) or not without:
        raise ValueError(f"without must be a dict change -> arm name of the variant without that change, got "
                         f"{without!r}")
    if full not in values:
        raise ValueError(f"no results for the full variant {full!r} (have {', '.join(values)})")
    m = _min_effect(values, full, min_effect)
    cells = [_cell(values, change, arm, full, alpha, m) for change, arm in without.items()]
    return MatrixResult("leave-one-out", _metric_name(results, metric), cells, alpha, m)


def additive(results, order, *, changes=None, metric: str = "loss", tail: int = 1, alpha: float = 0.05,
             min_effect: float | None = None) -> MatrixResult:
    """Additive matrix: ``order[0]`` is the base, each next arm adds one change; effect of the change added by
    ``order[i]`` = ``mean(order[i-1]) - mean(order[i])``. ``changes`` names them (default: the arm names).
    ``min_effect`` defaults to 1% of the base's mean."""
    open_fraction("alpha", alpha)
    values = values_of(results, metric, tail)
    if not isinstance(order, (list, tuple)) or len(order) < 2:
        raise ValueError(f"order must list at least 2 arms (the base first), got {order!r}")
    changes = list(order[1:]) if changes is None else list(changes)
    if len(changes) != len(order) - 1:
        raise ValueError(f"changes must name the {len(order) - 1} added changes, got {len(changes)}")
    if order[0] not in values:
        raise ValueError(f"no results for the base arm {order[0]!r} (have {', '.join(values)})")
    m = _min_effect(values, order[0], min_effect)
    cells = []
    for change, prev, arm in zip(changes, order[:-1], order[1:]):
        c = _cell(values, change, prev, arm, alpha, m)  # mean(prev) - mean(arm): > 0 when adding the change helps
        cells.append(Cell(change, arm, prev, c.effect, c.test, c.verdict, (c.n[1], c.n[0])))
    return MatrixResult("additive", _metric_name(results, metric), cells, alpha, m)
