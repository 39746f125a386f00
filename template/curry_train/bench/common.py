"""Helpers every bench shares: the configured model and batches, one accumulated step, a flat gradient,
a quiet stderr for the profiler."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch

from ..data import build_batches, seed_everything
from ..loop import accumulate_gradients
from ..model import GPT, GPTConfig
from ..primitives import GradientAccumulation

MIB = 2**20


def run_accumulated_step(model, optimizer, microbatches, ga: GradientAccumulation, grad_clip: float = 0.0):
    """One optimizer step over ``microbatches`` with gradient accumulation; returns the mean token loss."""
    loss_sum, n_tokens = accumulate_gradients(model, microbatches, ga)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss_sum.item() / n_tokens


def build_model_and_batches(cfg):
    """The configured GPT, seeded as ``train`` seeds it, and the configured training batches."""
    seed_everything(cfg.seed)
    return GPT(GPTConfig.from_config(cfg.model)), build_batches(cfg)


def grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])



@contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C++ writes bypass ``sys.stderr``); restored even on error."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
