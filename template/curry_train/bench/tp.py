"""``bench_tp``: what tensor (and sequence) parallelism buys and costs on the configured model, per tp size.

For each tp size (``tp_sizes``; None = ``machine.world_sizes``: 2 on 2 cores, 2 and 4 on >= 4 cores or GPUs), ``launch``
tp ranks (nccl with a GPU per rank where the bench device is CUDA and there are >= 2 GPUs, else gloo on CPU, one
thread per rank) that all take the same batch (``train.batch_size`` x ``train.seq_len`` of the configured data)
and apply ``primitives.tensor_parallel.apply_tensor_parallel`` without and with sequence parallelism. Each rank
measures:

* parameter bytes it holds (``DTensor.to_local()``), against tp = 1;
* activation bytes kept for backward (``primitives.recompute.activation_memory``: bytes alive when forward returns,
  logits and loss included), against tp = 1;
* the bytes saved for backward inside the norms (``tensor_parallel.norm_saved_bytes``: the region sequence
  parallelism shards; ``1/tp`` of tp = 1's with SP, all of it without);
* the collectives of one forward and one backward, counted with ``torch.distributed.tensor.debug.CommDebugMode``
  (plus the elements each moved: the whole tensor, i.e. an all-gather's output, a reduce-scatter's input), next to
  the formula of the blocks (``tensor_parallel.block_comm``: 2 all-reduces of ``B N d`` per block forward, 2
  backward; with SP 2 all-gathers + 2 reduce-scatters each way); what is left over is the model's ends (an
  untied embedding's and head's collectives; under SP the head's all-gather forward and the split of the
  sequence backward);
* the step time (forward + backward + AdamW; median over ``bench.repeats`` steps after ``bench.burn_in``, each
  step's time the slowest rank's), against tp = 1 run in this process on one thread (CPU) or one GPU: the speedup
  of ``tp`` devices over one.

Prints a markdown table and returns the numbers. A model tensor parallelism cannot shard (``check_tensor_parallel``:
layout, head counts, widths), a tp size that does not fit, or a model trained with its own ``train.loss`` (the bench
runs the token loss on ``model(x)``'s logits) is skipped with one line saying why. Loss parallelism is not measured
(the reference GPT's head is tied).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import Counter

import torch
from omegaconf import OmegaConf

from ..distributed import launch
from ..primitives.model_io import forward_loss_sum
from ..primitives.recompute import activation_memory
from ..primitives.tensor_parallel import (apply_tensor_parallel, block_comm, check_tensor_parallel, describe,
                                          norm_saved_bytes)
from ..user_model import build_model, model_name
from . import machine
from .common import MIB, build_model_and_batches, quiet_stderr

OPS = ("all_reduce", "all_gather", "reduce_scatter")


def _op(func) -> str:
    name = str(getattr(func, "__name__", func)).split(".")[-1]
    return next((op for op in OPS if name.startswith(op)), name)


def _comm_mode():
    """A ``CommDebugMode`` that also adds up the elements of each collective (the larger of input and output)."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._pytree import tree_leaves

    class CommVolume(CommDebugMode):
        def __init__(self):
            super().__init__()
            self.elements = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.get_total_counts()
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.get_total_counts() > before:
                sizes = [t.numel() for t in tree_leaves((args, out)) if isinstance(t, torch.Tensor)]
                self.elements[_op(func._overloadpacket)] += max(sizes, default=0)
            return out

        def summary(self) -> dict:
            counts = Counter()
            for func, n in self.get_comm_counts().items():
                counts[_op(func)] += n
            return {op: (counts[op], self.elements[op]) for op in sorted(counts)}

    return CommVolume()


def _param_bytes(model) -> int:
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def _measure(model, x, y, cfg, device, count_comm: bool) -> dict:
    with quiet_stderr():  # the profiler's USDT lines
        activations = activation_memory(model, (x, y), peak=False)["activation_bytes"]
    out = {"param_bytes": _param_bytes(model), "activation_bytes": activations,
           "norm_bytes": norm_saved_bytes(model, lambda: forward_loss_sum(model, (x, y)))}
    if count_comm:
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CommDebugMode's module tracker: "Full backward hook is firing..."
            forward, backward = _comm_mode(), _comm_mode()
            with forward:
                loss_sum, n = forward_loss_sum(model, (x, y))
            with backward:
                (loss_sum / n).backward()
        out["forward"], out["backward"] = forward.summary(), backward.summary()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    b, seconds = cfg.bench, []
    distributed = torch.distributed.is_initialized()
    for i in range(b.burn_in + b.repeats):
        if distributed:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n = forward_loss_sum(model, (x, y))
        (loss_sum / n).backward()
        optimizer.step()
        machine.synchronize(device)
        if i >= b.burn_in:
            seconds.append(time.perf_counter() - t0)
    out["seconds"] = seconds
    return out


def _tp_rank(rank, tp, cfg, backend="gloo"):
    from torch.distributed.device_mesh import init_device_mesh

    cfg = OmegaConf.create(cfg)  # launched with the plain, resolved dict
    device = machine.rank_device(backend, rank)
    mesh = init_device_mesh(device.type, (tp,))
    results = {}
    for sp in (False, True):
        model, batches = build_model_and_batches(cfg)  # same seed on every rank: same weights
        x, y = (t.to(device) for t in batches.microbatches(0, 0, 1, 1)[0])  # every tp rank: the same rows
        apply_tensor_parallel(model.to(device), mesh, sequence_parallel=sp)
        results[sp] = _measure(model, x, y, cfg, device, count_comm=True)
    return results


def _single(cfg, device) -> dict:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one rank's share, as each tp rank gets
    try:
        model, batches = build_model_and_batches(cfg)
        x, y = (t.to(device) for t in batches.microbatches(0, 0, 1, 1)[0])
        return _measure(model.to(device), x, y, cfg, device, count_comm=False)
    finally:
        torch.set_num_threads(threads)


def ring_elements(op: str, elements: int, tp: int) -> float:
    """Elements one rank sends in a ring collective over a tensor of ``elements``: all-reduce 2 (tp-1)/tp of it,
    all-gather and reduce-scatter (tp-1)/tp (an all-reduce is a reduce-scatter + an all-gather)."""
    return (2 if op == "all_reduce" else 1) * (tp - 1) / tp * elements


def _traffic(parts: dict, tp: int) -> float:
    """Ring elements per rank of ``{"forward"|"backward": {op: (count, elements)}}``; measured elements are totals,
    formula ones per collective, so pass the totals."""
    return sum(ring_elements(op, total, tp) for part in parts.values() for op, (_, total) in part.items())


def _fmt_comm(measured: dict, formula: dict) -> str:
    ops = sorted(set(measured) | set(formula))
    return ", ".join(f"{op} {measured.get(op, (0, 0))[0]}/{formula.get(op, (0, 0))[0]}" for op in ops) or "none"


def bench_tp(cfg, tp_sizes=None) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    backend = machine.rank_backend(cfg)
    tp_sizes = list(tp_sizes) if tp_sizes is not None else machine.world_sizes(cfg)
    name = model_name(cfg)
    if cfg.train.loss is not None:
        reason = "train.loss is set: this bench measures the token loss on the model's logits (model(x) -> logits)"
        print(f"tp: skipped for {name}: {reason}")
        return {"skipped": reason, "model": name}
    model = build_model(cfg)
    try:
        dims = describe(model)
    except ValueError as e:
        print(f"tp: skipped for {name}: {e}")
        return {"skipped": str(e), "model": name}
    B, N, d, n_layer = cfg.train.batch_size, cfg.train.seq_len, dims["d"], dims["n_layer"]
    device = machine.rank_device(backend, 0)
    print(f"tp on {name} ({dims['layout']} layout, {n_layer} blocks, d={d}), batch {B}x{N}, fp32, {backend} ranks "
          f"(one {'GPU' if backend == 'nccl' else 'CPU thread'} each); tp=1 in this process on one "
          f"{'GPU' if backend == 'nccl' else 'thread'}")
    base = _single(cfg, device)
    base_step = statistics.median(base["seconds"])
    rows = [{"tp": 1, "sequence_parallel": False, "param_bytes": base["param_bytes"],
             "activation_bytes": base["activation_bytes"], "param_ratio": 1.0, "activation_ratio": 1.0,
             "norm_bytes": base["norm_bytes"], "norm_ratio": 1.0,
             "forward": {}, "backward": {}, "formula": block_comm(B, N, d, n_layer, 1), "step_ms": 1000 * base_step,
             "speedup": 1.0}]
    skipped = {}
    for tp in tp_sizes:
        try:
            check_tensor_parallel(model, tp, sequence_parallel=True, seq_len=N)
        except ValueError as e:
            print(f"  tp={tp}: skipped: {e}")
            skipped[str(tp)] = str(e)
            continue
        ranks = launch(_tp_rank, tp, plain, backend, timeout=600, backend=backend)
        for sp in (False, True):
            per_rank = [r[sp] for r in ranks]
            steps = [max(ts) for ts in zip(*(r["seconds"] for r in per_rank))]  # a step ends with the slowest rank
            worst = max(per_rank, key=lambda r: r["activation_bytes"])
            step = statistics.median(steps)
            rows.append({
                "tp": tp, "sequence_parallel": sp, "param_bytes": max(r["param_bytes"] for r in per_rank),
                "activation_bytes": worst["activation_bytes"],
                "param_ratio": max(r["param_bytes"] for r in per_rank) / base["param_bytes"],
                "activation_ratio": worst["activation_bytes"] / base["activation_bytes"],
                "norm_bytes": max(r["norm_bytes"] for r in per_rank),
                "norm_ratio": max(r["norm_bytes"] for r in per_rank) / base["norm_bytes"],
                "forward": per_rank[0]["forward"], "backward": per_rank[0]["backward"],
                "formula": block_comm(B, N, d, n_layer, tp, sp), "step_ms": 1000 * step, "speedup": base_step / step,
            })
    print("\n| tp | SP | params/rank MiB | x tp=1 | activations/rank MiB | x tp=1 | norm activations KiB | x tp=1 | "
          "forward collectives "
          "measured/formula | backward measured/formula | traffic/rank MiB measured | formula | step ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        formula_totals = {part: {op: (c, c * e) for op, (c, e) in ops.items()} for part, ops in r["formula"].items()}
        r["traffic_bytes"] = 4 * _traffic({p: r[p] for p in ("forward", "backward")}, r["tp"])  # fp32
        r["formula_traffic_bytes"] = 4 * _traffic(formula_totals, r["tp"])
        print(f"| {r['tp']} | {'on' if r['sequence_parallel'] else 'off'} | {r['param_bytes'] / MIB:.3f} | "
              f"{r['param_ratio']:.3f} | {r['activation_bytes'] / MIB:.2f} | {r['activation_ratio']:.3f} | "
              f"{r['norm_bytes'] / 1024:.1f} | {r['norm_ratio']:.3f} | "
              f"{_fmt_comm(r['forward'], r['formula']['forward'])} | "
              f"{_fmt_comm(r['backward'], r['formula']['backward'])} | {r['traffic_bytes'] / MIB:.2f} | "
              f"{r['formula_traffic_bytes'] / MIB:.2f} | {r['step_ms']:.1f} | {r['speedup']:.2f} |")
    print(f"  formula (blocks only): per block forward 2 all-reduces of B*N*d = {B * N * d:,} elements, 2 backward; "
          "with SP 2 all-gathers + 2 reduce-scatters of the same size each way; traffic = what one rank sends in a "
          "ring (all-reduce 2(tp-1)/tp, the others (tp-1)/tp of the tensor), fp32. Measured minus formula: the model's "
          "ends (head input all-gather under SP forward, the sequence split's all-gather backward; an untied "
          "embedding/head's own collectives). Norm-weight gradients under SP (Partial) are reduced at the optimizer "
          "step, outside this count.")
    return {"model": name, "layout": dims["layout"], "batch": [B, N], "d": d, "n_layer": n_layer, "backend": backend,
            "rows": rows, "skipped": skipped}
