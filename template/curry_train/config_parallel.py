"""The parallel half of ``config.validate``: the rank grid, data-parallel sharding and its FSDP2 levers, tensor,
context, expert and pipeline parallelism, checked against each other and the model with no process group.

``check_parallel(cfg, world_size, n_layer)`` runs every check (``validate`` calls it); the others are its parts,
also used on their own (``train`` takes ``pipeline_settings`` from here, ``parallelize``'s tests
``check_parallelize_config``). ``model_shapes`` (``user_model.build_model_shapes``) builds the model on the meta
device for the layout checks.
"""

from omegaconf import DictConfig

from .data import check_batch_split
from .primitives._checks import boolean, non_negative_int, positive_int, prefixed
from .primitives._config import config_get as get_key, config_getter
from .primitives.distributed_optimizer import FSDP_MODES, check_lever_limits, check_options, normalize_sharding
from .primitives.parallel_state import ParallelState
from .primitives.pipeline.schedule import layer_split
from .primitives.pipeline.sim import check_schedule, default_stages_per_rank, normalize_kind
from .primitives.recompute import check_recompute_config
from .primitives.tensor_parallel import check_tensor_parallel, tp_layout
from .user_model import build_model_shapes as model_shapes  # noqa: F401  (re-exported by config)
from .user_model import user_target


def _check_expert_parallel(cfg, dp: int) -> None:
    """``parallel.ep > 1``: the reference GPT's MoE layers, experts divisible by ep, DDP, ZeRO-1 (the slices' state
    sharded over the ranks holding the same experts: ``primitives.zero1``) or FSDP2, plain or FSDP2 pipeline stages,
    with or without cp (ep cut from each stage's dp x cp ranks; not with tp: ``check_parallel``; ep dividing dp x cp
    is checked with the grid, ``ParallelState.sizes_from_config``). Checkpoints store the whole expert bank
    (``primitives.checkpoint_experts``, FSDP2-sharded slices included) and load at any layout."""
    p = cfg.parallel
    ep = positive_int("parallel.ep", p.ep)
    if ep == 1:
        return
    experts = None if user_target(cfg.model) is not None else cfg.model.get("moe_experts")
    if not experts:
        raise ValueError(f"parallel.ep={ep} shards the experts of MoE layers: use model=moe (model.moe_experts > 0), "
                         "or parallel.ep=1")
    if experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide model.moe_experts={experts}")


def check_parallel(cfg, world_size: int, n_layer: int) -> None:
    """Every ``parallel.*`` check, and how the grid fits ``train.batch_size`` and the model's ``n_layer`` blocks."""
    p = cfg.parallel
    dp = data_parallel_size(cfg, world_size)
    check_context_parallel_config(cfg)
    _check_expert_parallel(cfg, dp)
    if p.ep > 1 and p.tp > 1:
        raise ValueError(f"parallel.ep={p.ep} with parallel.tp={p.tp}: expert parallelism is not combined with tensor "
                         "parallelism (ep groups are cut from the dp x cp ranks of one tp rank, untested with tp > 1); "
                         "use parallel.ep=1 (the experts then stay whole on every tp rank) or parallel.tp=1")
    check_batch_split(cfg.train.batch_size, dp, cfg.train.gradient_accumulation_steps)
    check_parallelize_config(cfg, world_size)
    if n_layer and normalize_sharding(p.sharding) in FSDP_MODES:  # the FSDP2 levers against the block count
        check_lever_limits(n_layer, p.fsdp_prefetch, p.fsdp_blocks_per_unit, prefix="parallel.fsdp_")
    check_tensor_parallel_config(cfg, world_size)
    with prefixed("parallel.pp_schedule: "):
        normalize_kind(p.pp_schedule)
    positive_int("parallel.n_microbatches", p.n_microbatches)
    if p.pp_stages_per_rank is not None:
        positive_int("parallel.pp_stages_per_rank", p.pp_stages_per_rank, "or null (= the schedule's default)")
    try:
        for count in p.layers_per_stage or []:
            non_negative_int("count", count)
    except ValueError:
        raise ValueError(f"parallel.layers_per_stage must be a list of integers >= 0 (blocks per stage) or null "
                         f"(= an even split), got {list(p.layers_per_stage)}") from None
    if p.pp > 1:
        if cfg.train.loss is not None:
            raise ValueError(f"train.loss is not supported with parallel.pp={p.pp} (the last stage's logits go "
                             "through the token loss); use train.loss=null or parallel.pp=1")
        pipeline_settings(cfg, world_size, dp, n_layer)  # schedule kind, micro-batches vs stages, layer split


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """Ranks that hold different rows of the batch: the world size over the model-parallel dims.

    The whole rank grid (``parallel.dp/pp/cp/tp/order``) is checked here, without a process group, by
    ``ParallelState.resolve_sizes``: a grid whose product is not the world size is an error naming every size.
    """
    return ParallelState.sizes_from_config(cfg.parallel, world_size)["dp"]


def check_parallelize_config(cfg, world_size: int = 1) -> None:
    """Every config error ``parallelize`` would raise (``train.recompute*``, ``parallel.sharding`` /
    ``mixed_precision`` / ``cpu_offload``), found without a model or a process group."""
    with prefixed("train."):
        check_recompute_config(cfg.train, "recompute", "recompute_every_n")
    p = cfg.parallel
    with prefixed("parallel."):
        sharding, _ = check_options(p.sharding, p.mixed_precision, p.cpu_offload, prefetch=p.fsdp_prefetch,
                                    reshard_last=p.fsdp_reshard_last, blocks_per_unit=p.fsdp_blocks_per_unit,
                                    lever_prefix="fsdp_")
    rep = positive_int("parallel.dp_replicate", get_key(p, "dp_replicate", 1))
    if rep > 1 and sharding not in FSDP_MODES:
        raise ValueError(f"parallel.dp_replicate={rep} replicates FSDP2 shards (HSDP) and needs parallel.sharding=full "
                         f"or shard_grad_op, got {sharding}; with DDP/ZeRO-1 use parallel.dp alone")
    if sharding != "no_shard" and world_size <= 1:
        raise ValueError(
            f"parallel.sharding={sharding} shards over data-parallel ranks: launch with "
            f"`torchrun --nproc-per-node N -m curry_train train parallel.sharding={sharding}` (N >= 2), "
            "or use parallel.sharding=no_shard in one process"
        )


def check_tensor_parallel_config(cfg, world_size: int) -> None:
    """``parallel.tp`` / ``sequence_parallel`` / ``loss_parallel`` against the rest of the config and the model, with
    no process group: the model is built on the meta device (no memory) and its layout, head counts and widths
    checked (``primitives.tensor_parallel.check_tensor_parallel``)."""
    p = cfg.parallel
    tp = positive_int("parallel.tp", p.tp)
    sp = boolean("parallel.sequence_parallel", p.sequence_parallel)
    lp = boolean("parallel.loss_parallel", p.loss_parallel)
    if tp == 1:
        for key, on in (("sequence_parallel", sp), ("loss_parallel", lp)):
            if on:
                raise ValueError(f"parallel.{key}=true splits tensor-parallel activations and needs parallel.tp > 1, "
                                 "got parallel.tp=1")
        return
    dp = data_parallel_size(cfg, world_size)
    with prefixed("parallel."):
        sharding, _ = check_options(p.sharding, p.mixed_precision, p.cpu_offload)
    if sharding == "zero1" or (sharding == "no_shard" and dp > 1):
        raise ValueError(f"parallel.sharding={sharding} with parallel.tp={tp} and dp={dp}: DDP and ZeRO-1 do not take "
                         "tensor-parallel (DTensor) parameters; use parallel.sharding=full or shard_grad_op (FSDP2 on "
                         "the dp dim of the dp x tp mesh), or no_shard with dp=1")
    if sp and cfg.train.seq_len % tp:
        raise ValueError(f"parallel.sequence_parallel=true splits each sequence over parallel.tp={tp} ranks: "
                         f"train.seq_len={cfg.train.seq_len} must be divisible by {tp}")
    if lp and cfg.train.loss is not None:
        raise ValueError("parallel.loss_parallel=true computes the token loss on vocabulary-sharded logits; "
                         "train.loss (your loss) takes plain logits: set parallel.loss_parallel=false or "
                         "train.loss=null")
    if user_target(cfg.model) is None and cfg.model.dropout > 0:
        raise ValueError(f"parallel.tp={tp} with model.dropout={cfg.model.dropout} > 0: the tp ranks would draw the "
                         "same dropout masks for different heads and tokens (no per-rank RNG); set model.dropout=0")
    model = model_shapes(cfg)
    try:
        tp_layout(model)
    except ValueError as e:
        raise ValueError(f"parallel.tp={tp}: {e}") from None
    with prefixed("parallel."):
        check_tensor_parallel(model, tp, sp, lp)


def check_context_parallel_config(cfg) -> None:
    """``parallel.cp > 1`` against the rest of the config and the model, with no process group: the sequence splits
    into ``2 * cp`` chunks, attention is ring attention (no dropout inside it), the model must take global positions
    (``context_batches.position_keyword``); with pp every stage gets them (``stages``)."""
    p = cfg.parallel
    cp = positive_int("parallel.cp", p.cp)
    if cp == 1:
        return
    if cfg.train.seq_len % (2 * cp):
        raise ValueError(f"parallel.cp={cp} cuts each sequence into 2 * cp = {2 * cp} chunks (causal load balancing): "
                         f"train.seq_len={cfg.train.seq_len} must be divisible by {2 * cp}")
    if p.tp > 1 and p.sequence_parallel and (cfg.train.seq_len // cp) % p.tp:
        raise ValueError(f"parallel.cp={cp} with parallel.sequence_parallel=true: each rank's "
                         f"train.seq_len / cp = {cfg.train.seq_len // cp} tokens must be divisible by parallel.tp="
                         f"{p.tp}")
    if cfg.train.loss is not None:
        raise ValueError(f"parallel.cp={cp}: train.loss (your loss) takes whole (x, y) rows, but each rank holds "
                         f"1/{cp} of every row; use train.loss=null (the token loss on the model's logits)")
    if user_target(cfg.model) is None and cfg.model.dropout > 0:
        raise ValueError(f"parallel.cp={cp} with model.dropout={cfg.model.dropout} > 0: ring attention has no "
                         "attention dropout; set model.dropout=0")
    from .context_batches import position_keyword

    try:
        position_keyword(model_shapes(cfg))
    except ValueError as e:
        raise ValueError(f"parallel.cp={cp}: {e}") from None


def pipeline_settings(cfg, world_size: int, dp_size: int = 1, n_layer: int | None = None) -> dict:
    """Check the pipeline config without a process group; returns kind, pp, v, n_microbatches, layers_per_stage.

    ``n_layer``: the model's blocks (``user_model.ModelInfo.n_layer``); None = ``model.n_layer`` of the GPT."""
    p = cfg.parallel
    get = config_getter(p)
    with prefixed("parallel.pp_schedule: "):
        kind = normalize_kind(p.pp_schedule)
    v = get("pp_stages_per_rank", None)
    v = default_stages_per_rank(kind) if v is None else v
    try:
        check_schedule(kind, p.pp, p.n_microbatches, v)
    except ValueError as e:
        raise ValueError(f"parallel.pp_schedule={kind}, parallel.pp={p.pp}, parallel.n_microbatches="
                         f"{p.n_microbatches}: {e}") from None
    if get("fsdp_reshard_last", False):
        raise ValueError(f"parallel.fsdp_reshard_last=true with parallel.pp={p.pp}: FSDP2 stages keep every unit "
                         "gathered from forward to backward already; use parallel.fsdp_reshard_last=false")
    layers = get("layers_per_stage", None)
    layers = list(layers) if layers is not None else None
    target = user_target(cfg.model)
    if target is not None and not n_layer:
        raise ValueError(f"parallel.pp={p.pp} divides the model's blocks over stages, but model._target_={target} "
                         "has none that were found (an nn.ModuleList / nn.ModuleDict of same-class modules)")
    with prefixed("parallel." if layers is not None else ""):  # layer_split names layers_per_stage or model.n_layer
        layer_split(cfg.model.n_layer if target is None else n_layer, p.pp * v, layers)
    t = cfg.train
    rows = t.batch_size // dp_size // t.gradient_accumulation_steps
    if rows % p.n_microbatches:
        raise ValueError(
            f"train.batch_size={t.batch_size} / dp {dp_size} / train.gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps} = {rows} rows per pipeline step, not divisible by "
            f"parallel.n_microbatches={p.n_microbatches}"
        )
    return {"kind": kind, "pp": p.pp, "v": v, "n_microbatches": p.n_microbatches, "layers_per_stage": layers}
