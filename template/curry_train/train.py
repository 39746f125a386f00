"""``python -m curry_train train``: build everything from the Hydra config and run the loop.

Works in one process and under ``torchrun --nproc-per-node N -m curry_train train`` (DDP over gloo on
CPU, nccl on GPU). Every config error is raised before the process group starts.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from . import distributed
from .config import data_parallel_size, to_yaml, validate
from .data import Batches, load_tokens, split
from .loop import build_optimizer, build_scheduler, run_training_steps
from .model import GPT, GPTConfig
from .parallelize import parallelize
from .primitives import GradientAccumulation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but torch.cuda.is_available() is False; use device=cpu or device=auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_batches(cfg) -> Batches:
    tokens = load_tokens(cfg.data.path, cfg.data.max_bytes)
    train_tokens, _ = split(tokens, cfg.data.val_fraction)
    return Batches(
        train_tokens, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed,
        variable_length=cfg.data.variable_length, min_len=cfg.data.min_len,
    )


def train(cfg) -> list[dict]:
    """Run training as configured; returns the per-step metrics (on every rank)."""
    world_size = distributed.env_world_size()
    validate(cfg, world_size)  # before any process group exists
    distributed.init_from_env()
    rank = distributed.rank()
    dp_size = data_parallel_size(cfg, world_size)
    device = resolve_device(cfg.device)

    seed_everything(cfg.seed)  # same initial weights on every rank
    model = GPT(GPTConfig.from_config(cfg.model)).to(device)
    batches = build_batches(cfg)
    ga = GradientAccumulation.from_config(cfg.train)
    if rank == 0:
        print(f"model: {model.n_params():,} parameters | world size {world_size} (dp {dp_size}) | {ga} | device {device}")

    model = parallelize(model, cfg)
    t = cfg.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    history = run_training_steps(
        model, optimizer, scheduler, batches, ga, t.steps,
        dp_rank=rank, dp_size=dp_size, device=device, grad_clip=t.grad_clip,
        log_every=t.log_every if rank == 0 else 0, progress=t.progress and rank == 0,
    )
    if rank == 0 and history:
        first, last = history[0], history[-1]
        print(f"done: loss {first['loss']:.4f} -> {last['loss']:.4f} in {len(history)} steps")
    return history


__all__ = ["train", "to_yaml"]
