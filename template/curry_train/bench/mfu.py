"""``python -m curry_train bench mfu``: model FLOPs utilisation of a training step, against a peak measured here.

MFU = (model FLOPs per step / seconds per step) / peak FLOP/s, three numbers measured in one run on one device:

* **Model FLOPs per step**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the
  configured model (``user_model``: the reference GPT or ``model._target_``, with its ``train.loss``) on the
  configured global batch (``train.batch_size x train.seq_len`` tokens). Model FLOPs are what the model needs, not
  what ran: no recompute, no optimizer step. Matmuls count ``2·m·n·k`` (torch's formulas: ``mm``, ``addmm``'s
  product without its bias, ``bmm``, convolutions). Attention through ``scaled_dot_product_attention`` is counted
  by ``attention_flops`` (``ATTENTION_OPS``): ``QK^T`` and ``AV``, ``2·B·H·Tq·Tk·(d_qk + d_v)`` forward, twice that
  backward, **halved when the call is causal**. That is the convention of ``GPT.flops_per_token`` and of PaLM's
  appendix B, and it replaces torch's own formulas, which on torch 2.13 count a CUDA SDPA in full (causal or not,
  plus the backward's recompute of the scores: 3.5x the forward) and a CPU SDPA not at all (no formula is
  registered for ``_scaled_dot_product_flash_attention_for_cpu``). Attention written as ``matmul``/``bmm`` is
  counted as the matmuls that run (masked scores included). Not counted: element-wise ops, norms, softmax, the
  loss, embedding lookups.
* **Check** (a model with ``flops_per_token(seq_len)``, e.g. the reference GPT): its formula ``6·N + 6·L·d·T`` per
  token counts 6 FLOPs for every non-embedding parameter, biases and norm gains included, which run no matmul. So
  ``counted == formula·tokens - 6·(1-D parameters)·tokens`` exactly for the GPT (``formula_check``).
* **Peak**: ``2·n³ / seconds`` of the fastest timed ``torch.mm`` of two ``n x n`` matrices on the bench device
  (``MatmulPeak``: two warm-ups, CUDA synchronised before and after each), sampled ``peak_repeats`` times first
  and once more in every timing round, so that a load spike from another process (a shared machine) cannot lower
  it while the steps run quiet: fp32 (the dtype the step runs in, which MFU divides by), and bf16 too on CUDA
  (``mfu_bf16_peak``: the ceiling a bf16 step would be held to). With ``mixed_precision="bf16"`` (``make
  gpu-check``) the steps run under ``torch.autocast(bf16)`` and MFU divides by the bf16 peak, measured on any device.
  ``n`` (``peak_size``): 2048 on CPU, 8192 on CUDA (halved until three matrices fit in a quarter of free memory).
* **Step time**: (a) the curry_train loop (``run_training_steps``: gradient-accumulation planning at K=1, token-
  normalised loss, clipping, AdamW, scheduler, metrics) and (b) a plain PyTorch loop (loss, ``backward``, clip,
  ``step``) on copies of the same model, ``bench.burn_in`` steps each, then ``repeats`` (default ``bench.repeats``)
  interleaved rounds of ``bench.steps_per_repeat`` steps; step time = median over rounds; tokens/s = tokens per
  step / step time.

No pass/fail target: MFU depends on the model's shapes (small matmuls run far below a large matmul's peak).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..loop import run_training_steps
from ..primitives import GradientAccumulation
from ..primitives.distributed_optimizer import autocast_forward
from ..primitives.model_io import forward_loss_sum
from ..user_model import model_name
from .common import build_model_and_batches, interleaved_rounds, training_sides, user_loss
from .machine import bench_device, synchronize

# scaled_dot_product_attention's kernels -> True for a backward
ATTENTION_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu": False,
    "_scaled_dot_product_flash_attention_for_cpu_backward": True,
    "_scaled_dot_product_flash_attention": False,
    "_scaled_dot_product_flash_attention_backward": True,
    "_scaled_dot_product_efficient_attention": False,
    "_scaled_dot_product_efficient_attention_backward": True,
    "_scaled_dot_product_cudnn_attention": False,
    "_scaled_dot_product_cudnn_attention_backward": True,
}
PEAK_SIZE = {"cpu": 2048, "cuda": 8192}


def attention_flops(query_shape, key_shape, value_shape, is_causal: bool, backward: bool) -> int:
    """Model FLOPs of one attention call: ``2·B·H·Tq·Tk·(d_qk + d_v)`` (``QK^T`` and ``AV``), x2 for the backward
    (``dQ, dK`` and ``dP, dV``), /2 when causal. Shapes are ``(B, H, T, d)``; grouped K/V heads broadcast to H."""
    b, h, tq, d = query_shape
    tk, dv = key_shape[-2], value_shape[-1]
    flops = 2 * b * h * tq * tk * (d + dv) * (2 if backward else 1)
    return flops // 2 if is_causal else flops


def _attention_formula(op, backward: bool):
    names = [a.name for a in op.default._schema.arguments]

    def count(*args, out_val=None, **kwargs):
        def arg(name, default=None):
            i = names.index(name)
            return args[i] if i < len(args) else kwargs.get(name, default)

        return attention_flops(arg("query").shape, arg("key").shape, arg("value").shape,
                               bool(arg("is_causal", False)), backward)

    count._get_raw = True  # FlopCounterMode passes the tensors (their shapes and the is_causal flag) unchanged
    return count


def attention_mapping() -> dict:
    """``FlopCounterMode(custom_mapping=...)`` entries for the SDPA kernels this torch build has."""
    aten = torch.ops.aten
    return {getattr(aten, name): _attention_formula(getattr(aten, name), backward)
            for name, backward in ATTENTION_OPS.items() if hasattr(aten, name)}


def count_flops(model, batch, loss_fn=forward_loss_sum) -> dict:
    """Model FLOPs of one forward + backward of ``loss_fn(model, batch)`` (the summed loss over its count):
    ``{"total", "by_op": {op name: FLOPs}}``. Gradients are left cleared."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=attention_mapping()) as counter:
        loss_sum, n = loss_fn(model, batch)
        (loss_sum / n).backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op).removeprefix("aten."): int(f) for op, f in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


class MatmulPeak:
    """Two ``n x n`` matrices of ``dtype`` on ``device``: ``sample()`` times one ``torch.mm`` (synchronised on CUDA),
    ``flops_per_s`` = ``2·n³ / fastest sample``. Two untimed warm-ups first."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        g = torch.Generator(device=device).manual_seed(0)
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        self.device, self.n, self.best = device, n, float("inf")
        for _ in range(2):
            torch.mm(self.a, self.b, out=self.out)

    def sample(self) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.best = min(self.best, seconds)
        return seconds

    @property
    def flops_per_s(self) -> float:
        return 2 * self.n**3 / self.best


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` ``torch.mm`` of two ``n x n`` matrices (after two warm-ups)."""
    peak = MatmulPeak(device, dtype, n)
    for _ in range(repeats):
        peak.sample()
    return peak.flops_per_s


def matrix_size(device: torch.device, requested: int | None) -> int:
    """``requested``, or the device's default (``PEAK_SIZE``), halved on CUDA until 3 fp32 matrices take at most a
    quarter of the free memory."""
    n = requested or PEAK_SIZE.get(device.type, PEAK_SIZE["cpu"])
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        while n > 512 and 3 * 4 * n * n > free / 4:
            n //= 2
    return n


def formula_flops(model, seq_len: int, tokens: int) -> dict | None:
    """The model's own ``flops_per_token(seq_len)`` x tokens, and that minus ``6·(1-D parameters)·tokens`` (what the
    counter sees of a ``6N`` formula); None when the model has no such method."""
    fpt = getattr(model, "flops_per_token", None)
    if not callable(fpt):
        return None
    try:
        formula = int(fpt(seq_len)) * tokens
    except TypeError:  # a flops_per_token with another signature: not comparable
        return None
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    return {"formula": formula, "vector_params": vectors, "matmul_only": formula - 6 * vectors * tokens}


def _plain_steps(model, optimizer, scheduler, batches, device, start: int, n: int, grad_clip: float, loss_fn) -> None:
    """What a user writes by hand: the mean token loss of the global batch, backward, clip, step."""
    for step in range(start, start + n):
        x, y = batches.global_batch(step)
        loss_sum, n_valid = loss_fn(model, (x.to(device), y.to(device)))
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / n_valid).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()


def bench_mfu(cfg, peak_size: int | None = None, peak_repeats: int = 5, repeats: int | None = None,
              mixed_precision: str | None = None) -> dict:
    """``repeats``: timing rounds (None = ``bench.repeats``); ``peak_size``, ``peak_repeats``: the matmul peak's;
    ``mixed_precision="bf16"``: both loops run their forward under ``torch.autocast(bf16)`` (what
    ``parallel.mixed_precision=bf16`` does without FSDP2) and MFU divides by the bf16 peak, measured on any device."""
    if mixed_precision not in (None, "bf16"):
        raise ValueError(f"bench mfu: mixed_precision must be None (fp32) or 'bf16', got {mixed_precision!r}")
    step_dtype = mixed_precision or "fp32"
    device = bench_device(cfg)
    model, batches = build_model_and_batches(cfg)
    model.to(device)
    custom_loss = user_loss(cfg)
    loss_fn = custom_loss or forward_loss_sum
    t, b = cfg.train, cfg.bench
    repeats = repeats or b.repeats
    x, y = batches.global_batch(0)
    tokens = x.numel()
    counted = count_flops(model, (x.to(device), y.to(device)), loss_fn)
    flops = counted["total"]
    formula = formula_flops(model, t.seq_len, tokens)

    n = matrix_size(device, peak_size)
    dtypes = {"fp32": torch.float32}
    if (device.type == "cuda" and torch.cuda.is_bf16_supported()) or mixed_precision == "bf16":
        dtypes["bf16"] = torch.bfloat16
    peak = {name: MatmulPeak(device, dtype, n) for name, dtype in dtypes.items()}
    for _ in range(peak_repeats):
        for p in peak.values():
            p.sample()

    sides = training_sides(model, cfg)
    if mixed_precision == "bf16":
        for s in sides.values():
            autocast_forward(s["model"], device)
    ga = GradientAccumulation(1)

    def run(name, steps):
        if name == "peak":  # sampled in every round too: a load spike on a shared machine cannot lower the best
            return [p.sample() for p in peak.values()][0]
        s = sides[name]
        synchronize(device)
        t0 = time.perf_counter()
        if name == "curry_train":
            run_training_steps(s["model"], s["opt"], s["sched"], batches, ga, s["step"] + steps, start_step=s["step"],
                               device=device, grad_clip=t.grad_clip, log_every=0, progress=False, loss_fn=custom_loss)
        else:
            _plain_steps(s["model"], s["opt"], s["sched"], batches, device, s["step"], steps, t.grad_clip, loss_fn)
        synchronize(device)
        s["step"] += steps
        return time.perf_counter() - t0

    for name in sides:
        run(name, b.burn_in)
    seconds = interleaved_rounds(lambda name: run(name, b.steps_per_repeat), (*sides, "peak"), repeats)
    peaks = {name: p.flops_per_s for name, p in peak.items()}
    rows = []
    for name in sides:
        step_s = statistics.median(seconds[name]) / b.steps_per_repeat
        row = {"loop": name, "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
               "achieved_flops_per_s": flops / step_s, "mfu": flops / step_s / peaks[step_dtype]}
        if "bf16" in peaks:
            row["mfu_bf16_peak"] = flops / step_s / peaks["bf16"]
        rows.append(row)

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"MFU of {model_name(cfg)}: batch {t.batch_size}x{t.seq_len} = {tokens} tokens per step, {step_dtype}, device "
          f"{device}{threads}; step time: median of {repeats} interleaved rounds of {b.steps_per_repeat} steps")
    print(f"  model FLOPs per step (FlopCounterMode, fwd+bwd, causal attention halved): {flops:.4g}")
    if formula is not None:
        check = flops == formula["matmul_only"]
        print(f"  model's flops_per_token x tokens: {formula['formula']:.4g}; minus 6 x {formula['vector_params']:,} "
              f"1-D params x tokens: {formula['matmul_only']:.4g} ({'equals' if check else 'differs from'} the count)")
    for dtype, flops_s in peaks.items():
        print(f"  peak {dtype}: {flops_s / 1e9:,.1f} GFLOP/s (torch.mm {n}x{n}, best of {peak_repeats + repeats}, one "
              "in every round)")
    print(f"  {'loop':12s} {'step ms':>9s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'MFU':>7s}"
          + (f" {'MFU(bf16 peak)':>14s}" if "bf16" in peaks else ""))
    for r in rows:
        print(f"  {r['loop']:12s} {r['step_ms']:9.2f} {r['tokens_per_s']:10.0f} {r['achieved_flops_per_s'] / 1e9:9.2f} "
              f"{100 * r['mfu']:6.2f}%" + (f" {100 * r['mfu_bf16_peak']:13.2f}%" if "bf16" in peaks else ""))
    return {
        "model": model_name(cfg), "device": str(device), "dtype": step_dtype, "tokens_per_step": tokens,
        "flops_per_step": flops, "flops_by_op": counted["by_op"],
        "flops_formula": formula["formula"] if formula else None,
        "flops_formula_matmul_only": formula["matmul_only"] if formula else None,
        "formula_check": (flops == formula["matmul_only"]) if formula else None,
        "peak_flops_per_s": peaks, "peak_size": n, "peak_repeats": peak_repeats,
        "rows": rows, "round_seconds": seconds,
    }
