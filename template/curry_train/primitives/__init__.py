"""Training primitives, one module each. They import only torch: plain arguments plus ``from_config``."""

from .grad_accum import GradientAccumulation

__all__ = ["GradientAccumulation"]
