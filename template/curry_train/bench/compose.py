"""``bench_compose``: composed layouts on one rank grid (``ParallelState``: pp x dp_replicate x dp_shard x cp x tp)
against one process and against ``/plan``.

For each layout (``LAYOUTS``: name, world size, overrides; those whose world size is in ``world_sizes`` run), one
spawned launch (gloo on CPU, one thread per rank) runs ``train`` on the small reference GPT of ``BASE`` for
``steps`` optimizer steps and each rank reports (``run_layouts``):

* what ``parallelize`` made of the model or of each of its pipeline stages (``layout_of``: FSDP2 root?, the mesh
  dims and placements of a block weight, and of an expert bank's under FSDP2);
* the bytes it holds after the last step (``bytes_held``: parameters, gradients and optimizer state, ``DTensor``s
  by their local shard, as ``DistributedOptimizer.memory_report`` counts), the fullest rank's against ``/plan``'s
  ``model_state_bytes`` at fp32 (4 + 4 + 8 bytes per parameter: FSDP2 under bf16 keeps fp32 shards too) over the
  ranks FSDP2 or ZeRO shard over (dp_shard x cp; plain dp for DDP) with ``Shape.rank_params`` (the fullest rank's
  exact parameters);
* the losses, against ``train`` in this process (one thread): the largest relative error over the steps;
* the step time, the median over the steps after the first (the slowest rank's), against one process's.

Prints a markdown table and returns the rows. The numbers are for this machine's CPU cores shared by every rank;
the step-time ratio says what the layout costs here, not what it buys on GPUs.
"""

from __future__ import annotations

import statistics

import torch

from ..distributed import launch
from ..primitives.zero1 import state_bytes

BASE = ["model.n_layer=4", "model.n_embd=32", "model.n_head=4", "train.seq_len=32", "train.batch_size=8",
        "train.warmup_steps=1", "train.progress=false", "train.log_every=0", "data.max_bytes=50000",
        "model.dropout=0.0"]
PP = ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.n_microbatches=2"]
FULL = ["parallel.sharding=full"]
LAYOUTS = [  # (name, world size, overrides)
    ("dp4, FSDP2 full", 4, FULL),
    ("hsdp 2x2", 4, [*FULL, "parallel.dp_replicate=2"]),
    ("pp2 x dp2, FSDP2 full", 4, [*PP, *FULL]),
    ("pp2 x dp2, FSDP2 full + bf16", 4, [*PP, *FULL, "parallel.mixed_precision=bf16"]),
    ("pp2 x dp2, ZeRO-1", 4, [*PP, "parallel.sharding=zero1"]),
    ("tp2 x dp2, FSDP2 full", 4, [*FULL, "parallel.tp=2"]),
    ("tp2 x cp2, FSDP2 full", 4, [*FULL, "parallel.tp=2", "parallel.cp=2"]),
    ("pp2 x cp2, FSDP2 full", 4, [*PP, *FULL, "parallel.cp=2"]),
    ("dp2 x pp2 x tp2, FSDP2 full", 8, [*PP, *FULL, "parallel.tp=2"]),
    ("hsdp 2x2 x tp2", 8, [*FULL, "parallel.tp=2", "parallel.dp_replicate=2"]),
]
KIB = 2**10


def layout_of(model) -> tuple:
    """What ``parallelize`` made: (FSDP2 root?, a block weight's mesh dims, its placements) and, for an expert bank
    under FSDP2, (its mesh's size, placements). FSDP2 on a dim tp already shards shows as ``_StridedShard``
    (``_S(0, 2)``: dp shards of each tp shard)."""
    from torch.distributed.fsdp import FSDPModule

    weight = next((p for n, p in model.named_parameters() if n.endswith("attn.qkv.weight")), None)
    if weight is None:  # a pipeline stage holding no block
        return (isinstance(model, FSDPModule), "no block", ())
    mesh = getattr(weight, "device_mesh", None)
    out = (isinstance(model, FSDPModule), None if mesh is None else mesh.mesh_dim_names,
           tuple(str(pl) for pl in getattr(weight, "placements", ())))
    bank = next((p for n, p in model.named_parameters() if n.endswith("experts.w1")), None)
    if bank is not None and hasattr(bank, "device_mesh"):
        out += (bank.device_mesh.size(), tuple(str(pl) for pl in bank.placements))
    return out


def bytes_held(model, optimizer) -> dict:
    """This rank's bytes of parameters, gradients and optimizer state (``DTensor``s by their local shard)."""
    def nbytes(tensors):
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if t is not None]
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params), "optimizer_state": state_bytes(optimizer)}


def run_layouts(rank, world_size, runs: dict, base=BASE) -> dict:
    """``launch`` target: ``train`` each of ``runs`` (name -> overrides after ``base``) in turn; per run
    ``{"history", "layouts" (layout_of, per parallelized module), "bytes" (bytes_held after the last step)}``."""
    from .. import train as driver
    from ..config import load_config

    real, real_loop, seen, held = driver.parallelize, driver.run_training_steps, [], {}

    def spy(*args, **kwargs):
        model, dist_opt = real(*args, **kwargs)
        seen.append(layout_of(model))
        return model, dist_opt

    def loop_spy(model, optimizer, *args, **kwargs):
        history = real_loop(model, optimizer, *args, **kwargs)
        held.update(bytes_held(model, optimizer))  # after the last step: the gradients are still there
        return history

    driver.parallelize, driver.run_training_steps = spy, loop_spy
    try:
        out = {}
        for name, overrides in runs.items():
            seen.clear()
            held.clear()
            history = driver.train(load_config([*base, *overrides]))
            out[name] = {"history": history, "layouts": list(seen), "bytes": dict(held)}
        return out
    finally:
        driver.parallelize, driver.run_training_steps = real, real_loop


def single_process(overrides, base=BASE) -> list[dict]:
    """``train`` in this process on one thread with the model, data and train settings of ``overrides``."""
    from ..config import load_config
    from ..train import train

    keep = [o for o in overrides if o.startswith(("train.", "data.", "model"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config([*base, *keep]))
    finally:
        torch.set_num_threads(threads)


def predicted_bytes(overrides, world_size: int, base=BASE) -> dict:
    """``/plan``'s per-rank model-state bytes of the fullest rank of this layout (fp32)."""
    from ..config import load_config
    from ..plan import model_state_bytes
    from ..plan_inputs import Shape
    from ..primitives.distributed_optimizer import normalize_sharding
    from ..primitives.parallel_state import ParallelState

    cfg = load_config([*base, *overrides])
    p = cfg.parallel
    sizes = ParallelState.sizes_from_config(p, world_size)
    _, shard = ParallelState.resolve_data_parallel(sizes["dp"], p.dp_replicate, p.dp_shard)
    sharding = normalize_sharding(p.sharding)
    over = shard * sizes["cp"] if sharding != "no_shard" else sizes["dp"]
    shape = Shape.from_model_config(cfg.model, seq=cfg.train.seq_len)
    return model_state_bytes(shape.params, over, sharding, "fp32", sizes["tp"], sizes["pp"], shape.expert_params,
                             p.ep, rank_params=shape.rank_params(sizes["tp"], sizes["pp"]))


def _step_seconds(history) -> float:
    return statistics.median(h["tokens"] / h["tokens_per_s"] for h in history[1:])


def bench_compose(cfg, world_sizes=(4, 8), steps: int = 4, layouts=None, names=None) -> dict:
    """The table of the module docstring for the ``LAYOUTS`` (or ``layouts``) whose world size is in
    ``world_sizes`` (and, given ``names``, whose name is one of them: ``--quick`` runs three); returns
    ``{"rows": [...]}``. ``cfg`` is unused (the layouts train the small GPT of ``BASE``)."""
    base = [*BASE, f"train.steps={steps}"]
    known = {n for n, _, _ in (layouts or LAYOUTS)}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise ValueError(f"bench compose: no layout named {unknown}; layouts: {sorted(known)}")
    chosen = [(n, ws, o) for n, ws, o in (layouts or LAYOUTS)
              if ws in tuple(world_sizes) and (names is None or n in names)]
    if names is not None:
        print(f"reduced run (--quick): {len(chosen)} of {len(layouts or LAYOUTS)} layouts; "
              "`bench compose` without --quick runs every one")
    single = {}
    rows = []
    print(f"composed layouts vs one process (1 thread), the small GPT ({' '.join(BASE[:4])}), {steps} steps, fp32 "
          "unless named; bytes: the fullest rank after the last step vs /plan (fp32); step: median after the first")
    print()
    print("| layout | ranks | FSDP2 | block weight mesh, placements | params KiB (plan) | grads KiB (plan) | "
          "optimizer KiB (plan) | total / plan | loss rel err | step ms | / 1 process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ws in sorted({ws for _, ws, _ in chosen}):
        runs = {n: o for n, w, o in chosen if w == ws}
        ranks = launch(run_layouts, ws, runs, base, timeout=900)
        for name, overrides in runs.items():
            key = tuple(o for o in overrides if o.startswith(("train.", "data.", "model")))
            if key not in single:
                single[key] = single_process(overrides, base)
            one = single[key]
            per = [r[name] for r in ranks]
            fullest = max((r["bytes"] for r in per), key=lambda b: sum(b.values()))
            plan = predicted_bytes(overrides, ws, base)
            losses = [h["loss"] for h in per[0]["history"]]
            ref = [h["loss"] for h in one]
            step = max(_step_seconds(r["history"]) for r in per)
            row = {"layout": name, "ranks": ws, "layouts": per[0]["layouts"], "bytes": fullest,
                   "plan": {k: plan[k] for k in ("params", "grads", "optimizer_state", "total")},
                   "total_over_plan": sum(fullest.values()) / plan["total"],
                   "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(losses, ref)),
                   "step_s": step, "step_s_one_process": _step_seconds(one)}
            rows.append(row)
            first = row["layouts"][0]
            print(f"| {name} | {ws} | {'yes' if first[0] else 'no'} | {first[1]}, {first[2]} | "
                  f"{fullest['params'] / KIB:.1f} ({plan['params'] / KIB:.1f}) | "
                  f"{fullest['grads'] / KIB:.1f} ({plan['grads'] / KIB:.1f}) | "
                  f"{fullest['optimizer_state'] / KIB:.1f} ({plan['optimizer_state'] / KIB:.1f}) | "
                  f"{row['total_over_plan']:.3f} | {row['loss_rel_err']:.1e} | {1000 * step:.0f} | "
                  f"{step / row['step_s_one_process']:.2f} |")
    return {"rows": rows, "steps": steps}
