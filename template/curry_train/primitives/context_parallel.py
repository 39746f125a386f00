"""Context parallelism (CP): ``cp`` ranks share every sequence, each holding ``N/cp`` of its tokens (two of ``2*cp``
chunks, head and tail, so a causal mask gives every rank the same work: ``shard_sequence``, ``positions``).
Everything outside attention (projections, norms, MLPs, the loss) is per token and runs on the local tokens
unchanged; attention over the whole sequence is ring attention (``ring_attention.py``: the algorithm, its exact
backward, its memory and communication formulas).

Wrapping a model. ``ContextParallel.wrap(attention, cp_group)`` runs ``attention``'s forward with every
``torch.nn.functional.scaled_dot_product_attention`` call in it replaced by ``ring_attention``: a
``torch.overrides.TorchFunctionMode`` active only during that forward (PyTorch's own context parallel swaps the
same function, by monkey-patching ``F.scaled_dot_product_attention`` while its context manager is open; a mode is
scoped to the wrapped forward and leaves other modules alone). It re-classes the module in place (like
``Recompute``), so parameter names and state-dict keys do not change.
``apply_context_parallel(model, cp_group)`` wraps every transformer block found by ``primitives.blocks``.
Calls with an explicit ``attn_mask`` (a dense mask cannot be sharded this way) or ``dropout_p > 0`` raise
``ValueError``. Apply context parallelism before activation recompute: a recompute *inside* the wrapped module
would re-run attention in backward without the ring (checked).

Two implementations (``implementation=``). ``"ring"`` (the default, any device and backend) is
``ring_attention.ring_attention``: P2P K/V transfers, tested on CPU with gloo. ``"torch"`` is PyTorch's own ring
attention from ``torch.distributed.tensor.experimental`` (the DTensor SDPA dispatcher that
``context_parallel(...)`` installs: the local q/k/v become ``Shard(2)`` DTensors on a mesh over ``cp_group`` and the
fused CUDA flash / efficient / cuDNN kernels run per block). It needs CUDA tensors: torch 2.13 registers no sharding
strategy for the CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``), so it is refused for a module
whose parameters are not on CUDA. Both use the same head-tail layout (PyTorch's ``_HeadTailLoadBalancer``), so
``shard_sequence``/``positions`` serve both; the ``"torch"`` path switches PyTorch's dispatcher on for the process
(as torchtitan does) and sets its global ``enable_load_balance`` to ``causal and load_balance``.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._checks import boolean, choice
from .blocks import find_blocks, reclass
from .ring_attention import (KERNELS, _group_size_rank, chunk_ids, positions, ring_attention, ring_bytes_per_forward,
                             shard_sequence, track_communication, unshard_sequence)

__all__ = ["ContextParallel", "apply_context_parallel", "IMPLEMENTATIONS", "KERNELS", "chunk_ids", "positions",
           "ring_attention", "ring_bytes_per_forward", "shard_sequence", "track_communication", "unshard_sequence"]

PATTERNS = ("ring",)
PATTERN_NOTE = "(double_ring, a two-level ring over intra- and inter-node groups, is not implemented)"
IMPLEMENTATIONS = ("ring", "torch")


# -- wrapping attention modules -------------------------------------------------------------------------------------

def _torch_ring_attention(mesh, query, key, value, causal: bool, scale):
    """PyTorch's ring attention on CUDA: local q/k/v ``[B, H, N/cp, D]`` as ``Shard(2)`` DTensors on ``mesh``
    through ``F.scaled_dot_product_attention`` (dispatched to ``_scaled_dot_product_ring_*_attention`` by the
    context-parallel dispatcher, on in forward and backward); K/V heads repeated for GQA first."""
    from torch.distributed.tensor import DTensor, Shard

    if key.size(1) != query.size(1):
        key, value = (t.repeat_interleave(query.size(1) // t.size(1), dim=1) for t in (key, value))
    q, k, v = (DTensor.from_local(t.contiguous(), mesh, (Shard(2),), run_check=False) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).to_local()


def _torch_cp_mesh(module: nn.Module, cp_group, causal: bool, load_balance: bool):
    """The 1-D CUDA mesh over ``cp_group`` for ``implementation="torch"``; switches PyTorch's CP dispatcher on."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp

    devices = {p.device.type for p in module.parameters()} or {"cpu"}
    if devices != {"cuda"}:
        raise ValueError(
            f"ContextParallel(implementation='torch') needs the module on CUDA (its parameters are on "
            f"{', '.join(sorted(devices))}): torch 2.13 has no sharding strategy for the CPU flash-attention kernel; "
            "use implementation='ring' (any device)")
    balance = bool(causal and load_balance)
    if getattr(torch_cp, "_curry_train_balance", balance) != balance:
        raise ValueError("ContextParallel(implementation='torch'): PyTorch's enable_load_balance is global, and "
                         "another module was wrapped with a different causal/load_balance; use one setting")
    torch_cp._cp_options.enable_load_balance = torch_cp._curry_train_balance = balance
    torch_cp._enable_context_parallel_dispatcher()
    return DeviceMesh.from_group(cp_group, "cuda")


class _RingSDPA(TorchFunctionMode):
    """While active: ``F.scaled_dot_product_attention(q, k, v, ...)`` -> ring attention over ``group`` (ours, or
    PyTorch's on ``torch_mesh`` when given)."""

    def __init__(self, group, causal: bool, load_balance: bool, torch_mesh=None):
        super().__init__()
        self.group, self.causal, self.load_balance, self.torch_mesh = group, causal, load_balance, torch_mesh

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        if attn_mask is not None:
            raise ValueError(
                f"ContextParallel: the attention passed attn_mask (a {tuple(attn_mask.shape)} tensor) to "
                "scaled_dot_product_attention; a dense mask cannot be sharded by ring attention. Call it with "
                "attn_mask=None and is_causal=True (or False for bidirectional attention; for Hugging Face models: "
                "no padding mask, e.g. packed sequences)")
        if dropout_p:
            raise ValueError(f"ContextParallel: attention dropout_p={dropout_p} is not supported by ring attention "
                             "(its backward recomputes the probabilities); set the attention dropout to 0")
        if bool(is_causal) != self.causal:
            raise ValueError(
                f"ContextParallel was built with causal={self.causal} but the attention called "
                f"scaled_dot_product_attention(is_causal={bool(is_causal)}); wrap it with causal={bool(is_causal)}")
        if query.size(1) != key.size(1) and not enable_gqa:
            raise ValueError(f"scaled_dot_product_attention: {query.size(1)} query heads and {key.size(1)} key/value "
                             "heads need enable_gqa=True")
        if self.torch_mesh is not None:
            return _torch_ring_attention(self.torch_mesh, query, key, value, self.causal, scale)
        return ring_attention(query, key, value, self.group, causal=self.causal, scale=scale,
                              load_balance=self.load_balance)


class _GroupRef:
    """Holds the process group (or mesh); ``copy.deepcopy`` of a wrapped model shares it instead of copying it."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


def _check_not_recomputed(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if getattr(m, "recompute_enabled", False) or type(m).__name__ == "CheckpointWrapper":
            where = "it" if not name else f"its submodule {name!r}"
            raise ValueError(
                f"{type(module).__name__}: {where} runs under activation recompute, which re-runs attention in "
                "backward outside the context-parallel forward (without the ring). Apply context parallelism "
                "first, then recompute (apply_context_parallel before apply_recompute)")


class ContextParallel(nn.Module):
    """Run a module's forward with every ``F.scaled_dot_product_attention`` in it computed by ring attention.

    ``ContextParallel.wrap(inner_attention, cp_group, pattern="ring", causal=True, load_balance=True)`` re-classes
    ``inner_attention`` in place to ``ContextParallel<Class>`` and returns it (``state_dict`` keys and parameter
    names unchanged; ``isinstance`` of both classes holds). Its inputs are this rank's token shard
    (``shard_sequence``), its outputs are this rank's shard of what the unwrapped module gives on the whole
    sequence. SDPA calls must pass ``is_causal=causal``, no ``attn_mask`` and ``dropout_p=0`` (else
    ``ValueError``). A ``cp_group`` of size 1 runs the plain forward. ``pattern``: only ``"ring"``.
    ``implementation``: ``"ring"`` (ours, any device) or ``"torch"`` (PyTorch's, CUDA only; see the module).
    """

    _reclasses_in_place = True  # primitives.blocks.block_class sees through it

    def __new__(cls, inner_attention: nn.Module | None = None, *args, **kwargs):
        if inner_attention is None:  # copy.deepcopy / unpickling
            return super().__new__(cls)
        if not isinstance(inner_attention, nn.Module):
            raise ValueError(f"ContextParallel needs an nn.Module, got {type(inner_attention).__name__}")
        cp_group, pattern, causal, load_balance, implementation = _wrap_args(*args, **kwargs)
        choice("pattern", pattern, PATTERNS, PATTERN_NOTE)
        choice("implementation", implementation, IMPLEMENTATIONS)
        boolean("causal", causal)
        boolean("load_balance", load_balance)
        size, _ = _group_size_rank(cp_group)
        _check_not_recomputed(inner_attention)
        if implementation == "torch" and size > 1:
            inner_attention._cp_torch_mesh = _GroupRef(_torch_cp_mesh(inner_attention, cp_group, causal,
                                                                          load_balance))
        return reclass(inner_attention, ContextParallel)

    def __init__(self, inner_attention: nn.Module | None = None, cp_group=None, pattern: str = "ring",
                 causal: bool = True, load_balance: bool = True, implementation: str = "ring"):
        # ``self`` is ``inner_attention`` (see __new__): nn.Module.__init__ must not run again.
        self._cp_group = _GroupRef(cp_group)
        self.cp_size, self.cp_rank = _group_size_rank(cp_group)
        self.cp_pattern, self.cp_causal, self.cp_load_balance = pattern, causal, load_balance
        self.cp_implementation = implementation
        self._cp_torch_mesh = getattr(self, "_cp_torch_mesh", None) or _GroupRef(None)

    @classmethod
    def wrap(cls, inner_attention: nn.Module, cp_group, pattern: str = "ring", causal: bool = True,
             load_balance: bool = True, implementation: str = "ring") -> nn.Module:
        """``inner_attention``, re-classed so its forward runs ring attention over ``cp_group`` (see the class)."""
        return cls(inner_attention, cp_group, pattern, causal, load_balance, implementation)

    @property
    def cp_group(self):
        return self._cp_group.group

    def forward(self, *args, **kwargs):
        inner = super(ContextParallel, self).forward  # the module's own forward (next class in the MRO)
        if self.cp_size == 1:
            return inner(*args, **kwargs)
        with _RingSDPA(self.cp_group, self.cp_causal, self.cp_load_balance, self._cp_torch_mesh.group):
            return inner(*args, **kwargs)

    def extra_repr(self) -> str:
        parent = super().extra_repr()
        mine = f"cp={self.cp_size}, pattern={self.cp_pattern}, causal={self.cp_causal}"
        mine += ", implementation=torch" if self.cp_implementation == "torch" else ""
        return f"{mine}, {parent}" if parent else mine


def _wrap_args(cp_group=None, pattern="ring", causal=True, load_balance=True, implementation="ring"):
    return cp_group, pattern, causal, load_balance, implementation


def apply_context_parallel(model: nn.Module, cp_group, causal: bool = True, attention_types=None,
                           load_balance: bool = True, implementation: str = "ring") -> list[nn.Module]:
    """Wrap (``ContextParallel.wrap``) every transformer block of ``model`` (``primitives.blocks.find_blocks``),
    so every SDPA call inside a block is a ring-attention call over ``cp_group``; or, with ``attention_types``
    (module classes), every outermost instance of them. Returns the wrapped modules. Raises ``ValueError`` when
    nothing is found, before changing anything. The model's inputs are then token shards (``shard_sequence``) and
    its position ids must come from ``positions``."""
    if attention_types is not None:
        types = tuple(attention_types) if isinstance(attention_types, (list, tuple, set)) else (attention_types,)
        if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise ValueError(f"attention_types must be nn.Module classes, got {attention_types!r}")
        modules = find_blocks(model, types)
        why = f"no module of attention_types ({', '.join(t.__name__ for t in types)})"
    else:
        modules = find_blocks(model)
        why = ("found no transformer blocks (an nn.ModuleList / nn.ModuleDict of same-class modules, e.g. "
               "blocks, layers, model.layers, transformer.h)")
    if not modules:
        raise ValueError(f"model has no attention module CP knows how to wrap: {type(model).__name__}: {why}; "
                         "pass attention_types=(YourAttentionOrBlockClass,)")
    choice("implementation", implementation, IMPLEMENTATIONS)
    _group_size_rank(cp_group)
    for m in modules:  # check all before re-classing any
        _check_not_recomputed(m)
    return [ContextParallel.wrap(m, cp_group, "ring", causal, load_balance, implementation) for m in modules]
