"""The training loop: plain, nanoGPT-style, with gradient accumulation done right.

One optimizer step (``run_training_steps``), the same code with or without pipeline parallelism::

    micro = batches.microbatches(step, dp_rank, dp_size, K)     # this rank's K (x, y) pairs (or HF-style dicts)
    accumulate_gradients(model, micro, ga, dp_group, schedule):
        ga.plan([count_target_tokens(mb) for mb in micro], dp_group)  # one all-reduce: global token count T
        for i, mb in enumerate(micro):
            d = ga.sum_divisor(i, n_valid)                      # T / dp, or n_valid * K for "microbatches"
            if schedule is None:
                with ga.sync_context(model, i):                 # no_sync / no reduce-scatter unless last
                    loss_sum, _ = forward_loss_sum(model, mb)   # any output: logits, ModelOutput, tuple
                    ga.backward_loss(loss_sum, n_valid, i).backward()   # loss_sum / d
            else:                                               # pipeline: n_microbatches chunks through the stages
                schedule.train_step(*mb, loss_divisor=d)        # each chunk back-propagates token_loss_sum / d
        if schedule is not None: sum tied grads over pp, average grads over dp_group (FSDP2 stages: done by them)
    clip_grad_norm(model.parameters(), grad_clip, pp_group, owns)   # one global norm for every layout
    optimizer.step(), scheduler.step()

Data parallelism (DDP, ZeRO-1, FSDP2) hides behind ``model`` (see ``parallelize``); pipeline parallelism is the
open ``schedule`` branch, ``model`` then holds this rank's stages under the GPT's names (``model.StageModules``).
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from .model import token_loss
from .primitives import GradientAccumulation
from .primitives.checkpoint import CheckpointDamagedError, step_of
from .primitives.model_io import count_target_tokens, forward_loss_sum
from .primitives.moe import MoEMLP, moe_aux_loss, update_moe_biases
from .primitives.tensor_parallel import local_value, loss_parallel_context


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


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The pipeline's ``loss_fn``: one pipeline micro-batch's summed token loss (``train_step`` divides it)."""
    return token_loss(logits, targets)[0]


def accumulate_gradients(model, microbatches, ga: GradientAccumulation, dp_group=None, schedule=None, loss_fn=None,
                         loss_parallel: bool = False, sharded=None):
    """Forward + backward of one optimizer step's K micro-batches; returns (summed token loss, local valid tokens).

    A micro-batch is an ``(x, y)`` pair or a dict of keyword inputs with ``labels`` (shifted, Hugging Face style)
    or ``targets`` (``primitives.model_io``); ``n_valid`` is ``count_target_tokens`` of it, the targets exactly as
    the loss sees them. Micro-batch ``i`` back-propagates its summed token loss (``forward_loss_sum``: the model
    may return logits, a ``ModelOutput`` or a tuple) over ``ga.sum_divisor(i, n_valid)``. Without
    ``schedule`` it runs through ``model`` under ``ga.sync_context`` (data-parallel wrappers reduce on the last).
    With a ``PipelineSchedule`` it is one ``schedule.train_step`` (the loss sum broadcast from the last stage);
    afterwards, once per step, tied-weight gradients are summed over the pipeline group and, unless the stages
    reduce their own (FSDP2 stages: ``PipelineSchedule.reduces_grads``), every gradient of ``model`` (this rank's
    stages) is averaged over ``dp_group``: with divisor ``T / dp`` the average is the gradient of the global mean
    token loss, as DDP gives the plain path. ``sharded`` (``parallelize.ExpertParallel``): its expert slices differ
    across the dp ranks, so they are left out of that average (``sharded.reduce_grads()`` reduces them).

    ``loss_fn(model, microbatch) -> (loss_sum, n_valid)`` replaces ``forward_loss_sum`` for a model whose forward
    is not ``(inputs) -> logits`` (``train.loss._target_``); its ``n_valid`` must equal ``count_target_tokens``.
    ``loss_parallel``: the model's logits are a vocabulary-sharded DTensor (``parallel.loss_parallel``): forward,
    loss and backward run inside ``torch.distributed.tensor.parallel.loss_parallel()``.

    Mixture of experts: a model with ``primitives.moe.MoEMLP`` layers adds their balancing losses
    (``moe_aux_loss``, each a mean over the micro-batch's tokens) to every micro-batch's backward, divided by K: the
    step back-propagates the token loss plus the mean over micro-batches of the aux loss (averaged over ranks by
    the data-parallel wrapper like every gradient). With ``schedule`` no forward has the whole loss: ``train``
    attaches each stage's MoE layers' balancing losses to their outputs (``primitives.moe.attach_aux_losses``).
    """
    loss_fn = forward_loss_sum if loss_fn is None else loss_fn
    moe = any(isinstance(m, MoEMLP) for m in model.modules())
    counts = [int(count_target_tokens(mb)) for mb in microbatches]
    ga.plan(counts, group=dp_group)
    model.zero_grad(set_to_none=True)
    loss_total = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(microbatches):
        if schedule is not None:
            x, y, stage_kwargs = pipeline_inputs(mb)
            loss_sum = schedule.train_step(x, y, loss_divisor=ga.sum_divisor(i, counts[i]), broadcast_loss=True,
                                           sync_tied=False, stage_kwargs=stage_kwargs)
        else:
            with ga.sync_context(model, i), loss_parallel_context(loss_parallel):
                loss_sum, _ = loss_fn(model, mb)
                loss = ga.backward_loss(loss_sum, counts[i], i)
                (loss + moe_aux_loss(model) / ga.steps if moe else loss).backward()
        loss_total += local_value(loss_sum.detach()).double().cpu()
    if schedule is not None:
        schedule.sync_tied_grads()
        dp_size = dist.get_world_size(dp_group)
        if dp_size > 1 and not schedule.reduces_grads:  # FSDP2 stages: PyTorch's pipelining runtime reduced them
            own = {id(p) for p in sharded.params} if sharded is not None else set()
            for p in model.parameters():
                if p.grad is not None and id(p) not in own:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad.div_(dp_size)
    return loss_total, sum(counts)


def pipeline_inputs(mb) -> tuple:
    """``(x, y, stage_kwargs)`` of a micro-batch for ``PipelineSchedule.train_step``: an ``(x, y)`` pair, or a dict
    ``{input: x, "targets": y, **keywords}`` (``context_batches.cp_microbatch``), each keyword given one row per
    row of ``x`` (the schedule splits keyword inputs by rows into its micro-batches)."""
    if not isinstance(mb, dict):
        x, y = mb
        return x, y, {}
    rest = {k: v for k, v in mb.items() if k != "targets"}
    name = next(iter(rest))
    x = rest.pop(name)
    kwargs = {k: v.expand(x.shape[0], -1) if torch.is_tensor(v) and v.dim() == 1 else v for k, v in rest.items()}
    return x, mb["targets"], kwargs


def _global_mean_loss(loss_sum: torch.Tensor, n_tokens: int, dp_group, device) -> tuple[float, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return loss_sum.item() / max(n_tokens, 1), n_tokens
    t = torch.tensor([loss_sum.item(), float(n_tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=dp_group)
    return t[0].item() / max(t[1].item(), 1.0), int(t[1].item())


def _mesh_of(t: torch.Tensor):
    return getattr(t, "device_mesh", None)


def clip_grad_norm(parameters, max_norm: float, pp_group=None, owns=None, sharded=None) -> float:
    """The whole model's gradient L2 norm, before clipping; clips to ``max_norm`` when it is > 0.

    ``norm = sqrt(sum_p |grad_p|^2)``, every gradient scaled by ``min(1, max_norm / (norm + 1e-6))``
    (``torch.nn.utils.clip_grad_norm_``'s rule). A DTensor gradient (FSDP2, tensor parallelism) counts with its
    full tensor: ``get_total_norm`` runs once per device mesh (a tensor-parallel model mixes plain replicated
    parameters, tp-sharded DTensors and, under FSDP2, dp and dp x tp DTensors, which one ``torch.stack`` cannot
    hold), each partial norm is made whole (``full_tensor``: reduced over its mesh) and the squares summed. A plain
    gradient is whole on every rank of a tp group, so it counts once. With ``pp_group`` the squares are summed
    over the pipeline ranks, so every rank clips by the same coefficient; a parameter with ``owns(p)`` False (a
    tied weight whose copy another rank counts, ``PipelineSchedule.owns``) is left out of the sum but still clipped.
    ``sharded`` (``parallelize.ExpertParallel``): its parameters differ across its group, so their squares come from
    ``sharded.norm_square()`` (summed over the ep ranks) instead.
    """
    params = [p for p in parameters if p.grad is not None]
    groups: dict = {}  # device mesh (None: plain tensors) -> gradients; a dict keeps the first-seen order
    for p in params:
        if (owns is None or owns(p)) and (sharded is None or not sharded.owns(p)):
            groups.setdefault(_mesh_of(p.grad), []).append(p.grad)
    if len(groups) <= 1:  # one kind of tensor: torch's own path
        norm = local_value(torch.nn.utils.get_total_norm(next(iter(groups.values()), [])))
    else:
        squares = [local_value(torch.nn.utils.get_total_norm(g)).double().square() for g in groups.values()]
        norm = torch.stack(squares).sum().sqrt().float()
    if sharded is not None:
        norm = (norm.double().square() + sharded.norm_square()).sqrt().to(norm.dtype)
    if pp_group is not None:
        square = norm.double().square()
        dist.all_reduce(square, group=pp_group)
        norm = square.sqrt().to(norm.dtype)
    if max_norm > 0:
        by_mesh: dict = {}
        for p in params:
            by_mesh.setdefault(_mesh_of(p.grad), []).append(p)
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return float(norm)


class NonFiniteTrainingError(RuntimeError):
    """``nonfinite_patience`` steps in a row had a NaN/Inf loss or gradient norm: the run cannot go on."""


class LossSpikeError(RuntimeError):
    """A sustained loss spike with no rollback left (``train.spike.max_rollbacks``) or no checkpoint before it."""


class SpikeRollback:
    """What the loop does on a sustained loss spike (``train.spike.*``): ``check(step, loss)`` -> None, or after a
    rollback the record ``{"at_step", "loss", "baseline", "spike_steps", "to_step", "skipped_data": [a, s],
    "rollbacks"}``.

    ``watchdog.observe(step, loss)`` (``primitives.loss_spike``) fires at step ``s``, the spike having begun at step
    ``a``: the newest checkpoint of ``ckpt`` with step ``c < a`` that verifies is loaded into model, optimizer and
    scheduler (``Checkpointer.load(path=...)``; a damaged one is passed over for an older one). ``c < a``: the
    loss at step ``c`` was measured on exactly those parameters and was not a spike (the checkpoint ``a`` holds
    the parameters the first spiking loss came from). The spiking steps' updates are gone with the reload; the
    data of steps ``a..s`` is skipped (the loop goes on with step ``s + 1``: the data position is the step) and
    so is their LR schedule: the scheduler is stepped from ``c`` up to ``s``, so it stays on the step counter
    (``train.steps`` stays the run's length) like the non-finite guard's skipped steps. RNG streams are not
    rewound. The watchdog is then ``reset`` (its accepted history kept). The loss is global, so every rank decides
    alike. More than ``max_rollbacks`` rollbacks in one run raise ``LossSpikeError`` (0: the first spike does).
    ``on_load()``, if given, runs right after the load, before the scheduler is stepped (``train`` puts the current
    ``train.lr``/betas/weight decay back, as on resume: ``train_state.apply_optimizer_settings``).
    """

    def __init__(self, watchdog, ckpt, model, optimizer, scheduler, max_rollbacks: int = 3, on_load=None):
        self.watchdog, self.ckpt, self.max_rollbacks, self.on_load = watchdog, ckpt, max_rollbacks, on_load
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.rollbacks = 0

    @property
    def in_spike(self) -> bool:
        return self.watchdog.in_spike

    def check(self, step: int, loss: float) -> dict | None:
        w = self.watchdog
        if not w.observe(step, loss):
            return None
        what = (f"step {step}: loss spike ({loss:.4f} vs baseline {w.baseline:.4f} for {w.spike_steps} steps, "
                f"threshold {w.threshold():.4f})")
        if self.rollbacks >= self.max_rollbacks:
            raise LossSpikeError(f"{what}: train.spike.max_rollbacks={self.max_rollbacks} rollbacks already done in "
                                 "this run; lower train.lr, raise train.warmup_steps or check the data at these steps")
        start = w.spike_start
        meta = self._load_before(start)
        if meta is None:
            raise LossSpikeError(f"{what}: no intact checkpoint before step {start} in {self.ckpt.dir} to roll back "
                                 "to (checkpoint.every must be small enough to save one before a spike)")
        if self.on_load is not None:
            self.on_load()
        while self.scheduler.last_epoch < step:  # the loop's scheduler.step() then brings it to step + 1
            self.scheduler.step()
        self.rollbacks += 1
        record = {"at_step": step, "loss": loss, "baseline": w.baseline, "spike_steps": w.spike_steps,
                  "to_step": meta["step"], "skipped_data": [start, step], "rollbacks": self.rollbacks}
        w.reset()
        if not dist.is_initialized() or dist.get_rank() == 0:
            tqdm.write(f"step {step}: loss spike ({loss:.4f} vs baseline {record['baseline']:.4f} for "
                       f"{record['spike_steps']} steps): rolled back to step {meta['step']}, skipping data steps "
                       f"{start}..{step}")
        return record

    def _load_before(self, start: int) -> dict | None:
        self.ckpt.wait()
        for path in self.ckpt.shared_candidates():  # newest first, the same list on every rank
            if step_of(path) >= start:
                continue
            try:
                return self.ckpt.load(self.model, self.optimizer, self.scheduler, path=path, restore_rng=False)
            except CheckpointDamagedError as e:
                if not dist.is_initialized() or dist.get_rank() == 0:
                    tqdm.write(f"rollback: passing over {path.name}: {e}")
        return None


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
    schedule=None,
    loss_fn=None,
    on_step=None,
    nonfinite_patience: int = 3,
    loss_parallel: bool = False,
    prepare=None,
    expert_parallel=None,
    spike: SpikeRollback | None = None,
    evaluate=None,
) -> list[dict]:
    """Train from ``start_step`` up to ``steps``; returns one metrics dict per step.

    ``prepare((x, y)) -> batch``, if given, turns each micro-batch (on ``device``) into what the model takes, e.g.
    this rank's context-parallel shard with its positions (``context_batches.cp_microbatch``).
    ``expert_parallel`` (``parallelize.ExpertParallel``, ``parallel.ep > 1``): its expert grads, left out of DDP, are
    reduced after the backward (``reduce_grads``) and counted in the grad norm over the ep ranks.

    Metrics: ``step``, ``loss`` (mean token loss of the global batch), ``lr``, ``grad_norm``,
    ``tokens`` (valid tokens in the global batch) and ``tokens_per_s``. ``on_step(step, metrics)`` runs after
    each optimizer step (checkpointing hooks in here). ``loss_fn``: see ``accumulate_gradients``. ``schedule``: the
    ``PipelineSchedule`` running this rank's stages (``model`` then holds them), or None; ``grad_norm`` is the whole
    model's either way.

    Non-finite guard: when the step's loss or gradient norm is NaN/Inf (both are global, so every rank agrees) the
    update is not applied: the gradients are dropped, the optimizer does not step (the LR schedule and the data move
    on), ``metrics["skipped"]`` is True and a line is logged. ``nonfinite_patience`` such steps in a row raise
    ``NonFiniteTrainingError`` naming the step and the values. ``loss_parallel``: see ``accumulate_gradients``.

    Loss-spike rollback (``spike``, a ``SpikeRollback``): every finite step's loss goes to ``spike.check``; on a
    sustained spike it reloads the last good checkpoint, the step's update is not applied, ``metrics["rollback"]``
    holds the record and the loop goes on with the next step's data. ``metrics["spike"]`` is True while a spike is
    in progress (the checkpoint hook does not save then).

    ``evaluate(model, step) -> float | None`` (``evaluate.Evaluator``), if given, runs after each optimizer step; a
    number goes into ``metrics["val_loss"]``, the log line and the progress bar.
    """
    pp_group, owns = (schedule.group, schedule.owns) if schedule is not None else (None, None)
    model.train()
    history = []
    bad_in_a_row = bad_total = 0
    bar = tqdm(range(start_step, steps), desc="train", disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        micro = [
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            for x, y in batches.microbatches(step, dp_rank, dp_size, ga.steps)
        ]
        if prepare is not None:
            micro = [prepare(mb) for mb in micro]
        loss_sum, n_tokens = accumulate_gradients(model, micro, ga, dp_group, schedule, loss_fn, loss_parallel,
                                                  sharded=expert_parallel)
        if expert_parallel is not None:
            expert_parallel.reduce_grads()
        norm = clip_grad_norm(model.parameters(), grad_clip, pp_group, owns, sharded=expert_parallel)
        loss, global_tokens = _global_mean_loss(loss_sum, n_tokens, dp_group, device)
        skipped = not (math.isfinite(loss) and math.isfinite(norm))
        rollback = spike.check(step, loss) if spike is not None and not skipped else None
        if skipped:
            bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
            optimizer.zero_grad(set_to_none=True)
            if not dist.is_initialized() or dist.get_rank() == 0:
                tqdm.write(f"step {step:5d} | non-finite loss {loss} / grad norm {norm}: update skipped "
                           f"({bad_in_a_row} in a row, {bad_total} in this run)")
            if bad_in_a_row >= nonfinite_patience:
                raise NonFiniteTrainingError(
                    f"step {step}: loss {loss}, grad norm {norm}: {bad_in_a_row} non-finite steps in a row "
                    f"(train.nonfinite_patience={nonfinite_patience}); no update of these steps was applied or "
                    "saved. Lower train.lr, raise train.warmup_steps or check the data at these steps")
        elif rollback is not None:
            optimizer.zero_grad(set_to_none=True)  # the spike step's update is dropped: the checkpoint's state stays
        else:
            bad_in_a_row = 0
            optimizer.step()
            update_moe_biases(model, group=dp_group)  # DeepSeek-V3 balancing (routers built with it only)
        scheduler.step()
        dt = time.perf_counter() - t0
        metrics = {
            "step": step,
            "loss": loss,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": norm,
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / dt,
            "skipped": skipped,
        }
        val_loss = evaluate(model, step) if evaluate is not None else None
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        if spike is not None:
            metrics["spike"] = spike.in_spike
        if rollback is not None:
            metrics["rollback"] = rollback
        history.append(metrics)
        val = {"val_loss": f"{val_loss:.4f}"} if val_loss is not None else {}
        bar.set_postfix(loss=f"{loss:.4f}", **val, tok_s=f"{metrics['tokens_per_s']:.0f}")
        if log_every and (step % log_every == 0 or step == steps - 1 or val_loss is not None):
            tqdm.write(
                f"step {step:5d} | loss {loss:.4f}{f' | val loss {val_loss:.4f}' if val_loss is not None else ''} | "
                f"lr {metrics['lr']:.2e} | grad norm {norm:.3f} | {metrics['tokens_per_s']:.0f} tok/s"
            )
        if on_step is not None:
            on_step(step, metrics)
    bar.close()
    return history
