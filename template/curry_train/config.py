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

CONF_DIR = Path(__file__).parent / "conf"


def load_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ``ValueError``/``FileNotFoundError`` naming the bad key and what is allowed."""
    from .data import check_batch_split
    from .model import GPTConfig
    from .parallelize import check_config as check_parallel_config
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
    check_parallel_config(cfg, world_size)  # train.recompute*, parallel.sharding / mixed_precision / cpu_offload
    if cfg.parallel.pp > 1:
        from .pipeline_train import pipeline_settings

        pipeline_settings(cfg, world_size, dp)  # schedule kind, micro-batches vs stages, layer split


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """Ranks that hold different rows of the batch: the world size over the model-parallel dims.

    The whole rank grid (``parallel.dp/pp/cp/tp/order``) is checked here, without a process group, by
    ``ParallelState.resolve_sizes``: a grid whose product is not the world size is an error naming every size.
    """
    from .primitives.parallel_state import ParallelState

    return ParallelState.sizes_from_config(cfg.parallel, world_size)["dp"]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
