"""Pipeline parallelism: ``schedule`` runs any ``torch.distributed.pipelining`` schedule over a model's stages,
``sim`` simulates the schedules' action lists (bubble, timelines), ``gpipe_early_recv`` is GPipe with its receives
posted one micro-batch ahead, ``early_recv`` moves the receives up in the other kinds' lowered action lists (and
checks such lists without processes). Splitting a model into stages knows its layout, so it lives outside primitives (``curry_train.stages.split_model``)."""

from .schedule import PipelineSchedule, layer_split
from .sim import KINDS, Timeline, analytic_bubble, bubble_table, check_schedule, simulate

__all__ = ["KINDS", "PipelineSchedule", "Timeline", "analytic_bubble", "bubble_table", "check_schedule",
           "layer_split", "simulate"]
