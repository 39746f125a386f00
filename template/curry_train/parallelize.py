"""Apply parallelisms to a freshly built model, or to one pipeline stage, in one fixed, documented order.

Order (torchtitan's): tensor parallelism (+ sequence parallelism) -> context parallelism -> recompute (activation
checkpointing) -> ``torch.compile`` -> data-parallel sharding.

0. ``parallel.tp > 1``: ``primitives.tensor_parallel.apply_tensor_parallel(model, tp_mesh,
   parallel.sequence_parallel, parallel.loss_parallel)``: the block linears become ``ColumnParallelLinear`` /
   ``RowParallelLinear`` over the mesh's ``tp`` dim (DTensor parameters, names unchanged). First, because
   recompute, compile and FSDP2 all work on the sharded modules (FSDP2 then shards the tp-sharded parameters
   further over ``dp``: 2-D DTensors).
0b. ``parallel.cp > 1``: ``primitives.context_parallel.apply_context_parallel(model, cp_group)``: every block's
   ``scaled_dot_product_attention`` becomes ring attention over the cp group (the block is re-classed in place,
   names unchanged). Before recompute: a recompute around a ring-attention block re-runs the ring in backward,
   which is exact; ring attention inside a recomputed region built first would not be ringed. The data-parallel
   step below then runs over the dp x cp group (``ParallelState.dp_cp_group``), the batches are sharded by
   ``context_batches.cp_microbatch``.
1. ``train.recompute`` (``false`` | ``true`` = ``full`` | ``full`` | ``selective``) every ``train.recompute_every_n``-th
   block (``primitives.recompute``). It goes before compile so that the compiled graph contains the checkpoint
   boundaries, and before FSDP so that FSDP wraps blocks that already recompute (the reverse order is an error).
2. ``train.compile``: ``block.compile()`` on each transformer block, in place (no ``_orig_mod.`` in
   parameter names). Per block, as torchtitan does: blocks share one compiled graph.
3. ``parallel.sharding`` (``no_shard`` | ``zero1`` | ``shard_grad_op`` | ``full``), ``parallel.mixed_precision``,
   ``parallel.cpu_offload``, the FSDP2 step-time levers ``parallel.fsdp_prefetch`` / ``fsdp_reshard_last`` /
   ``fsdp_blocks_per_unit`` (null = auto, ``primitives.fsdp_levers.resolve_levers``: bench sharding's fastest
   combination) (``DistributedOptimizer.from_config``): DDP and ZeRO-1 over ``dp_group``, FSDP2 over
   ``fsdp_mesh`` (``ParallelState.fsdp_mesh``: dp x cp, 1-D; or ``(dp_replicate, dp_shard x cp)``, 2-D: HSDP,
   shard within a replica, replicate across). Last, because FSDP2 shards whatever the steps before made: with
   ``tp > 1`` the parameters become dp x tp DTensors. In one process without torch.distributed, ``no_shard`` leaves
   the model as it is and the other modes are an error saying to use torchrun. DDP and ZeRO-1 do not take
   DTensor parameters, so ``config.validate`` allows ``tp > 1`` only with ``dp = 1`` and ``no_shard`` (nothing to
   wrap) or with an FSDP2 mode.

Blocks, in steps 1 to 3, are what ``primitives.blocks.find_blocks`` finds (or instances of ``block_types``).

A pipeline stage (``pipeline_stage=True``, e.g. a ``model.GPTStage``: its blocks in the ``nn.ModuleDict``
``blocks``): steps 0 and 0b (``apply_model_parallel``) ran on the whole model before the split, so the stage's
blocks are already tensor- / context-parallel; steps 1 to 3 run on the stage as on a whole model
(``recompute_every_n`` counts the stage's blocks; a stage holding no block, ``layers_per_stage`` with a 0, is left
as it is by 1 and 2, and is one FSDP2 unit in 3). Step 3 under pp: the FSDP2 modes shard each stage (its blocks, then the stage as root) with
``reshard_after_forward=False``, and PyTorch's pipelining runtime drives their gradient sync (off for every
micro-batch but the last, then one reduce-scatter: ``PipelineStage.perform_reduce_grad``); ``no_shard`` leaves
the stage unwrapped (with ``mixed_precision=bf16`` its forward runs under autocast, as DDP's does) and
``loop.accumulate_gradients`` averages its gradients over ``dp_group`` once per step.

``config.validate`` finds every error of these keys before a process group exists.
Returns ``(model, dist_opt)``, ``dist_opt`` None for an unwrapped pipeline stage. Build the optimizer on the returned model,
then pass it through ``dist_opt.shard_optimizer(optimizer)`` (ZeRO-1 swaps in ``ZeroRedundancyOptimizer``; a no-op
otherwise).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .primitives.blocks import find_blocks
from .primitives.distributed_optimizer import (FSDP_MODES, DistributedOptimizer, autocast_forward, check_options,
                                               normalize_sharding)
from .primitives.recompute import apply_recompute_from_config
from .primitives.context_parallel import apply_context_parallel
from .primitives.tensor_parallel import apply_tensor_parallel


def apply_model_parallel(model: torch.nn.Module, cfg, *, tp_mesh=None, cp_group=None) -> torch.nn.Module:
    """Steps 0 and 0b: tensor parallelism (+ SP) over ``tp_mesh`` and context parallelism (ring attention) over
    ``cp_group``, in place (names unchanged); returns ``model``. ``parallelize`` calls it for a whole model; under
    pipeline parallelism ``train`` calls it on the whole model *before* the split, so every stage shares the
    already-sharded blocks (each block is sharded alone: the result is the same as sharding each stage)."""
    p = cfg.parallel
    tp = p.get("tp", 1)
    if tp > 1:
        if tp_mesh is None or tp_mesh.size() != tp:
            raise ValueError(f"parallel.tp={tp} needs the tp dim of the rank grid: pass "
                             "tp_mesh=ParallelState.tp_mesh")
        apply_tensor_parallel(model, tp_mesh, p.sequence_parallel, p.loss_parallel)
    cp = p.get("cp", 1)
    if cp > 1:
        if cp_group is None or dist.get_world_size(cp_group) != cp:
            raise ValueError(f"parallel.cp={cp} needs the cp dim of the rank grid: pass cp_group=ParallelState.cp_group")
        apply_context_parallel(model, cp_group, causal=True)
    return model


def parallelize(model: torch.nn.Module, cfg, dp_group=None, *, tp_mesh=None, fsdp_mesh=None, cp_group=None,
                pipeline_stage: bool = False, block_types=None, expert_parallel=None, expert_fsdp_mesh=None,
                ) -> tuple[torch.nn.Module, DistributedOptimizer | None]:
    """``cfg``: the full config (reads ``cfg.train.recompute``, ``recompute_every_n``, ``compile``, ``cfg.parallel``).
    ``tp_mesh``: ``ParallelState.tp_mesh`` (needed when ``parallel.tp > 1``). ``fsdp_mesh``:
    ``ParallelState.fsdp_mesh``, what the FSDP2 modes shard over (1-D dp x cp, or 2-D for HSDP; None: a mesh
    over ``dp_group``). ``cp_group``: ``ParallelState.cp_group`` (needed when ``parallel.cp > 1``: every block's
    attention becomes ring attention over it, before recompute; ``dp_group`` is then the dp x cp group,
    ``ParallelState.dp_cp_group``). ``pipeline_stage``: ``model`` is one stage whose blocks ``apply_model_parallel``
    already sharded. ``block_types``: the model's block classes, when ``primitives.blocks.find_blocks`` cannot find
    them. ``expert_parallel`` (``ExpertParallel``, ``parallel.ep > 1``): under FSDP2 its banks inside ``model`` are
    sharded first, over ``expert_fsdp_mesh`` (``ParallelState.expert_fsdp_mesh``)."""
    t, p = cfg.train, cfg.parallel
    if not pipeline_stage:
        apply_model_parallel(model, cfg, tp_mesh=tp_mesh, cp_group=cp_group)
    blocks = find_blocks(model, block_types)
    if blocks or not pipeline_stage:  # a whole model without blocks gets NoBlocksError naming block_types
        apply_recompute_from_config(model, t, "recompute", "recompute_every_n", block_types)
        if getattr(t, "compile", False):
            for block in blocks or [model]:
                block.compile()
    fsdp = normalize_sharding(p.sharding) in FSDP_MODES
    if pipeline_stage and not fsdp:
        # Not wrapped in DDP: PipelineStage reduces a DDP stage's gradients in the backward of each train_step's
        # last micro-batch, which fails with gradient accumulation (several train_steps per optimizer step: DDP's
        # bucket rebuild asserts) and with the split-backward schedules (zb: weight gradients never averaged; zbv,
        # dualpipev: error). A plain all-reduce over dp_group once per optimizer step works for every schedule.
        # bf16 as DDP takes it: the stage's forward under autocast, fp32 weights, gradients and all-reduce.
        if check_options(p.sharding, p.mixed_precision)[1] == "bf16":
            autocast_forward(model, next(model.parameters()).device)
        return model, None
    # A pipeline stage under FSDP2 keeps its blocks gathered from forward to backward (torchtitan's choice for pp:
    # resharding would all-gather every block again for each micro-batch); PyTorch's pipelining runtime turns the
    # gradient sync off for all but the last micro-batch and reduce-scatters once (PipelineStage.perform_reduce_grad).
    stage_kw = {"reshard_after_forward": False, "blocks_optional": True} if pipeline_stage else {}
    if expert_parallel is not None and fsdp:  # banks first: the blocks' units then take what is left
        expert_parallel.fully_shard(expert_fsdp_mesh, check_options(p.sharding, p.mixed_precision)[1],
                                    bool(p.cpu_offload), within=model,
                                    reshard_after_forward=stage_kw.get("reshard_after_forward", True))
    dist_opt = DistributedOptimizer.from_config(p, model, process_group=dp_group, optimizer_class=None,
                                                block_types=block_types, mesh=fsdp_mesh if fsdp else None,
                                                **stage_kw)
    return dist_opt.model, dist_opt


class ExpertParallel:
    """``parallel.ep > 1``: every ``MoEMLP`` of ``model`` replaced, in place, by this rank's expert-parallel shard
    (``MoEMLP.from_dense(layer, ps.ep_group)``; every rank built the same full bank from the same seed, so the shards
    are slices of one bank), and the gradient bookkeeping of the sharded banks.

    Construct it after building the model and before ``parallelize``: it marks the expert-bank parameters
    (``params``, their names ``names``) as ignored by DDP (``DistributedDataParallel.
    _set_params_and_buffers_to_ignore_for_model``), because DDP would average them over dp ranks holding *different*
    experts. The loop then calls ``reduce_grads()`` once per optimizer step, after the backward.

    Under FSDP2 (``parallel.sharding=full|shard_grad_op``) ``parallelize`` calls ``fully_shard(mesh, ...)`` first:
    each bank (``Experts`` module) becomes its own FSDP2 unit over ``ParallelState.expert_fsdp_mesh`` (the ranks
    holding the same experts; torchtitan's ``efsdp``); its reduce-scatter averages over those ``N / ep`` ranks and
    ``reduce_grads`` divides by ``ep`` more, which gives the exact gradient below (FSDP2's own divide factor would
    do it in one go, but it reduces with ``PREMUL_SUM``, which gloo lacks); the blocks' units
    (``DistributedOptimizer``) then shard the rest of each block over the whole dp mesh.

    Normalisation: with ``N`` dp ranks and the global valid-token count ``T``, rank ``r`` back-propagates its summed
    token loss ``L_r`` over ``T / N`` (``GradientAccumulation``). DDP averages replicated gradients over the ``N``
    ranks: ``(1/N) sum_r N dL_r / T = sum_r dL_r / T``, the full-batch gradient. An expert shard's gradient, through
    the all-to-all, already sums the contributions of every rank of its ep group: ``N / T * sum_{s in ep} dL_s``.
    Summing that over the expert-data-parallel group (the ``N / ep`` ranks holding the same experts, one per ep
    group) gives ``N / T * sum_s dL_s``, so the exact gradient is that sum divided by ``N`` (not ``N / ep``). With
    ``ga.mode = microbatches`` the divisor is per rank and the same argument gives the same ``N``. With context
    parallelism the ``N`` ranks are dp x cp (each holds a different part of every row; ``ParallelState.ep_ranks``
    cuts ep from them, the loss divisor and DDP/FSDP2 already count them all), and the same argument holds.

    ``norm_square()``: this rank's expert-grad squared norm summed over the ep group (each rank holds a different
    slice), so ``loop.clip_grad_norm`` clips by the whole model's norm.

    Pipeline stages (``parallel.pp > 1``): built on the whole model before the split (the stages share its
    modules, as ``apply_model_parallel``'s), then ``keep_only(stages)`` keeps the banks of this rank's stages. The ep
    and expert-dp groups are cut from the stage's own dp ranks (``ParallelState.ep_ranks``), every dp replica of a
    stage runs the same schedule, so each all-to-all pairs; a split backward (zb, zbv, dualpipev) runs them in the
    input-gradient half (the weight half starts from the expert matmuls). Plain stages: the loop's dp average of the
    stage gradients leaves the banks out (``loop.accumulate_gradients(sharded=)``) and ``reduce_grads`` reduces
    them as above; FSDP2 stages: each bank a unit inside the stage, reduce-scattered with it once per step.
    """

    def __init__(self, model: torch.nn.Module, ps):
        from torch.nn.parallel import DistributedDataParallel

        from .primitives.moe import MoEMLP

        self.ep_group, self.expert_dp_group, self.ep = ps.ep_group, ps.expert_dp_group, ps.ep
        self.dp_size = ps.dp * ps.cp  # the ranks holding different tokens (class docstring: N)
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMLP)]
        if not layers:
            raise ValueError(f"parallel.ep={ps.ep}: the model has no MoEMLP layer to shard")
        for name, layer in layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, MoEMLP.from_dense(layer, ps.ep_group))
        self.model, self.banks = model, [f"{name}.experts" for name, _ in layers]
        self.names = [f"{name}.experts.{w}" for name, _ in layers for w in ("w1", "w3", "w2")
                      if getattr(model.get_submodule(name).experts, w) is not None]
        self.fsdp, self.device = False, next(model.parameters()).device
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, self.names)

    def keep_only(self, modules) -> None:
        """Keep the banks inside ``modules`` (this rank's pipeline stages, which share the model's modules)."""
        inside = {id(m) for module in modules for m in module.modules()}
        self.banks = [b for b in self.banks if id(self.model.get_submodule(b)) in inside]
        self.names = [n for n in self.names if n.rpartition(".")[0] in self.banks]

    @property
    def params(self) -> list:
        """The bank slices, looked up by name (FSDP2 swaps in sharded parameters under the same names)."""
        return [self.model.get_parameter(n) for n in self.names]

    def fully_shard(self, mesh, mixed_precision: str | None = None, cpu_offload: bool = False, within=None,
                    reshard_after_forward: bool = True) -> None:
        """Each bank (inside ``within``, default every bank) an FSDP2 unit over ``mesh``
        (``ParallelState.expert_fsdp_mesh``), its gradients averaged over it (class docstring);
        ``mixed_precision``/``cpu_offload``/``reshard_after_forward`` as the rest of the model or stage."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
        inside = None if within is None else {id(m) for m in within.modules()}
        for name in self.banks:
            bank = self.model.get_submodule(name)
            if inside is None or id(bank) in inside:
                fully_shard(bank, mesh=mesh, mp_policy=mp, offload_policy=offload,
                            reshard_after_forward=reshard_after_forward)
        self.fsdp = True

    def reduce_grads(self) -> None:
        """Sum the expert grads over the ranks holding the same experts, divide by the dp size (class docstring);
        under FSDP2, whose reduce-scatter averaged over those ranks, divide by ep."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and self.fsdp:
            for g in grads:
                (g.to_local() if hasattr(g, "to_local") else g).div_(self.ep)
            return
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.expert_dp_group is not None:
            dist.all_reduce(flat, group=self.expert_dp_group)
        flat.div_(self.dp_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def owns(self, p) -> bool:
        """Whether ``p`` is one of the expert-bank slices (different on every rank of the ep group)."""
        return any(p is q for q in self.params)

    def norm_square(self) -> torch.Tensor:
        """Squared L2 norm of every rank's expert grads (this rank's, summed over the ep group), float64."""
        params = self.params
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if norm is not None and hasattr(norm, "full_tensor"):  # FSDP2: the bank's shards over the expert-dp mesh
            norm = norm.full_tensor()
        sq = (norm.double().square() if norm is not None
              else torch.zeros((), dtype=torch.float64, device=self.device))
        if params:  # a pipeline stage without MoE layers has none, and so has every rank of its ep group
            dist.all_reduce(sq, group=self.ep_group)
        return sq
