"""ZeRO-1 optimizers (``torch.distributed.optim.ZeroRedundancyOptimizer``), with expert parallelism too.

``zero1_optimizer(optimizer, group)`` rebuilds ``optimizer`` (its class, param groups and settings) inside one
``ZeroRedundancyOptimizer`` over ``group``: each parameter's state lives on one rank of the group, which updates it
and broadcasts the new value to the others.

Expert parallelism (``expert_params``: this rank's expert-bank slices, ``expert_group``: the ranks holding the same
experts, ``ParallelState.expert_dp_group``) needs two: a slice differs between the ranks of ``group`` (the dp
ranks), so broadcasting it over them would overwrite the other ranks' experts. The dense parameters' state is
sharded over ``group`` (``N`` ranks: ~1/N of a replica's each), the slices' over ``expert_group`` (``N / ep``
ranks: ~ep/N of the ``E/ep`` experts' state each; with ``expert_group=None``, one such rank, a plain optimizer of
the same class). Their gradients must already be equal within each group (DDP for the dense ones,
``ExpertParallel.reduce_grads`` for the slices). ``ShardedOptimizers`` steps, zeroes and schedules the two as one.

Checkpoints read and write the plain optimizers that hold this rank's state (``local_optimizers``): DCP's
``get_state_dict`` / ``set_state_dict`` take them as a list, keyed per parameter FQN.
"""

from __future__ import annotations

import inspect

import torch


class ShardedOptimizers(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, one to the loop: ``step`` and ``zero_grad`` call each in turn, and
    ``param_groups`` is the list of their param-group dicts (the same objects: an LR scheduler or
    ``apply_optimizer_settings`` writing ``lr`` there sets it for the optimizer that owns the group).

    The state lives in ``optimizers`` (``local_optimizers`` gives the plain ones that hold it); ``state_dict`` /
    ``load_state_dict`` of the composite are refused, checkpoints go through DCP (``checkpoint_state``)."""

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)
        super().__init__([p for o in self.optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedOptimizers.step takes no closure (each optimizer would re-run it)")
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        raise TypeError("ShardedOptimizers has no single state_dict: checkpoint it with get_state_dict(model, "
                        "local_optimizers(optimizer)) (primitives.checkpoint_state.training_state)")

    def load_state_dict(self, state_dict) -> None:
        raise TypeError("ShardedOptimizers has no single state_dict: load it with set_state_dict(model, "
                        "local_optimizers(optimizer), ...) (primitives.checkpoint_load)")


def _is_zero(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def zero1_wrappers(optimizer) -> list:
    """The ``ZeroRedundancyOptimizer``s inside ``optimizer`` (itself, or the parts of a ``ShardedOptimizers``)."""
    parts = optimizer.optimizers if isinstance(optimizer, ShardedOptimizers) else [optimizer]
    return [o for o in parts if _is_zero(o)]


def local_optimizers(optimizer) -> tuple:
    """The plain optimizers holding this rank's state: a ``ZeroRedundancyOptimizer``'s ``.optim`` (this rank's
    partition), each part of a ``ShardedOptimizers``, or ``optimizer`` itself."""
    parts = optimizer.optimizers if isinstance(optimizer, ShardedOptimizers) else [optimizer]
    return tuple(o.optim if _is_zero(o) else o for o in parts)


def zero1_optimizer(optimizer: torch.optim.Optimizer, group, expert_params=(), expert_group=None):
    """``optimizer``'s class, param groups and settings as ZeRO-1 over ``group``; with ``expert_params``, those
    split off into a second optimizer over ``expert_group`` and the two joined in ``ShardedOptimizers`` (module
    docstring). Param groups left without parameters by the split are dropped."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters  # AdamW.defaults holds keys AdamW() rejects
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    experts = {id(p) for p in expert_params}

    def groups(expert: bool) -> list[dict]:
        out = []
        for g in optimizer.param_groups:
            params = [p for p in g["params"] if (id(p) in experts) == expert]
            if params:
                out.append({**{k: v for k, v in g.items() if k in accepted}, "params": params})
        return out

    dense = ZeroRedundancyOptimizer(groups(False), optimizer_class=cls, process_group=group, **defaults)
    if not experts:
        return dense
    sliced = (ZeroRedundancyOptimizer(groups(True), optimizer_class=cls, process_group=expert_group, **defaults)
              if expert_group is not None else cls(groups(True), **defaults))
    return ShardedOptimizers([dense, sliced])


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer state this rank holds (every tensor of every local optimizer's state)."""
    total = 0
    for local in local_optimizers(optimizer):
        for s in local.state.values():
            for v in s.values():
                if torch.is_tensor(v):
                    v = v.to_local() if hasattr(v, "to_local") else v
                    total += v.numel() * v.element_size()
    return total
