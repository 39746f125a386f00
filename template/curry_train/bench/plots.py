"""The bench report's plots: pipeline timelines, recompute, sharding and MFU bars. matplotlib, Agg backend; every
PNG is written to a temporary file and moved into place (``save``).

Gantt charts of pipeline timelines (``primitives.pipeline.sim.Timeline``), simulated or measured: one row per rank
(rank 0 on top), time to the right; F blue, B red, I (input-gradient backward) orange, W (weight-gradient
backward) green; the number in a bar is the micro-batch. With several stages per rank the second (third, ...)
stage chunk of a rank is drawn hatched. White space is the bubble.

``plot_recompute``, ``plot_sharding``, ``plot_mfu`` draw a bench's result dict (what ``bench_recompute``,
``bench_sharding`` and ``bench_mfu`` return).
"""

from __future__ import annotations

import os
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
    return save(fig, path)


def save(fig, path) -> Path:
    """``fig`` as a PNG at ``path``, atomically (temporary file, then ``os.replace``); closes the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _label_bars(ax, bars, texts) -> None:
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 2), textcoords="offset points")


def plot_recompute(result: dict, path) -> Path:
    """Activation bytes kept after forward (and the fwd+bwd peak when measured) and step time, per recompute mode."""
    rows = result["rows"]
    modes = [r["mode"] for r in rows]
    fig, (mem, step) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(rows))
    has_peak = all(r.get("peak_bytes") is not None for r in rows)
    width = 0.4 if has_peak else 0.6
    bars = mem.bar([i - (width / 2 if has_peak else 0) for i in x], [r["activation_bytes"] / 2**20 for r in rows],
                   width, color=COLORS["F"], label="kept after forward")
    _label_bars(mem, bars, [f"{r['activation_ratio']:.2f}x" for r in rows])
    if has_peak:
        mem.bar([i + width / 2 for i in x], [r["peak_bytes"] / 2**20 for r in rows], width, color=COLORS["I"],
                label="peak over fwd+bwd")
    mem.set_xticks(list(x), modes, fontsize=8)
    mem.set_ylabel("MiB")
    mem.set_title("activation memory (ratio to none)", fontsize=9, loc="left")
    mem.legend(fontsize=7, frameon=False)
    bars = step.bar(list(x), [r["step_ms"] for r in rows], 0.6, color=COLORS["B"])
    _label_bars(step, bars, [f"{r['time_ratio']:.2f}x" for r in rows])
    step.set_xticks(list(x), modes, fontsize=8)
    step.set_ylabel("ms per step (fwd + bwd + AdamW)")
    step.set_title("step time (median of per-round ratios to none)", fontsize=9, loc="left")
    batch = "x".join(map(str, result.get("batch", [])))
    fig.suptitle(f"recompute: {result.get('model', '')}, batch {batch}", fontsize=10)
    return save(fig, path)


def plot_sharding(result: dict, path) -> Path:
    """Per-rank bytes (parameters + gradients + optimizer state, largest rank) per sharding mode, one panel per N,
    with DDP/N dashed."""
    sizes = list(result["rows"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 3.8), squeeze=False)
    parts = [("params", "parameters", COLORS["F"]), ("grads", "gradients", COLORS["I"]),
             ("optimizer_state", "optimizer state", COLORS["W"])]
    for ax, n in zip(axes[0], sizes):
        rows = result["rows"][n]
        x = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for key, label, color in parts:
            values = [r[key] / 2**20 for r in rows]
            ax.bar(x, values, 0.6, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ddp = next(r["total"] for r in rows if r["sharding"] == "no_shard")
        ax.axhline(ddp / int(n) / 2**20, color="black", linestyle="--", linewidth=0.8, label="DDP / N")
        ax.set_xticks(x, [r["mode"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("MiB per rank (largest rank)")
        ax.set_title(f"N = {n}", fontsize=9, loc="left")
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"sharding: per-rank bytes, {result.get('n_params', 0):,} parameters, AdamW", fontsize=10)
    return save(fig, path)


def plot_mfu(result: dict, path) -> Path:
    """Achieved FLOP/s of the curry_train loop and of a plain loop against the measured fp32 matmul peak."""
    rows = result["rows"]
    peak = result["peak_flops_per_s"]["fp32"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bars = ax.bar([r["loop"] for r in rows], [r["achieved_flops_per_s"] / 1e9 for r in rows], 0.5, color=COLORS["F"])
    _label_bars(ax, bars, [f"MFU {100 * r['mfu']:.1f}%\n{r['tokens_per_s']:,.0f} tok/s" for r in rows])
    ax.axhline(peak / 1e9, color="black", linestyle="--", linewidth=0.8,
               label=f"fp32 torch.mm peak {peak / 1e9:,.1f} GFLOP/s (n={result.get('peak_size')})")
    ax.set_ylim(0, peak / 1e9 * 1.15)
    ax.set_ylabel("model GFLOP/s")
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    ax.set_title(f"MFU: {result.get('model', '')} on {result.get('device', '')}, "
                 f"{result.get('flops_per_step', 0):.3g} FLOPs per step", fontsize=9, loc="left")
    return save(fig, path)
