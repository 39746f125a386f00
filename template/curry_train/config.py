"""Hydra config: compose ``conf/config.yaml`` with command-line overrides, then validate it.

We use Hydra's compose API rather than ``@hydra.main``: no working-directory change, no ``outputs/``
folder, and the same call works from the CLI, tests and benchmarks. Composed configs are in struct mode,
so an override of a key that does not exist (``train.step=5``) is a Hydra error, and ``model=nope``
lists the available models.

``validate(cfg, world_size)`` checks everything that can be checked *before* a process group starts, so
bad input fails in one process with one message instead of hanging N.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from .primitives._config import config_getter
from .primitives.distributed_optimizer import check_options
from .primitives.pipeline.schedule import layer_split
from .primitives.pipeline.sim import check_schedule, default_stages_per_rank, normalize_kind
from .primitives.recompute import check_recompute_config

CONF_DIR = Path(__file__).parent / "conf"


def load_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ValueError``/``FileNotFoundError`` naming the bad key and what is allowed."""
    from .data import check_batch_split
    from .model import GPTConfig
    from .primitives import GradientAccumulation

    GPTConfig.from_config(cfg.model)
    try:
        GradientAccumulation.from_config(cfg.train)
    except ValueError as e:
        raise ValueError(f"train.{e}") from None
    t = cfg.train
    for key in ("steps", "batch_size", "seq_len"):
        value = t[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
    if t.seq_len > cfg.model.block_size:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.block_size={cfg.model.block_size}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {cfg.device!r}")
    if cfg.data.path is not None and not Path(str(cfg.data.path)).expanduser().is_file():
        raise FileNotFoundError(f"data.path={cfg.data.path!r}: no such file")
    dp = data_parallel_size(cfg, world_size)
    check_batch_split(t.batch_size, dp, t.gradient_accumulation_steps)
    check_parallelize_config(cfg, world_size)
    if cfg.parallel.pp > 1:
        pipeline_settings(cfg, world_size, dp)  # schedule kind, micro-batches vs stages, layer split


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """Ranks that hold different rows of the batch: the world size over the model-parallel dims.

    The whole rank grid (``parallel.dp/pp/cp/tp/order``) is checked here, without a process group, by
    ``ParallelState.resolve_sizes``: a grid whose product is not the world size is an error naming every size.
    """
    from .primitives.parallel_state import ParallelState

    return ParallelState.sizes_from_config(cfg.parallel, world_size)["dp"]


def check_parallelize_config(cfg, world_size: int = 1) -> None:
    """Every config error ``parallelize`` would raise (``train.recompute*``, ``parallel.sharding`` /
    ``mixed_precision`` / ``cpu_offload``), found without a model or a process group."""
    try:
        check_recompute_config(cfg.train, "recompute", "recompute_every_n")
    except ValueError as e:
        raise ValueError(f"train.{e}") from None
    p = cfg.parallel
    try:
        sharding, _ = check_options(p.sharding, p.mixed_precision, p.cpu_offload)
    except ValueError as e:
        raise ValueError(f"parallel.{e}") from None
    if sharding != "no_shard" and world_size <= 1:
        raise ValueError(
            f"parallel.sharding={sharding} shards over data-parallel ranks: launch with "
            f"`torchrun --nproc-per-node N -m curry_train train parallel.sharding={sharding}` (N >= 2), "
            "or use parallel.sharding=no_shard in one process"
        )


def pipeline_settings(cfg, world_size: int, dp_size: int = 1) -> dict:
    """Check the pipeline config without a process group; returns kind, pp, v, n_microbatches, layers_per_stage."""
    p = cfg.parallel
    get = config_getter(p)
    kind = normalize_kind(p.pp_schedule)
    v = get("pp_stages_per_rank", None)
    v = default_stages_per_rank(kind) if v is None or kind in ("gpipe", "1f1b") else v
    try:
        check_schedule(kind, p.pp, p.n_microbatches, v)
    except ValueError as e:
        raise ValueError(f"parallel.pp_schedule={kind}, parallel.pp={p.pp}, parallel.n_microbatches="
                         f"{p.n_microbatches}: {e}") from None
    for key, ok in (("sharding", ("no_shard",)), ("mixed_precision", (None, "fp32")), ("cpu_offload", (False,))):
        if get(key, ok[0]) not in ok:
            raise ValueError(f"parallel.{key}={get(key)!r} is not supported with parallel.pp={p.pp} yet "
                             f"(pipeline stages are not wrapped in DDP/FSDP); use parallel.{key}={ok[0]}")
    layers = get("layers_per_stage", None)
    layer_split(cfg.model.n_layer, p.pp * v, list(layers) if layers is not None else None)
    t = cfg.train
    rows = t.batch_size // dp_size // t.gradient_accumulation_steps
    if rows % p.n_microbatches:
        raise ValueError(
            f"train.batch_size={t.batch_size} / dp {dp_size} / train.gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps} = {rows} rows per pipeline step, not divisible by "
            f"parallel.n_microbatches={p.n_microbatches}"
        )
    return {"kind": kind, "pp": p.pp, "v": v, "n_microbatches": p.n_microbatches,
            "layers_per_stage": list(layers) if layers is not None else None}


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
