"""Workflow stage tools, one module each: ``preflight`` (stage 1), ``grad_flow`` (stage 2), ``lr_range``, ``kill`` and
``ablate`` (stage 3). They build on the package's pieces (loop, data, config, user_model, primitives), never on the
``train`` driver; nothing in ``primitives`` imports them. ``common`` holds what they share."""

from .ablate import AblationResult, ablate, paired_t_test, student_t_sf, train_run, welch_t_test
from .grad_flow import GradFlow
from .kill import KillCriterion, KillDecision, KillRun, curve_from_history
from .lr_range import LRRangeResult, lr_range_main, lr_range_test
from .preflight import PreflightReport, preflight, preflight_main

__all__ = ["AblationResult", "GradFlow", "KillCriterion", "KillDecision", "KillRun", "LRRangeResult",
           "PreflightReport", "ablate", "curve_from_history", "lr_range_main", "lr_range_test", "paired_t_test",
           "preflight", "preflight_main", "student_t_sf", "train_run", "welch_t_test"]
