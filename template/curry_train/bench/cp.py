"""``bench_cp``: context parallelism (ring attention) against full attention in one process, per rank.

For each ``cp`` in ``cp_sizes``, ``launch`` ``cp`` gloo ranks (one thread each); for each sequence length ``N``
every rank runs causal ``ring_attention`` on its load-balanced shard (``B x H x N/cp x D``, fp32) and the parent
process runs ``F.scaled_dot_product_attention(is_causal=True)`` on the whole sequence (one thread). Per setting:

* **saved**: bytes kept for backward by one attention forward (``saved_tensors_hooks``, unique storages: q, k, v,
  out, lse for both), ring per rank against full; the ideal ratio is ``1/cp``;
* **sent**: bytes one rank sent in one ring forward (``track_communication``) against the formula
  ``(cp-1) * 2*B*H_kv*(N/cp)*D * 4`` (``ring_bytes_per_forward``);
* **fwd+bwd**: median over ``repeats`` (after one warm-up) of one forward + backward, the slowest rank per
  repeat for the ring (communication included), with each of its block kernels: ``flash_cpu`` (the default on CPU,
  PyTorch's fused kernel) and ``math`` (fp32 matmuls, one ``B*H*(N/cp)^2`` score block materialised at a time).

Exactness is the tests' job (``tests/primitives/test_context_parallel_standalone.py``); this prints what it costs.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import launch
from ..primitives.context_parallel import ring_attention, ring_bytes_per_forward, shard_sequence, track_communication

MIB = 2**20


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """``(fn(), bytes)``: the bytes of the unique storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _inputs(n: int, heads: int, head_dim: int, batch: int):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(batch, heads, n, head_dim, generator=g) for _ in range(4)]  # q, k, v, dout


def _fwd_bwd_seconds(fn, dout, repeats: int, sync=None) -> list[float]:
    times = []
    for i in range(repeats + 1):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn().backward(dout)
        if i:  # the first one is the warm-up
            times.append(time.perf_counter() - t0)
    return times


def _cp_rank(rank, ws, seq_lens, heads, head_dim, batch, repeats):
    out = {}
    for n in seq_lens:
        q, k, v, dout = (shard_sequence(t, rank, ws, dim=2) for t in _inputs(n, heads, head_dim, batch))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with track_communication() as sent:
            o, saved = saved_bytes(lambda: ring_attention(q, k, v, None))
        del o
        out[n] = {"saved": saved, "sent": sent["sent_bytes"], "messages": sent["messages"]}
        for kernel in ("flash_cpu", "math"):
            out[n][kernel] = _fwd_bwd_seconds(lambda: ring_attention(q, k, v, None, kernel=kernel), dout, repeats,
                                              dist.barrier)
    return out


def bench_cp(cfg, seq_lens=(256, 512, 1024), cp_sizes=(2,), heads=4, head_dim=32, batch=1, repeats=5) -> dict:
    """Ring attention per rank vs full SDPA in one process (see the module docstring); prints a markdown table and
    returns ``{"rows": [...]}``, one row per (cp, N). ``cfg`` is unused (the signature every bench shares)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        full = {}
        for n in seq_lens:
            q, k, v, dout = _inputs(n, heads, head_dim, batch)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            _, saved = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            times = _fwd_bwd_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dout, repeats)
            full[n] = {"saved": saved, "seconds": statistics.median(times)}
    finally:
        torch.set_num_threads(threads)
    rows = []
    print(f"causal attention, B={batch}, H={heads}, D={head_dim}, fp32, CPU; ring attention on cp gloo ranks "
          f"(1 thread each) vs full SDPA in one process (1 thread); time: median of {repeats} fwd+bwd")
    print()
    print("| cp | N | saved full | saved ring/rank | ratio | 1/cp | sent/rank fwd | formula | fwd+bwd full "
          "| ring flash_cpu | ring math | flash_cpu/full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cp in cp_sizes:
        ranks = launch(_cp_rank, cp, tuple(seq_lens), heads, head_dim, batch, repeats, timeout=300)
        for n in seq_lens:
            per = [r[n] for r in ranks]
            ring = {kernel: statistics.median(max(ts) for ts in zip(*(p[kernel] for p in per)))  # slowest rank
                    for kernel in ("flash_cpu", "math")}
            row = {
                "cp": cp, "seq_len": n,
                "saved_full": full[n]["saved"], "saved_ring": max(p["saved"] for p in per),
                "sent_ring": max(p["sent"] for p in per),
                "sent_formula": ring_bytes_per_forward(batch, heads, n // cp, head_dim, cp),
                "messages": max(p["messages"] for p in per),
                "seconds_full": full[n]["seconds"], "seconds_ring": ring["flash_cpu"],
                "seconds_ring_math": ring["math"],
            }
            row["saved_ratio"] = row["saved_ring"] / row["saved_full"]
            rows.append(row)
            print(f"| {cp} | {n} | {row['saved_full'] / MIB:.3f} MiB | {row['saved_ring'] / MIB:.3f} MiB | "
                  f"{row['saved_ratio']:.3f} | {1 / cp:.3f} | {row['sent_ring'] / MIB:.3f} MiB | "
                  f"{row['sent_formula'] / MIB:.3f} MiB | {1000 * row['seconds_full']:.1f} ms | "
                  f"{1000 * ring['flash_cpu']:.1f} ms | {1000 * ring['math']:.1f} ms | "
                  f"{ring['flash_cpu'] / row['seconds_full']:.2f} |")
    return {"rows": rows, "batch": batch, "heads": heads, "head_dim": head_dim, "repeats": repeats}
