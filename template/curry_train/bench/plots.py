"""Gantt charts of pipeline timelines (``primitives.pipeline.sim.Timeline``), simulated or measured.

One row per rank (rank 0 on top), time to the right; F blue, B red, I (input-gradient backward) orange,
W (weight-gradient backward) green; the number in a bar is the micro-batch. With several stages per rank the
second (third, ...) stage chunk of a rank is drawn hatched. White space is the bubble. matplotlib, Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLORS = {"F": "#4c72b0", "B": "#c44e52", "I": "#dd8452", "W": "#55a868"}
HATCHES = ["", "//", "xx", ".."]


def _draw(ax, timeline, unit: str) -> None:
    scale = 1e3 if unit == "ms" else 1.0
    p = timeline.n_ranks
    span = timeline.makespan * scale
    for e in timeline.events:
        start, width = e.start * scale, (e.end - e.start) * scale
        chunk = e.stage // p
        ax.barh(e.rank, width, left=start, height=0.8, color=COLORS.get(e.kind, "grey"), edgecolor="black",
                linewidth=0.4, hatch=HATCHES[chunk % len(HATCHES)])
        if span and width > span / 90:
            ax.text(start + width / 2, e.rank, str(e.mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"rank {r}" for r in range(p)])
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_xlim(0, span * 1.01 if span else 1)
    ax.set_xlabel("time (ms)" if unit == "ms" else "time (units of one forward)")
    ax.set_title(f"{timeline.label}: bubble {timeline.bubble_fraction:.3f}", fontsize=9, loc="left")


def plot_timeline(timelines, path, title: str | None = None, units=None) -> Path:
    """Write a PNG with one Gantt panel per timeline. ``units[i]``: "ms" for measured (seconds -> ms), "slots" for
    simulated (default: "ms" when the label says measured). Panels in ms share one time axis, so that two measured
    runs compare by length."""
    timelines = timelines if isinstance(timelines, (list, tuple)) else [timelines]
    units = units or ["ms" if "measured" in t.label else "slots" for t in timelines]
    height = sum(0.45 * t.n_ranks + 0.9 for t in timelines) + (0.4 if title else 0)
    fig, axes = plt.subplots(len(timelines), 1, figsize=(10, height), squeeze=False)
    longest_ms = max((1e3 * t.makespan for t, unit in zip(timelines, units) if unit == "ms"), default=0.0)
    for ax, t, unit in zip(axes[:, 0], timelines, units):
        _draw(ax, t, unit)
        if unit == "ms" and longest_ms:
            ax.set_xlim(0, longest_ms * 1.01)
    kinds = sorted({e.kind for t in timelines for e in t.events}, key="FBIW".index)
    axes[0, 0].legend(handles=[Patch(color=COLORS[k], label=k) for k in kinds], loc="lower right", fontsize=7,
                      ncol=len(kinds), bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
