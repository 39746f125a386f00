"""Training with pipeline parallelism (``parallel.pp > 1``): the GPT split into stages, the same loop.

``PipelineTraining(model, cfg, pp_group, dp_group)`` splits the freshly built GPT (every rank builds it from the
same seed, so tied copies start equal) into ``pp x v`` stages (``split_model``; ``v`` = 1 for gpipe/1f1b, else
``parallel.pp_stages_per_rank`` if the key exists, default 2), keeps this rank's stages and builds a
``PipelineSchedule`` of ``parallel.pp_schedule`` with ``parallel.n_microbatches``. It gives the loop:

* ``module``: an ``nn.Module`` holding this rank's stages under the GPT's own names (``tok_emb``, ``blocks.3``,
  ``head``...), for the optimizer and checkpoints;
* ``forward_backward(module, microbatches, ga, dp_group)`` and ``clip_grad_norm(module, max_norm)``: the
  ``run_training_steps`` extension points;
* ``shard_optimizer(opt)``: returns ``opt`` (``train.py`` treats it like a ``DistributedOptimizer``).

``train.recompute`` and ``train.compile`` are applied to the blocks before splitting, as ``parallelize`` does.
Stages are not wrapped in DDP/FSDP: ``parallel.sharding`` must be ``no_shard``; with dp > 1 (e.g. dp=2 x pp=2
on 4 ranks, groups from ``ParallelState``) gradients are all-reduced over ``dp_group`` after the step.

One optimizer step. ``run_training_steps`` hands over this data-parallel rank's K gradient-accumulation chunks.
``ga.plan`` all-reduces the global valid-token count ``T`` over ``dp_group``; each chunk is one
``PipelineSchedule.train_step`` (``n_microbatches`` pipeline micro-batches) whose loss_fn returns
``token_loss_sum(micro-batch) / (T / dp)``, with ``scale_grads=False``: the ``GradientAccumulation`` token
normalisation, so the accumulated gradient is the gradient of the global mean token loss. Then, once per step:
tied-embedding gradients are summed over ``pp_group``, and gradients averaged over ``dp_group`` (when dp > 1).
The loop then calls ``clip_grad_norm``, which clips by the *global* norm (squares summed over ``pp_group``, a tied
weight counted once) and returns it, so the logged ``grad_norm`` is the whole model's. The returned loss sum
is broadcast from the last stage, so every rank reports the same mean token loss.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import pipeline_settings
from .model import IGNORE_INDEX, token_loss
from .model import split_model
from .primitives.pipeline import PipelineSchedule
from .primitives.recompute import apply_recompute_from_config


class StageModules(nn.Module):
    """This rank's stage modules merged under the GPT's attribute names, so parameter names (and checkpoint keys)
    are the full model's: ``tok_emb.weight``, ``blocks.5.attn.qkv.weight``, ``head.weight``..."""

    def __init__(self, stages):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for stage in stages:
            for name, child in stage.named_children():
                if name == "blocks":
                    self.blocks.update(child)
                else:
                    setattr(self, name, child)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline rank's modules run inside PipelineSchedule.train_step, not module(x)")


class PipelineTraining:
    def __init__(self, model: nn.Module, cfg, pp_group=None, dp_group=None, device=None):
        self.dp_group = dp_group
        dp_size = dist.get_world_size(dp_group) if dist.is_initialized() else 1
        s = pipeline_settings(cfg, dist.get_world_size(pp_group), dp_size)
        self.grad_clip = float(cfg.train.grad_clip)
        self.divisor = 1.0
        # the same model transforms as parallelize(), before splitting so the stages hold the wrapped blocks
        apply_recompute_from_config(model, cfg.train, "recompute", "recompute_every_n")
        if getattr(cfg.train, "compile", False):
            for block in model.blocks:
                block.compile()
        stages = split_model(model, s["pp"] * s["v"], s["layers_per_stage"])
        self.schedule = PipelineSchedule(s["kind"], s["n_microbatches"], stages, pp_group, self._loss_fn,
                                         device=device, scale_grads=False)
        self.module = StageModules([stages[i] for i in self.schedule.stage_ids])

    def shard_optimizer(self, optimizer):
        """Same role as ``DistributedOptimizer.shard_optimizer``: nothing to shard, the optimizer is returned as is."""
        return optimizer

    def _loss_fn(self, logits, targets):
        """Backward loss of one pipeline micro-batch: its token-loss sum over the step's (T / dp) normaliser."""
        return token_loss(logits, targets)[0] / self.divisor

    def global_grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: squares summed over ``pp_group``, each tied weight once."""
        params = [p for p in self.module.parameters() if p.grad is not None and self.schedule.owns(p)]
        sq = torch.zeros((), dtype=torch.float64, device=self.schedule.device)
        for p in params:
            sq += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.schedule.group)
        return math.sqrt(sq.item())

    def clip_grad_norm(self, module, max_norm: float) -> float:
        """The loop's ``clip_grad_norm`` hook: clip by the global pre-clip norm and return it (same coefficient
        on every rank, as ``torch.nn.utils.clip_grad_norm_`` in one process)."""
        norm = self.global_grad_norm()
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))
            if coef < 1.0:
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    def forward_backward(self, module, microbatches, ga, dp_group=None):
        """One optimizer step's forward + backward (see module doc). Returns (loss sum, local valid tokens)."""
        ga.plan([(y != IGNORE_INDEX).sum() for _, y in microbatches], group=dp_group)
        self.module.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), dtype=torch.float64)
        n_total = 0
        for i, (x, y) in enumerate(microbatches):
            n_valid = int((y != IGNORE_INDEX).sum())
            # tokens: sum / (T / dp); microbatches (classic mean / K): sum / (this chunk's tokens * K)
            self.divisor = ga.loss_divisor() if ga.normalization == "tokens" else max(n_valid, 1) * ga.steps
            loss = self.schedule.train_step(x, y, broadcast_loss=True, sync_tied=False)
            loss_total += loss.double().cpu() * self.divisor
            n_total += n_valid
        self.schedule.sync_tied_grads()
        group = dp_group if dp_group is not None else self.dp_group
        dp_size = dist.get_world_size(group) if dist.is_initialized() else 1
        if dp_size > 1:  # DP averages: with loss divisor T / dp the average is sum over every token / T
            for p in self.module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)
                    p.grad.div_(dp_size)
        return loss_total, n_total

    def __repr__(self) -> str:
        return f"PipelineTraining({self.schedule!r})"
