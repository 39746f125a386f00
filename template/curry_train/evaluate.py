"""Validation loss during training (``train.eval_every``, ``train.eval_batches``).

``Evaluator(cfg, val_tokens, ...)`` holds ``eval_batches`` fixed held-out batches: batch ``i`` is
``Batches(val_tokens, train.batch_size, train.seq_len, seed).global_batch(i)``, the same rows at every evaluation and
at every world size (each data-parallel rank takes its slice of the rows, as in training). ``evaluator(model, step)``
returns None unless ``step + 1`` is a multiple of ``eval_every`` or ``step`` is the last; then, in eval mode and
without gradients, the mean token loss over every valid target of those batches: ``sum(loss) / sum(count)``, both
all-reduced over the data-parallel group (``dp x cp``: a context-parallel rank holds a part of each row's tokens),
so every rank gets the same number. Tensor-parallel ranks of one group read the same rows and are not summed.

Pipeline parallelism: the stages run one evaluation batch at a time, forward only (``pipeline_forward_loss``): each
rank runs its stages in stage order, receiving the activations from the previous stage's rank and sending its output
on (their shape first); the last stage computes the loss, which is broadcast over the pipeline group. With context
parallelism each batch is this rank's shard first (``prepare``) and every stage gets its global positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .data import Batches
from .loop import pipeline_inputs
from .model import token_loss
from .primitives.model_io import forward_loss_sum
from .primitives.tensor_parallel import local_value, loss_parallel_context


class Evaluator:
    def __init__(self, cfg, val_tokens, *, dp_rank: int = 0, dp_size: int = 1, dp_group=None, device="cpu",
                 n_micro: int = 1, loss_fn=None, prepare=None, loss_parallel: bool = False, schedule=None):
        t = cfg.train
        self.every, self.n_batches, self.steps = t.eval_every, t.eval_batches, t.steps
        self.batches = Batches(val_tokens, t.batch_size, t.seq_len, seed=cfg.seed)
        self.dp_rank, self.dp_size, self.dp_group, self.device = dp_rank, dp_size, dp_group, device
        self.n_micro, self.loss_fn, self.prepare = n_micro, loss_fn or forward_loss_sum, prepare
        self.loss_parallel, self.schedule = loss_parallel, schedule

    def due(self, step: int) -> bool:
        return bool(self.every) and ((step + 1) % self.every == 0 or step == self.steps - 1)

    def __call__(self, model, step: int) -> float | None:
        if not self.due(step):
            return None
        return self.loss(model)

    @torch.no_grad()
    def loss(self, model) -> float:
        """The mean validation token loss over the fixed batches (collective over the data-parallel group)."""
        modules = list(self.schedule.modules.values()) if self.schedule is not None else [model]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for i in range(self.n_batches):
                for x, y in self.batches.microbatches(i, self.dp_rank, self.dp_size, self.n_micro):
                    mb = (x.to(self.device), y.to(self.device))
                    mb = self.prepare(mb) if self.prepare is not None else mb
                    if self.schedule is not None:
                        loss_sum, n = pipeline_forward_loss(self.schedule, *pipeline_inputs(mb))
                    else:
                        with loss_parallel_context(self.loss_parallel):
                            loss_sum, n = self.loss_fn(model, mb)
                    total[0] += local_value(loss_sum.detach()).double().to(self.device)
                    total[1] += float(n)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, group=self.dp_group)
        return (total[0] / total[1].clamp(min=1.0)).item()


def pipeline_forward_loss(schedule, x: torch.Tensor, y: torch.Tensor, stage_kwargs: dict | None = None
                          ) -> tuple[torch.Tensor, int]:
    """``(summed token loss, valid targets)`` of ``(x, y)`` through every pipeline stage, forward only (collective
    over ``schedule.group``): stage ``s`` runs on the rank ``schedule.placement`` gives it, in stage order, each
    called with ``stage_kwargs`` (context parallelism's global positions, as in training)."""
    group, device = schedule.group, schedule.device
    owner = {s: r for r, ids in enumerate(schedule.placement) for s in ids}
    rank = schedule.rank

    def global_rank(r):
        return dist.get_global_rank(group, r) if group is not None else r

    h = x
    for s in range(schedule.n_stages):
        mine, prev = owner[s] == rank, owner[s - 1] if s else None
        if mine and s and prev != rank:  # receive stage s-1's output: its rank count, then shape, then values
            ndim = torch.zeros(1, dtype=torch.int64, device=device)
            dist.recv(ndim, src=global_rank(prev), group=group)
            shape = torch.zeros(int(ndim), dtype=torch.int64, device=device)
            dist.recv(shape, src=global_rank(prev), group=group)
            h = torch.empty(shape.tolist(), dtype=torch.float32, device=device)
            dist.recv(h, src=global_rank(prev), group=group)
        if mine:
            h = schedule.modules[s](h, **(stage_kwargs or {}))
            nxt = owner.get(s + 1)
            if nxt is not None and nxt != rank:
                out = h.float().contiguous()
                dist.send(torch.tensor([out.dim()], device=device), dst=global_rank(nxt), group=group)
                dist.send(torch.tensor(out.shape, device=device), dst=global_rank(nxt), group=group)
                dist.send(out, dst=global_rank(nxt), group=group)
    last = owner[schedule.n_stages - 1]
    result = torch.zeros(2, dtype=torch.float64, device=device)
    if rank == last:
        result[0] = token_loss(h, y)[0].double()
        result[1] = float((y != -100).sum())
    dist.broadcast(result, src=global_rank(last), group=group)
    return result[0], int(result[1])
