"""``python -m curry_train bench pipeline``: every pipeline schedule, simulated and measured, side by side.

For each kind at p pipeline ranks, p in ``bench.world_sizes`` (null = from the CPU cores: 2 and 4 on >= 4 cores,
``machine.world_sizes``), spawned gloo ranks on CPU even where GPUs are (the measured timeline is host time around
each stage call, which on a GPU would time kernel launches, not kernels); v = 2 stages per rank for the multi-stage
kinds) and m = 8 micro-batches, on the configured GPT deepened to ``n_layer = 8`` blocks (divisible by every
p x v used) -- or the user's ``model._target_`` as built, split by ``model.split_model`` (a kind whose stage count
does not divide its blocks is skipped; a model ``split_model`` cannot split, or a ``train.loss``, skips the bench
with one line) -- and a global batch of ``bench.pipeline_batch_size x train.seq_len`` tokens of the configured data
(default 64 rows: 8 per micro-batch, so a stage call computes long enough that the fixed cost of a gloo
send/recv and of the schedule's Python is a small part of it; with 2 rows per micro-batch it is not, and the
idle time is mostly those fixed costs, not the schedule's bubble):

* ``analytic``: closed form, ``(p-1)/(m+p-1)`` for GPipe/1F1B, ``(p-1)/(v*m+p-1)`` interleaved/looped BFS;
* ``simulated``: ``primitives.pipeline.sim.simulate`` with F=1, B=2 (I=W=1);
* ``sim@measured``: the same simulator fed the per-stage mean F/B/I/W durations measured in the run (it sees
  stage imbalance, e.g. the embedding and head stages) and the measured one-way time of one activation
  send/recv between ranks (``p2p_latency``, added to every cross-rank dependency);
* ``measured``: idle fraction of the real run, ``1 - busy / makespan`` averaged over ranks, where busy is the
  time inside stage forward (+ loss) / backward calls; median over ``steps`` timed steps after one warm-up;
* ``step ms``: wall time of ``train_step`` (max over ranks), median.

Row ``KIND-torch`` is KIND with PyTorch's own receive order (``early_recv=False``: ``ScheduleGPipe``,
``Schedule1F1B`` and the multi-stage classes as they are), which posts most receives only when the micro-batch is
due; row ``KIND`` is what ``PipelineSchedule`` runs (receives posted early: ``gpipe_early_recv``, ``early_recv``).
Columns ``wait``, ``psend``, ``precv``, ``other`` split the measured idle fraction: time inside waits on
sends/receives, inside posting sends, inside posting receives, and the rest (the schedule's own Python between
stage calls; per lowered action on a MISS line).

Target: every kind, measured within 0.05 of the simulator run on this run's stage costs (``sim@meas``: the
first stage carries the embedding, the last the head and loss, so uniform F=1, B=2 is not what ran).
It is judged only where every rank has a core of its own (p <= cores): with more ranks than cores, busy
intervals stretch while a rank waits for a core, and the comparison says nothing ("n/a").
Writes ``timeline-{kind}-p{p}-m{m}.png`` (simulated above measured) into ``out_dir`` (``bench`` passes its run
folder; default ``bench.out_dir``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ..data import build_batches
from ..distributed import launch
from ..model import GPT, IGNORE_INDEX, GPTConfig, split_model, token_loss
from ..primitives.blocks import find_blocks
from ..primitives.model_io import logits_of
from ..user_model import build_model, model_name, user_target
from ..primitives.pipeline import PipelineSchedule
from ..primitives.pipeline.sim import (
    KINDS, Event, Timeline, analytic_bubble, check_schedule, default_stages_per_rank, simulate,
)
from .machine import cpu_cores, world_sizes
from .plots import plot_timeline

TARGET = 0.05
# row -> (kind, PipelineSchedule options): PyTorch's own receive order next to every kind's early-receive order
REFERENCE_ROWS = {f"{kind}-torch": (kind, {"early_recv": False}) for kind in KINDS}


def row_schedule(row: str) -> tuple[str, dict]:
    """``(kind, PipelineSchedule options)`` of a bench row: a kind itself, or one of ``REFERENCE_ROWS``."""
    return REFERENCE_ROWS.get(row, (row, {}))


def _stage_costs(timeline: Timeline, n_stages: int) -> dict:
    """Per-stage mean durations for ``simulate``: f, b (= B, or I + W when backward is split) and w."""
    def mean(stage, kind):
        d = [e.end - e.start for e in timeline.events if e.stage == stage and e.kind == kind]
        return sum(d) / len(d) if d else None

    f, b, w = [], [], []
    for s in range(n_stages):
        f.append(mean(s, "F") or 0.0)
        full, i, wt = mean(s, "B"), mean(s, "I"), mean(s, "W")
        b.append(full if full is not None else (i or 0.0) + (wt or 0.0))
        w.append(wt if wt is not None else b[-1] / 2)
    return {"f": f, "b": b, "w": w}


def _allowed(kind: str, p: int, m: int, n_layer: int, quiet: bool = False) -> bool:
    say = (lambda _: None) if quiet else print
    try:
        check_schedule(kind, p, m)
    except ValueError as e:
        say(f"  skipping {kind} at p={p}: {e}")
        return False
    stages = p * default_stages_per_rank(kind)
    if n_layer % stages:
        say(f"  skipping {kind} at p={p}: {n_layer} blocks do not split evenly over {stages} stages")
        return False
    return True


def check_pipeline_sizes(pp_sizes, kinds, m: int, n_layer: int) -> None:
    """One ``ValueError`` line naming ``bench.world_sizes`` when some p runs none of ``kinds`` (every rank needs
    whole stages of blocks, 1F1B and DualPipeV enough micro-batches); names the sizes that do run."""
    for p in pp_sizes:
        if not any(_allowed(k, p, m, n_layer, quiet=True) for k in kinds):
            ok = [q for q in range(2, max(pp_sizes) + 1) if any(_allowed(k, q, m, n_layer, quiet=True) for k in kinds)]
            raise ValueError(f"bench.world_sizes: p={p} runs no pipeline schedule with {n_layer} blocks and m={m} "
                             f"micro-batches (each stage needs whole blocks); p that run: "
                             f"{', '.join(map(str, ok)) or 'none'}")


def _pipeline_model(cfg: dict, n_layer: int):
    """The model the bench splits: the configured GPT with ``n_layer`` blocks, or the user's model as built."""
    torch.manual_seed(0)  # every rank builds the same weights (tied copies start equal)
    if user_target(cfg["model"]) is not None:
        return build_model(OmegaConf.create(cfg))
    shape = {k: v for k, v in cfg["model"].items() if k not in ("name", "init_from")}
    return GPT(GPTConfig(**{**shape, "n_layer": n_layer}))


def _activation_shape(cfg: dict, n_layer: int, x: torch.Tensor) -> tuple:
    """Shape of what the first of two stages sends to the next for one micro-batch ``x`` (for ``p2p_latency``)."""
    with torch.no_grad():
        out = split_model(_pipeline_model(cfg, n_layer), 2)[0](x)
    return tuple((out if isinstance(out, torch.Tensor) else logits_of(out)).shape)


def p2p_latency(activation: torch.Tensor, repeats: int = 20) -> float:
    """One-way time of a blocking send/recv of ``activation`` between pipeline neighbours (ranks 0 and 1):
    median of ping-pong round trips / 2. Called on every rank; ranks other than 0 and 1 only take part in the
    final broadcast."""
    rank, times = dist.get_rank(), []
    buf = activation.clone()
    for _ in range(repeats + 2):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - t0) / 2)
    latency = torch.tensor([statistics.median(times[2:])])
    dist.broadcast(latency, 0)
    return latency.item()


def _run_kinds(rank, world_size, kinds, m, cfg, n_layer, act_shape, batch, steps):
    x, y = batch
    out = {"_comm": p2p_latency(torch.zeros(act_shape))}
    for row in kinds:
        kind, options = row_schedule(row)
        v = default_stages_per_rank(kind)
        stages = split_model(_pipeline_model(cfg, n_layer), world_size * v)
        n_valid = (y != IGNORE_INDEX).sum()
        sched = PipelineSchedule(kind, m, stages, None, lambda o, t: token_loss(logits_of(o), t)[0] / n_valid,
                                 record=True, device="cpu", **options)
        order = getattr(sched.schedule, "pipeline_order_with_comms", None)  # runtime kinds: the lowered list
        n_actions = len(order[sched.rank]) if order else None
        records = []
        for step in range(steps + 1):  # step 0 warms up (shape inference, allocator)
            for p in sched.parameters():
                p.grad = None
            t0 = time.perf_counter()
            sched.train_step(x, y)
            wall = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)
            timeline = sched.measured_timeline()
            if step:
                records.append((timeline.bubble_fraction, wall.item(), timeline))
        records.sort(key=lambda r: r[0])
        idle, _, timeline = records[len(records) // 2]
        span = sched.p * timeline.makespan
        actions = [None] * world_size
        dist.all_gather_object(actions, n_actions)
        out[row] = {"v": v, "measured": idle, "step_ms": 1e3 * statistics.median(r[1] for r in records),
                    "events": [[e.rank, e.stage, e.kind, e.mb, e.start, e.end] for e in timeline.events],
                    "p2p_wait": sum(timeline.meta["p2p_wait_s"]) / span,
                    "p2p_post_send": sum(timeline.meta["p2p_post_send_s"]) / span,
                    "p2p_post_recv": sum(timeline.meta["p2p_post_recv_s"]) / span,
                    "span_s": span, "actions": None if None in actions else sum(actions)}
    return out if rank == 0 else None


def bench_pipeline(cfg, pp_sizes=None, kinds=tuple(KINDS), m: int = 8, n_layer: int = 8, steps: int = 5,
                   out_dir=None) -> dict:
    """``n_layer``: the GPT's depth here; a user's model keeps its own (its blocks, ``primitives.blocks``)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    batches = build_batches(cfg)
    batches.batch_size = cfg.bench.pipeline_batch_size
    batch = batches.global_batch(0)
    name = model_name(cfg)
    try:
        if cfg.train.loss is not None:
            raise ValueError("train.loss is set, and pipeline stages train on the token loss of the last stage's "
                             "logits")
        if user_target(cfg.model) is not None:
            n_layer = len(find_blocks(_pipeline_model(plain, n_layer)))
        act_shape = _activation_shape(plain, n_layer, batch[0][: batch[0].shape[0] // m])
    except (ValueError, TypeError) as e:
        print(f"pipeline: skipped for {name}: {' '.join(str(e).split())}")
        return {"skipped": str(e), "model": name}
    out_dir = Path(out_dir if out_dir is not None else cfg.bench.out_dir)
    pp_sizes = pp_sizes if pp_sizes is not None else world_sizes(cfg, "pipeline")
    check_pipeline_sizes(pp_sizes, kinds, m, n_layer)
    rows = []
    for p in pp_sizes:
        runnable = [row for k in kinds if _allowed(k, p, m, n_layer)
                    for row in (k, *(ref for ref, (kind, _) in REFERENCE_ROWS.items() if kind == k))]
        if not runnable:
            continue
        measured = launch(_run_kinds, p, runnable, m, plain, n_layer, act_shape, batch, steps, timeout=600)[0]
        comm, timelines = measured["_comm"], {}
        for row in runnable:
            r, kind = measured[row], row_schedule(row)[0]
            v, n_stages = r["v"], p * r["v"]
            timeline = Timeline([Event(*e) for e in r["events"]], p,
                                label=f"{row} measured (p={p}, m={m}, v={v})")
            sim = simulate(kind, p, m, v)
            sim_measured = simulate(kind, p, m, v, comm=comm, **_stage_costs(timeline, n_stages))
            timelines[row] = timeline
            panels, title = [sim, timeline], f"{row}: simulated (F=1, B=2) vs measured"
            if row in REFERENCE_ROWS:  # ours between the simulation and PyTorch's, to see where the waits went
                panels, title = [sim, timelines[kind], timeline], f"{kind} vs {row}: simulated and measured"
            png = plot_timeline(panels, out_dir / f"timeline-{row}-p{p}-m{m}.png",
                                title=f"{title}, {name}, {n_layer} blocks")
            r["p2p_post"] = r["p2p_post_send"] + r["p2p_post_recv"]
            other = r["measured"] - r["p2p_wait"] - r["p2p_post"]
            rows.append({"kind": row, "p": p, "v": v, "m": m, "analytic": analytic_bubble(kind, p, m, v),
                         "simulated": sim.bubble_fraction, "sim_at_measured": sim_measured.bubble_fraction,
                         "measured": r["measured"], "step_ms": r["step_ms"], "p2p_ms": 1e3 * comm, "png": str(png),
                         "p2p_wait": r["p2p_wait"], "p2p_post": r["p2p_post"], "p2p_post_send": r["p2p_post_send"],
                         "p2p_post_recv": r["p2p_post_recv"], "other": other,
                         "actions": r["actions"],
                         "other_us_per_action": 1e6 * other * r["span_s"] / r["actions"] if r["actions"] else None})
    cores = cpu_cores()
    print(f"pipeline schedules: {name} with {n_layer} blocks, global batch {batches.batch_size}x"
          f"{cfg.train.seq_len}, m={m} micro-batches, gloo on CPU, {cores} cores; median of {steps} steps")
    print(f"  {'kind':15s} {'p':>2s} {'v':>2s} {'analytic':>9s} {'simulated':>10s} {'sim@meas':>9s} {'measured':>9s} "
          f"{'=wait':>6s} {'+psend':>6s} {'+precv':>6s} {'+other':>7s} {'step ms':>8s}  target")
    for r in rows:
        analytic = f"{r['analytic']:.3f}" if r["analytic"] is not None else "-"
        gap = abs(r["measured"] - r["sim_at_measured"])
        verdict = f"|meas-sim@meas| {gap:.3f} "
        if r["kind"] in REFERENCE_ROWS:
            verdict += "(reference: PyTorch's receive order)"
        elif r["p"] <= (cores or 1):
            r["target_met"] = gap <= TARGET
            verdict += "PASS" if r["target_met"] else "MISS"
        else:
            r["target_met"] = None
            verdict += f"n/a ({r['p']} ranks > {cores} cores)"
        print(f"  {r['kind']:15s} {r['p']:2d} {r['v']:2d} {analytic:>9s} {r['simulated']:10.3f} "
              f"{r['sim_at_measured']:9.3f} "
              f"{r['measured']:9.3f} {r['p2p_wait']:6.3f} {r['p2p_post_send']:6.3f} {r['p2p_post_recv']:6.3f} "
              f"{r['other']:7.3f} {r['step_ms']:8.1f}  "
              f"{verdict}")
    print("  measured idle = wait (inside waits on sends/receives) + psend/precv (posting sends/receives) + other "
          "(the schedule's own Python between stage calls), each a fraction of p x makespan")
    for r in rows:
        if r.get("target_met") is False:
            per_action = (f"; other = {r['other_us_per_action']:.0f} us per action over its {r['actions']} lowered "
                          "actions" if r["other_us_per_action"] is not None else "")
            print(f"  {r['kind']} p={r['p']} MISS: measured {r['measured']:.3f} vs sim@meas "
                  f"{r['sim_at_measured']:.3f}: "
                  f"waits {r['p2p_wait']:.3f}, posting sends {r['p2p_post_send']:.3f} and receives "
                  f"{r['p2p_post_recv']:.3f}, other {r['other']:.3f}{per_action}")
    for p in pp_sizes:
        p2p = next((r["p2p_ms"] for r in rows if r["p"] == p), None)
        if p2p is not None:
            print(f"  p={p}: one activation send/recv between ranks took {p2p:.2f} ms (in sim@meas)")
    print(f"  timelines: {out_dir}/timeline-KIND-pP-m{m}.png")
    return {"m": m, "n_layer": n_layer, "cores": cores, "target": TARGET, "rows": rows}
