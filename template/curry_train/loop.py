"""The training loop: plain, nanoGPT-style, with gradient accumulation done right.

One optimizer step::

    micro = batches.microbatches(step, dp_rank, dp_size, K)     # this rank's K (x, y) pairs
    ga.plan([valid tokens of each y], dp_group)                 # one all-reduce: global token count
    for i, (x, y) in enumerate(micro):
        with ga.sync_context(model, i):                         # no_sync / no reduce-scatter unless last
            loss_sum, n = token_loss(model(x), y)
            ga.backward_loss(loss_sum, n, i).backward()         # sum / loss_divisor
    clip, optimizer.step(), scheduler.step()

Everything distributed (DDP, FSDP2, pipeline) hides behind ``model`` and ``forward_backward``; this file
never asks which one it got.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .model import IGNORE_INDEX, token_loss
from .primitives import GradientAccumulation


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), **kwargs):
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or 1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_lr_ratio)
    )


def accumulate_gradients(model, microbatches, ga: GradientAccumulation, dp_group=None):
    """Forward + backward of one optimizer step's micro-batches. Returns (summed token loss, local valid tokens)."""
    ga.plan([(y != IGNORE_INDEX).sum() for _, y in microbatches], group=dp_group)
    loss_total = torch.zeros((), dtype=torch.float64)
    n_total = 0
    for i, (x, y) in enumerate(microbatches):
        if ga.train_step_kwargs(i)["zero_grad"]:
            model.zero_grad(set_to_none=True)
        with ga.sync_context(model, i):
            loss_sum, n_valid = token_loss(model(x), y)
            ga.backward_loss(loss_sum, n_valid, i).backward()
        loss_total += loss_sum.detach().double().cpu()
        n_total += int(n_valid)
    return loss_total, n_total


def _global_mean_loss(loss_sum: torch.Tensor, n_tokens: int, dp_group, device) -> tuple[float, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return loss_sum.item() / max(n_tokens, 1), n_tokens
    t = torch.tensor([loss_sum.item(), float(n_tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=dp_group)
    return t[0].item() / max(t[1].item(), 1.0), int(t[1].item())


def grad_norm_and_clip(model, max_norm: float) -> float:
    """Global gradient L2 norm (before clipping); clips to ``max_norm`` when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def run_training_steps(
    model,
    optimizer,
    scheduler,
    batches,
    ga: GradientAccumulation,
    steps: int,
    *,
    start_step: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
    dp_group=None,
    device: str | torch.device = "cpu",
    grad_clip: float = 1.0,
    log_every: int = 10,
    progress: bool = True,
    forward_backward=accumulate_gradients,
    clip_grad_norm=grad_norm_and_clip,
    on_step=None,
) -> list[dict]:
    """Train from ``start_step`` up to ``steps``; returns one metrics dict per step.

    Metrics: ``step``, ``loss`` (mean token loss of the global batch), ``lr``, ``grad_norm``,
    ``tokens`` (valid tokens in the global batch) and ``tokens_per_s``. ``on_step(step, metrics)`` runs after
    each optimizer step (checkpointing hooks in here). ``forward_backward`` and ``clip_grad_norm(model, max_norm)
    -> pre-clip global norm`` are the extension points a pipeline-parallel run replaces.
    """
    model.train()
    history = []
    bar = tqdm(range(start_step, steps), desc="train", disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        micro = [
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            for x, y in batches.microbatches(step, dp_rank, dp_size, ga.steps)
        ]
        loss_sum, n_tokens = forward_backward(model, micro, ga, dp_group)
        norm = clip_grad_norm(model, grad_clip)
        optimizer.step()
        scheduler.step()
        loss, global_tokens = _global_mean_loss(loss_sum, n_tokens, dp_group, device)
        dt = time.perf_counter() - t0
        metrics = {
            "step": step,
            "loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": norm,
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / dt,
        }
        history.append(metrics)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            tqdm.write(
                f"step {step:5d} | loss {loss:.4f} | lr {metrics['lr']:.2e} | grad norm {norm:.3f} | "
                f"{metrics['tokens_per_s']:.0f} tok/s"
            )
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    return history
