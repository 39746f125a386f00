"""Pipeline schedules without a process group: validation, per-rank action lists, a bubble simulator.

Vocabulary. ``p`` pipeline ranks, ``v`` stages per rank (virtual stages), ``S = p * v`` stages, ``m``
micro-batches. An action is ``(stage, kind, mb)`` with kind ``F`` (forward), ``B`` (full backward), or, for
zero-bubble schedules, ``I`` (backward for the stage *input*, on the critical path) and ``W`` (backward for the
*weights*, free to move later and fill bubbles).

Analytic bubbles (fraction of ``p x makespan`` a rank is idle), uniform stages, B = I + W:

* GPipe and 1F1B: ``(p - 1) / (m + p - 1)``. Both fill for ``p - 1`` slots and drain for ``p - 1`` slots of
  ``f + b``; the ratio ``b / f`` cancels. 1F1B does not shrink the bubble, it caps the micro-batches whose
  activations are alive at ``p - stage`` instead of ``m``.
* Interleaved 1F1B / looped BFS with ``v`` stages per rank: each slot is ``1/v`` as long, so the fill/drain
  is ``(p - 1) / v`` of a full slot: ``(p - 1) / (v * m + p - 1)``.
* Zero bubble (ZB-H1 interleaved, ZBV, DualPipeV): no closed form here; W actions move into the drain
  bubble, so the result depends on ``f``, ``b`` and ``w``; ``simulate`` computes it.

``simulate`` runs a dependency-driven event simulation over the per-rank action lists: each rank executes its
list in order; ``F(s, mb)`` waits for ``F(s-1, mb)``; ``B``/``I(s, mb)`` waits for ``F(s, mb)`` and for the
input-gradient action (``B`` or ``I``) of ``(s+1, mb)``; ``W(s, mb)`` waits for ``I(s, mb)``. A dependency between
stages on different ranks waits ``comm`` longer (one point-to-point transfer; default 0, free communication, which
gives the textbook bubble). A list that cannot finish raises ``RuntimeError`` (deadlock), printing the stuck
actions.

Action lists. GPipe and 1F1B are generated here, exactly as ``ScheduleGPipe`` / ``Schedule1F1B`` execute them
(PyTorch 2.13's ``Schedule1F1B._get_pipeline_order`` is wrong for the last rank: it lists ``F1..F8`` instead of
``F0..F7``). The multi-stage kinds come from the PyTorch schedule classes themselves, built on mocked stages by
``torch.distributed.pipelining._schedule_visualizer.get_schedule_ops`` (private API; an ImportError names it).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

from .._checks import positive_int

# kind -> (PyTorch class name, stage placement, allowed stages per rank: (min, max or None))
KINDS = {
    "gpipe": ("ScheduleGPipe", "loop", (1, 1)),
    "1f1b": ("Schedule1F1B", "loop", (1, 1)),
    "interleaved": ("ScheduleInterleaved1F1B", "loop", (2, None)),
    "looped_bfs": ("ScheduleLoopedBFS", "loop", (2, None)),
    "zb": ("ScheduleInterleavedZeroBubble", "loop", (2, None)),
    "zbv": ("ScheduleZBVZeroBubble", "v", (2, 2)),
    "dualpipev": ("ScheduleDualPipeV", "v", (2, 2)),
}
ZERO_BUBBLE_KINDS = ("zb", "zbv", "dualpipev")


def normalize_kind(kind) -> str:
    """Lower-case kind name; unknown kinds are a ValueError listing every kind."""
    name = str(kind).lower().replace("-", "_")
    if name not in KINDS:
        raise ValueError(f"unknown pipeline schedule kind {kind!r}; choose from {', '.join(KINDS)}")
    return name


def default_stages_per_rank(kind: str) -> int:
    return KINDS[normalize_kind(kind)][2][0]


def check_schedule(kind: str, p: int, m: int, v: int | None = None) -> tuple[str, int]:
    """Validate ``(kind, p ranks, m micro-batches, v stages per rank)``; returns ``(kind, v)``.

    Raises ``ValueError`` naming the schedule and the numbers: 1F1B needs ``m >= p`` stages (PyTorch hangs or
    raises otherwise, torchtitan #775), DualPipeV ``m >= 2p``; interleaved kinds need ``v >= 2`` and, like PyTorch,
    ``m`` divisible by the number of rounds ``max(1, m // p)``; ZBV and DualPipeV need exactly ``v = 2``.
    """
    kind = normalize_kind(kind)
    p = positive_int("pipeline size (ranks in pp_group)", p)
    m = positive_int("n_microbatches", m)
    lo, hi = KINDS[kind][2]
    v = lo if v is None else positive_int("stages per rank", v)
    if v < lo or (hi is not None and v > hi):
        allowed = f"exactly {lo}" if lo == hi else f"at least {lo}"
        raise ValueError(f"schedule {kind!r} needs {allowed} stage(s) per rank, got {v} ({p * v} stages on {p} ranks)")
    n_stages = p * v
    if kind == "1f1b" and m < n_stages:
        raise ValueError(
            f"schedule '1f1b' needs n_microbatches >= number of stages: got n_microbatches={m} < {n_stages} stages"
        )
    if kind == "dualpipev" and m < n_stages:
        raise ValueError(
            f"schedule 'dualpipev' needs n_microbatches >= number of stages (2 x pp): "
            f"got n_microbatches={m} < {n_stages} stages"
        )
    if kind in ("interleaved", "zb"):
        rounds = max(1, m // p)
        if m % rounds:
            raise ValueError(
                f"schedule {kind!r} needs n_microbatches divisible by its rounds "
                f"max(1, n_microbatches // pp) = {rounds}: "
                f"got n_microbatches={m} with pp={p} (use a multiple of {p})"
            )
    return kind, v


def stage_placement(kind: str, p: int, v: int | None = None) -> list[list[int]]:
    """Stages held by each rank. Loop style: rank r holds r, r+p, r+2p, ...; V style (ZBV, DualPipeV): r and 2p-1-r,
    so the first and last stage sit on rank 0 and a micro-batch turns around on rank p-1 without a send."""
    kind = normalize_kind(kind)
    v = default_stages_per_rank(kind) if v is None else v
    if KINDS[kind][1] == "v":
        return [[r, 2 * p - 1 - r] for r in range(p)]
    return [[r + j * p for j in range(v)] for r in range(p)]


@dataclass(frozen=True)
class Action:
    stage: int
    kind: str  # F, B, I or W
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"


def _gpipe(p: int, m: int) -> list[list[Action]]:
    """``ScheduleGPipe``: every forward, then every backward, micro-batches in order."""
    return [[Action(r, "F", i) for i in range(m)] + [Action(r, "B", i) for i in range(m)] for r in range(p)]


def _one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """``Schedule1F1B._step_microbatches``: ``min(m, p - r)`` warm-up forwards, then B/F alternating, then drain."""
    lists = []
    for r in range(p):
        warmup = min(m, p - r)
        ops = [Action(r, "F", i) for i in range(warmup)]
        fwd, bwd = warmup, 0
        while bwd < m:
            ops.append(Action(r, "B", bwd))
            bwd += 1
            if fwd < m:
                ops.append(Action(r, "F", fwd))
                fwd += 1
        lists.append(ops)
    return lists


def _from_pytorch(kind: str, p: int, m: int, v: int) -> list[list[Action]]:
    try:
        import torch.distributed.pipelining as pipelining
        from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise ImportError(
            "simulating multi-stage schedules uses torch.distributed.pipelining._schedule_visualizer.get_schedule_ops "
            f"(private API), which this torch does not have: {e}"
        ) from None
    cls = getattr(pipelining, KINDS[kind][0])
    with contextlib.redirect_stdout(io.StringIO()):
        ops = get_schedule_ops(cls, p, m, num_stages_per_rank=v)
    lists = []
    for rank_ops in ops:
        flat = []
        for a in rank_ops:
            if a is None:
                continue
            for sub in a.sub_actions or (a,):  # OVERLAP_F_B runs its sub-actions one after another
                kind_char = sub.computation_type.value
                if kind_char in ("F", "B", "I", "W"):
                    flat.append(Action(sub.stage_index, kind_char, sub.microbatch_index))
        lists.append(flat)
    return lists


def action_lists(kind: str, p: int, m: int, v: int | None = None) -> list[list[Action]]:
    """Per-rank compute actions in execution order (``lists[r]`` is rank r's program)."""
    kind, v = check_schedule(kind, p, m, v)
    if kind == "gpipe":
        return _gpipe(p, m)
    if kind == "1f1b":
        return _one_f_one_b(p, m)
    return _from_pytorch(kind, p, m, v)


@dataclass(frozen=True)
class Event:
    rank: int
    stage: int
    kind: str
    mb: int
    start: float
    end: float


@dataclass
class Timeline:
    """Per-rank busy intervals. ``bubble(r) = 1 - busy(r) / makespan``; ``bubble_fraction`` = ``1 - sum busy / (p x
    makespan)`` (the mean of the per-rank bubbles). Times start at the earliest event."""

    events: list[Event]
    n_ranks: int
    label: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.events:
            t0 = min(e.start for e in self.events)
            self.events = sorted(
                (Event(e.rank, e.stage, e.kind, e.mb, e.start - t0, e.end - t0) for e in self.events),
                key=lambda e: (e.rank, e.start),
            )

    @property
    def makespan(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(e.end - e.start for e in self.events if e.rank == rank)

    def bubble_per_rank(self) -> list[float]:
        span = self.makespan
        return [1.0 - self.busy(r) / span if span > 0 else 0.0 for r in range(self.n_ranks)]

    @property
    def bubble_fraction(self) -> float:
        per_rank = self.bubble_per_rank()
        return sum(per_rank) / len(per_rank)

    def to_dict(self) -> dict:
        return {
            "label": self.label, "n_ranks": self.n_ranks, "meta": self.meta, "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction, "bubble_per_rank": self.bubble_per_rank(),
            "events": [[e.rank, e.stage, e.kind, e.mb, e.start, e.end] for e in self.events],
        }


def _cost(value, stage: int) -> float:
    return float(value[stage]) if isinstance(value, (list, tuple)) else float(value)


def simulate(kind: str, p: int, m: int, v: int | None = None, f=1.0, b=2.0, w=None, comm=0.0) -> Timeline:
    """Simulated timeline of one step. ``f``, ``b``: forward and full-backward cost *of one stage* (a number, or
    one per stage; to compare schedules on the same model, divide by ``v``: each stage then holds ``1/v`` of a
    rank's layers); ``w``: weight-gradient part of ``b`` for I/W-split kinds (``I = b - w``), default ``b / 2``;
    ``comm``: time from the end of an action to the start of the dependent one when the two stages sit on
    different ranks (a point-to-point transfer; 0 = free communication, the textbook bubble)."""
    kind, v = check_schedule(kind, p, m, v)
    lists = action_lists(kind, p, m, v)
    n_stages = p * v
    rank_of = {s: r for r, stages in enumerate(stage_placement(kind, p, v)) for s in stages}
    w = [(_cost(b, s) / 2 if w is None else _cost(w, s)) for s in range(n_stages)]
    cost = {"F": lambda s: _cost(f, s), "B": lambda s: _cost(b, s),
            "I": lambda s: _cost(b, s) - w[s], "W": lambda s: w[s]}
    done: dict[tuple[int, str, int], float] = {}

    def ready_time(a: Action) -> float | None:
        deps = []
        if a.kind == "F" and a.stage > 0:
            deps.append((a.stage - 1, "F", a.mb))
        elif a.kind in ("B", "I"):
            deps.append((a.stage, "F", a.mb))
            if a.stage < n_stages - 1:
                nxt = [(a.stage + 1, k, a.mb) for k in ("B", "I") if (a.stage + 1, k, a.mb) in done]
                if not nxt:
                    return None
                deps.append(nxt[0])
        elif a.kind == "W":
            deps.append((a.stage, "I", a.mb))
        if any(d not in done for d in deps):
            return None
        return max((done[d] + (comm if rank_of[d[0]] != rank_of[a.stage] else 0.0) for d in deps), default=0.0)

    pos, free, events = [0] * p, [0.0] * p, []
    while any(pos[r] < len(lists[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(lists[r]) and (t := ready_time(lists[r][pos[r]])) is not None:
                a = lists[r][pos[r]]
                start = max(t, free[r])
                end = start + cost[a.kind](a.stage)
                done[(a.stage, a.kind, a.mb)] = free[r] = end
                events.append(Event(r, a.stage, a.kind, a.mb, start, end))
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"rank {r}: {lists[r][pos[r]]}" for r in range(p) if pos[r] < len(lists[r]))
            raise RuntimeError(f"{kind} p={p} m={m} v={v}: deadlock in the action lists, stuck at {stuck}")
    return Timeline(events, p, label=f"{kind} simulated (p={p}, m={m}, v={v})",
                    meta={"kind": kind, "p": p, "m": m, "v": v})


def analytic_bubble(kind: str, p: int, m: int, v: int | None = None) -> float | None:
    """Closed-form bubble fraction for uniform stages; ``None`` for zero-bubble kinds (cost-dependent)."""
    kind, v = check_schedule(kind, p, m, v)
    if kind in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if kind in ("interleaved", "looped_bfs"):
        return (p - 1) / (v * m + p - 1)
    return None


def bubble_table(cases, kinds=tuple(KINDS), f=1.0, b=2.0, w=None) -> list[dict]:
    """Rows ``{kind, p, m, v, analytic, simulated}`` for every kind and ``(p, m)`` in ``cases``; kinds whose
    constraints reject a case get ``simulated=None`` and the reason."""
    rows = []
    for p, m in cases:
        for kind in kinds:
            v = default_stages_per_rank(kind)
            try:
                rows.append({"kind": kind, "p": p, "m": m, "v": v, "analytic": analytic_bubble(kind, p, m, v),
                             "simulated": simulate(kind, p, m, v, f=f, b=b, w=w).bubble_fraction})
            except ValueError as e:
                rows.append({"kind": kind, "p": p, "m": m, "v": v, "analytic": None, "simulated": None,
                             "error": str(e)})
    return rows
