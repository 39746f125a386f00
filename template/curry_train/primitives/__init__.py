"""Training primitives, one module each. They import only torch: plain arguments plus ``from_config``."""

from .blocks import NoBlocksError, find_blocks, require_blocks
from .checkpoint import Checkpointer
from .context_parallel import ContextParallel, apply_context_parallel, ring_attention
from .distributed_optimizer import DistributedOptimizer
from .grad_accum import GradientAccumulation
from .loss_spike import LossSpikeWatchdog
from .model_io import count_target_tokens, forward_loss_sum
from .moe import Experts, MoEMLP, TopKRouter
from .parallel_state import ParallelState
from .pipeline import PipelineSchedule
from .recompute import Recompute, activation_memory, apply_recompute
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear, apply_tensor_parallel

__all__ = ["Checkpointer", "DistributedOptimizer", "Recompute", "activation_memory", "apply_recompute",
           "GradientAccumulation", "count_target_tokens", "forward_loss_sum", "ParallelState", "PipelineSchedule",
           "find_blocks", "require_blocks", "NoBlocksError", "ContextParallel", "apply_context_parallel",
           "ring_attention", "TopKRouter", "Experts", "MoEMLP", "ColumnParallelLinear", "RowParallelLinear",
           "apply_tensor_parallel", "LossSpikeWatchdog"]
