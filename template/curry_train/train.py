"""``python -m curry_train train``: build everything from the Hydra config and run the loop.

Works in one process and under ``torchrun --nproc-per-node N -m curry_train train`` (DDP over gloo on
CPU, nccl on GPU). Every config error is raised before the process group starts.

The model is ``user_model.build_model(cfg)``: the reference GPT, or the user's ``model._target_=pkg.module.factory``.
With ``parallel.pp > 1`` the model is split into stages (``stages.split_model``: the GPT, Hugging Face Llama /
GPT-2, torchtitan, nanoGPT), this rank's stages go through the same ``parallelize`` as a whole model, and the loop
gets their ``PipelineSchedule``: the same optimizer step, its pipeline branch open in ``loop.accumulate_gradients``.
With ``parallel.tp > 1`` the model is tensor-parallel over the rank grid's ``tp`` dim (``parallelize``); the ranks
of a tp group read the same rows (batches are split by ``dp_rank``) and losses and token counts are reduced over
``dp`` only. With MoE stages each MoE layer's balancing loss
enters the backward through its output (``primitives.moe.attach_aux_losses``, Megatron's ``MoEAuxLossAutoScaler``):
a pipeline micro-batch is one forward, weighted ``1 / (K * n_microbatches)``, so pp equals one process with
``gradient_accumulation_steps = K * n_microbatches`` (x dp); the logged loss is the token loss, as without pp.
With ``parallel.ep > 1`` (model=moe; DDP, ZeRO-1, FSDP2, plain or FSDP2 pipeline stages) each MoE layer keeps this
rank's slice of its experts (``parallelize.ExpertParallel``: left out of DDP and of the stages' dp average, its grads
reduced over the ranks holding the same experts; under pp the ep ranks are cut from each stage's dp ranks); ZeRO-1
shards the slices' optimizer state over those ranks (``primitives.zero1``).
With ``train.spike.enabled`` a sustained loss spike (``primitives.loss_spike``) rolls the run back to the last good
checkpoint and skips the spiking steps' data (``loop.SpikeRollback``).
Ctrl-C, SIGTERM and a full disk stop the run in one line each (``stopping``); rank 0 owns ``checkpoint.dir`` from
``train_state.prepare_checkpointing`` until ``train`` returns or raises.
"""

from __future__ import annotations

from . import distributed, stopping, train_state
from .context_batches import cp_microbatch
from .config import pipeline_settings, validate, warmup_warning
from .data import build_batches, seed_everything, token_streams
from .evaluate import Evaluator
from .export_hf import init_from
from .loop import SpikeRollback, build_optimizer, build_scheduler, run_training_steps, token_loss_sum
from .parallelize import ExpertParallel, apply_model_parallel, parallelize
from .primitives import GradientAccumulation, ParallelState, PipelineSchedule
from .primitives.blocks import find_blocks
from .primitives.distributed_optimizer import DistributedOptimizer, normalize_sharding
from .primitives.loss_spike import LossSpikeWatchdog
from .primitives.moe import attach_aux_losses
from .run_logging import TensorBoardLog, with_tensorboard
from .stages import StageModules, split_model
from .user_model import build_loss, build_model, model_name, n_params


def _expert_zero1(expert_parallel, ps) -> dict:
    """``shard_optimizer``'s expert arguments: under ZeRO-1 with ep the bank slices (this rank's, after
    ``keep_only``) get their own optimizer, its state sharded over the ranks holding the same experts."""
    return {} if expert_parallel is None else {"expert_params": expert_parallel.params,
                                               "expert_group": ps.expert_dp_group}


def train(cfg) -> list[dict]:
    """Run training as configured; returns the per-step metrics (on every rank)."""
    world_size = distributed.env_world_size()
    validate(cfg, world_size)  # before any process group exists
    fault_step = train_state.fault_step_from_env()
    corrupt_steps = train_state.corrupt_steps_from_env()  # test hook: a data window that makes the loss spike
    signal_at = stopping.signal_from_env()  # test hook: the run signals itself after a step
    ckpt = train_state.prepare_checkpointing(cfg)  # checkpoint.* checked, folder owned, writable: still before init
    sigterm = stopping.SigtermWatch(ckpt is not None and cfg.checkpoint.save_on_signal)
    progress = [None]
    try:
        return _train(cfg, world_size, ckpt, fault_step, corrupt_steps, signal_at, sigterm, progress)
    except KeyboardInterrupt:
        done = progress[0].done if progress[0] is not None else 0
        raise stopping.Interrupted(stopping.interrupted_line(done, ckpt)) from None
    finally:
        sigterm.restore()
        if ckpt is not None:
            ckpt.release()


def _train(cfg, world_size, ckpt, fault_step, corrupt_steps, signal_at, sigterm, progress) -> list[dict]:
    distributed.init_from_env()
    rank = distributed.rank()
    ps = ParallelState.from_config(cfg.parallel)
    dp_size = ps.dp
    device = distributed.resolve_device(cfg.device)

    seed_everything(cfg.seed)  # same initial weights on every rank
    model = init_from(build_model(cfg), cfg).to(device)  # the GPT or model._target_; model.init_from's weights
    # parallel.ep > 1: each rank keeps its slice of every MoE layer's (same-seed) expert bank; DDP ignores the slices
    expert_parallel = ExpertParallel(model, ps) if ps.ep > 1 else None
    streams = token_streams(cfg)  # train, val: data.prepared's memmapped shards or data.path through data.tokenizer
    batches = build_batches(cfg, streams)
    if corrupt_steps is not None:
        batches = train_state.CorruptedBatches(batches, corrupt_steps)
    ga = GradientAccumulation.from_config(cfg.train)
    if rank == 0:
        tp = f", tp {ps.tp}{' + sequence parallel' if cfg.parallel.sequence_parallel else ''}" if ps.tp > 1 else ""
        tp += f", cp {ps.cp} (ring attention)" if ps.cp > 1 else ""
        tp += f", ep {ps.ep} (experts sharded)" if ps.ep > 1 else ""
        print(f"model: {model_name(cfg)}, {n_params(model):,} parameters | world size {world_size} "
              f"(dp {dp_size}{tp}) | {ga} | device {device}")
        if world_size > 1:
            print(ps)
        if warmup_warning(cfg.train):
            print(warmup_warning(cfg.train), flush=True)

    t = cfg.train
    schedule = prepare = None
    dp_group = ps.dp_cp_group  # tokens counted and gradients averaged over every data shard: dp x cp
    if ps.cp > 1:  # each rank keeps N/cp tokens of every row, placed by their global positions
        prepare = cp_microbatch(model, ps.cp_group)
    if ps.pp > 1:  # pipeline parallelism: this rank keeps its stages and the loop runs them through the schedule
        s = pipeline_settings(cfg, world_size, dp_size, len(find_blocks(model)))
        apply_model_parallel(model, cfg, tp_mesh=ps.tp_mesh, cp_group=ps.cp_group)  # tp, cp: blocks, before the split
        stages = split_model(model, s["pp"] * s["v"], s["layers_per_stage"])  # same seed: tied copies start equal
        schedule = PipelineSchedule(s["kind"], s["n_microbatches"], stages, ps.pp_group, token_loss_sum,
                                    device=device)
        if expert_parallel is not None:  # the banks of this rank's stages (ep cut from the stage's dp ranks)
            expert_parallel.keep_only(schedule.modules.values())
        for stage in schedule.modules.values():  # recompute, compile, FSDP2 per stage (no_shard: the loop averages)
            parallelize(stage, cfg, dp_group=dp_group, fsdp_mesh=ps.fsdp_mesh, pipeline_stage=True,
                        expert_parallel=expert_parallel, expert_fsdp_mesh=ps.expert_fsdp_mesh)
            # MoE balancing loss: no stage has the whole loss, so each MoE layer puts its own into the backward,
            # weighted 1 / (forwards per step) as the loop weights it (K * n_microbatches forwards here)
            attach_aux_losses(stage, 1.0 / (ga.steps * s["n_microbatches"]))
        model = StageModules(schedule.modules.values())  # the full model's parameter names, for checkpoints
        optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
        if normalize_sharding(cfg.parallel.sharding) == "zero1":  # plain stages, grads averaged by the loop
            optimizer = DistributedOptimizer(model, None, "zero1", dp_group).shard_optimizer(
                optimizer, **_expert_zero1(expert_parallel, ps))
    else:
        # tp > 1 / cp > 1: every rank of a tp or cp group reads the same rows (the batch is split by dp_rank only)
        model, dist_opt = parallelize(model, cfg, dp_group=dp_group, tp_mesh=ps.tp_mesh, fsdp_mesh=ps.fsdp_mesh,
                                      cp_group=ps.cp_group, expert_parallel=expert_parallel,
                                      expert_fsdp_mesh=ps.expert_fsdp_mesh)
        optimizer = dist_opt.shard_optimizer(build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2)),
                                             **_expert_zero1(expert_parallel, ps))
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    watchdog = LossSpikeWatchdog.from_config(t.spike) if t.spike.enabled else None  # needs ckpt (config.validate)
    spike = SpikeRollback(watchdog, ckpt, model, optimizer, scheduler, t.spike.max_rollbacks,
                          on_load=lambda: train_state.apply_optimizer_settings(optimizer, scheduler, cfg)) \
        if watchdog is not None else None
    start_step = train_state.resume(ckpt, model, optimizer, scheduler, cfg, watchdog)
    loss_fn = build_loss(cfg) if t.loss is not None else None  # train.loss._target_ (user_model.py)
    evaluator = Evaluator(cfg, streams[1], dp_rank=ps.dp_rank, dp_size=dp_size, dp_group=dp_group, device=device,
                          n_micro=ga.steps, loss_fn=loss_fn, prepare=prepare,
                          loss_parallel=cfg.parallel.loss_parallel, schedule=schedule) if t.eval_every else None
    tensorboard = TensorBoardLog(t.tensorboard_dir, getattr(model, "flops_per_token", lambda: None)()) \
        if t.tensorboard_dir and rank == 0 else None
    progress[0] = train_state.step_hook(cfg, ckpt, model, optimizer, scheduler, fault_step, watchdog,
                                        resumed_from=start_step, sigterm=sigterm, signal_at=signal_at)
    history = run_training_steps(
        model, optimizer, scheduler, batches, ga, t.steps, start_step=start_step,
        dp_rank=ps.dp_rank, dp_size=dp_size, dp_group=dp_group, device=device, grad_clip=t.grad_clip,
        log_every=t.log_every if rank == 0 else 0, progress=t.progress and rank == 0, schedule=schedule,
        on_step=with_tensorboard(progress[0], tensorboard),
        loss_fn=loss_fn, evaluate=evaluator,
        nonfinite_patience=t.nonfinite_patience, loss_parallel=cfg.parallel.loss_parallel, prepare=prepare,
        expert_parallel=expert_parallel, spike=spike,
    )
    train_state.finish(ckpt)  # an async save still in flight is waited for and committed
    if tensorboard is not None:
        tensorboard.close()
    if rank == 0 and history:
        first, last = history[0], history[-1]
        vals = [h["val_loss"] for h in history if "val_loss" in h]
        val = f"; val loss {vals[0]:.4f} -> {vals[-1]:.4f} in {len(vals)} evaluations" if vals else ""
        print(f"done: loss {first['loss']:.4f} -> {last['loss']:.4f} in {len(history)} steps{val}")
    return history
