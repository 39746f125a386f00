"""Training primitives, one module each. They import only torch: plain arguments plus ``from_config``."""

from .checkpoint import Checkpointer
from .distributed_optimizer import DistributedOptimizer
from .grad_accum import GradientAccumulation
from .parallel_state import ParallelState
from .pipeline import PipelineSchedule
from .recompute import Recompute, activation_memory, apply_recompute

__all__ = ["Checkpointer", "DistributedOptimizer", "Recompute", "activation_memory", "apply_recompute", "GradientAccumulation", "ParallelState", "PipelineSchedule"]
