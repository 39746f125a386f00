"""What every ``from_config`` shares: read a key from a mapping (dict, OmegaConf ``DictConfig``) or an attribute object.

Primitives take plain arguments; ``from_config`` only looks keys up, so they never import Hydra or OmegaConf.
"""

from __future__ import annotations

from functools import partial


def config_get(cfg, key: str, default=None):
    """``cfg[key]`` for mappings, ``cfg.key`` otherwise; ``default`` when absent."""
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def config_getter(cfg):
    """``get(key, default=None)`` bound to ``cfg``."""
    return partial(config_get, cfg)
