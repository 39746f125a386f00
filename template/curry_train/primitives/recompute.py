"""Activation recompute (activation checkpointing): store less in forward, re-run forward in backward.

A block run under ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` keeps only its
input for backward; everything it computed inside is recomputed when backward reaches it. For a stack of
``L`` blocks that turns ``L * A`` saved bytes (``A`` = activations of one block) into ``L * |x| + A``:
the inputs of every block plus, during backward, one block's activations at a time (Chen et al. 2016).
The price is one extra forward of every checkpointed block, about +1/3 of a step when backward = 2x forward.

Modes (``MODES``):

* ``"full"``      recompute everything inside the block;
* ``"selective"`` op-level policy (``create_selective_checkpoint_contexts``): keep the outputs of matmuls
  (``mm``, ``addmm``, ``bmm``) and of attention (SDPA kernels), recompute the cheap pointwise ops
  (LayerNorm, GELU, dropout, adds). Less memory saved than full, less compute spent.

``Recompute(block)`` does not wrap ``block`` in a child module: it changes the block's class to a
subclass ``Recompute<Block>`` (the way FSDP2's ``fully_shard`` does), so parameter names, ``state_dict``
keys, FSDP2 FQNs and DCP checkpoints are identical with and without recompute (``checkpoint_wrapper``
inserts ``_checkpoint_wrapped_module.``). Only the block's ``forward`` is checkpointed: hooks on the block
itself run once, hooks on modules *inside* it run twice per step (forward, then recompute).

Order with other wrappers (torchtitan's): recompute, then ``torch.compile``, then FSDP. ``Recompute`` on a
block that ``fully_shard`` already wrapped is an error.

Blocks: ``apply_recompute`` asks ``primitives.blocks.find_blocks`` (the reference GPT's ``blocks``, Hugging Face
``model.layers`` / ``transformer.h``, torchtitan's ``layers`` ``nn.ModuleDict``, or ``block_types=``); a model
where none is found raises ``NoBlocksError`` naming its class and ``block_types``.

KV cache (Hugging Face decoders, ``use_cache=True`` by default even in training): while a block runs under
recompute, ``Recompute`` calls it with ``use_cache=False`` and ``cache`` (transformers >= 5.2x) /
``past_key_values`` / ``past_key_value`` / ``layer_past`` set to None, positional or keyword, as HF's own ``GradientCheckpointingLayer`` does; otherwise
the recompute in backward would append the same keys and values to the cache a second time. The model's
returned cache is then empty (or None). Blocks with ``_can_checkpoint_with_cache = True`` (cache readers) keep
their cache argument. Without gradients (generation) nothing is checkpointed and the cache works as usual.
Do not also turn on HF's ``gradient_checkpointing_enable()``: ``Recompute`` on such a block is an error.

``activation_memory(model, batch)`` measures what a mode saves: bytes kept for backward at the end of
forward and the peak over forward + backward (profiler on CPU, ``torch.cuda`` memory stats on GPU). Batches and
outputs are read by ``primitives.model_io``: a tensor, an ``(x, y)`` pair or a dict of keyword inputs with
``labels`` / ``targets``; a logits tensor, a ``ModelOutput`` / dict with ``logits`` or a tuple.
"""

from __future__ import annotations

import functools
import inspect
import time

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import model_io
from ._checks import choice, positive_int
from ._config import config_get
from .blocks import reclass, require_blocks

MODES = ("full", "selective")
EVERY_N_NOTE = "(1 = every block)"

_aten = torch.ops.aten
# Outputs worth keeping: expensive to recompute (matmuls, attention), cheap to store relative to their cost.
SELECTIVE_SAVE_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


# What a block is called with while it runs under recompute: no KV cache written (see the module docstring).
CACHE_OFF = {"use_cache": False, "cache": None, "past_key_values": None, "past_key_value": None,
             "layer_past": None}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _check_mode(mode) -> str:
    return choice("recompute mode", mode, MODES)


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return ()
    return FSDPModule


class Recompute(nn.Module):
    """Run ``block``'s forward under non-reentrant activation checkpointing; returns ``block`` itself.

    ``Recompute(block, enabled=True, mode="full", preserve_rng_state=True)`` re-classes ``block`` in place
    (``isinstance(block, Recompute)`` and ``isinstance(block, type_before)`` both hold) and returns it, so
    ``model.blocks[i] = Recompute(model.blocks[i])`` changes no parameter name. ``preserve_rng_state=True``
    replays the forward's RNG state in the recompute, so dropout masks match; set it False only for blocks
    without randomness (it saves a small RNG stash per block). Checkpointing is skipped when gradients are
    off (``torch.no_grad()``, eval loops) or ``enabled`` is False. A checkpointed call writes no KV cache
    (``CACHE_OFF``, see the module docstring).
    """

    _reclasses_in_place = True  # primitives.blocks.block_class sees through it
    _cache_positions: dict[type, dict[str, int]] = {}

    def __new__(cls, block: nn.Module | None = None, *args, **kwargs):
        if block is None:  # copy.deepcopy / unpickling build an empty instance, then fill its __dict__
            return super().__new__(cls)
        if not isinstance(block, nn.Module):
            raise ValueError(f"Recompute needs an nn.Module block, got {type(block).__name__}")
        _check_mode(kwargs.get("mode", args[1] if len(args) > 1 else "full"))  # before the block's class changes
        if _fsdp_module_class() and isinstance(block, _fsdp_module_class()):
            raise ValueError(
                "Recompute must be applied before fully_shard (order: recompute -> torch.compile -> FSDP); "
                "this block is already sharded"
            )
        if getattr(block, "gradient_checkpointing", False) is True:
            raise ValueError(
                f"{type(block).__name__} already runs under Hugging Face gradient checkpointing; use one of the two: "
                "model.gradient_checkpointing_disable() before Recompute, or no Recompute"
            )
        return reclass(block, Recompute)

    def __init__(self, block: nn.Module | None = None, enabled: bool = True, mode: str = "full",
                 preserve_rng_state: bool = True):
        # ``self`` is ``block`` (see __new__): nn.Module.__init__ must not run again, it would drop the block's state.
        self.recompute_enabled = bool(enabled)
        self.recompute_mode = _check_mode(mode)
        self.preserve_rng_state = bool(preserve_rng_state)

    def forward(self, *args, **kwargs):
        inner = super(Recompute, self).forward  # the block's own forward (next class in the MRO)
        if not (self.recompute_enabled and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        context_fn = (
            functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            if self.recompute_mode == "selective" else None
        )
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        args, kwargs = self._cache_off(inner, args, dict(kwargs))
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state,
                          **extra, **kwargs)

    def _cache_off(self, inner, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args``/``kwargs`` with every ``CACHE_OFF`` argument the call passes set to its off value."""
        positions = Recompute._cache_positions.get(type(self))
        if positions is None:
            try:
                params = list(inspect.signature(inner).parameters.values())
            except (TypeError, ValueError):  # a forward without an introspectable signature
                params = []
            positions = {p.name: i for i, p in enumerate(params) if p.name in CACHE_OFF and p.kind in _POSITIONAL}
            Recompute._cache_positions[type(self)] = positions
        keep_cache = getattr(self, "_can_checkpoint_with_cache", False) is True
        args = list(args)
        for name, off in CACHE_OFF.items():
            if keep_cache and name != "use_cache":
                continue
            if name in kwargs:
                kwargs[name] = off
            i = positions.get(name)
            if i is not None and i < len(args):
                args[i] = off
        return tuple(args), kwargs

    @classmethod
    def from_config(cls, cfg, block: nn.Module, key: str = "recompute") -> nn.Module:
        """``block`` under the mode named by ``cfg[key]`` (``true``/``"full"``/``"selective"``, see
        ``parse_recompute``); ``block`` unchanged when it is off. ``cfg``: any mapping or attribute object."""
        mode = parse_recompute(config_get(cfg, key, False), key)
        return block if mode is None else cls(block, mode=mode)

    def extra_repr(self) -> str:
        parent = super().extra_repr()
        mine = f"recompute={self.recompute_mode if self.recompute_enabled else 'off'}"
        return f"{mine}, {parent}" if parent else mine


def parse_recompute(value, key: str = "recompute") -> str | None:
    """Config value -> mode or None. Accepts booleans (``true`` = ``"full"``, ``false`` = off) and mode names."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "false", "off", "")):
        return None
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return "full"
    if isinstance(value, str) and value.lower() in MODES:
        return value.lower()
    raise ValueError(f"{key} must be false, true (= full) or one of {MODES}; got {value!r}")


def apply_recompute(model: nn.Module, mode: str | bool = "full", every_n: int = 1, block_types=None,
                    preserve_rng_state: bool = True) -> list[nn.Module]:
    """Checkpoint every ``every_n``-th block of ``model`` (the ``every_n``-th, ``2*every_n``-th, ...; all
    when 1, as torchtitan's ``ac_freq``). Blocks are found by ``primitives.blocks.find_blocks`` (instances of
    ``block_types`` when given); none found raises ``NoBlocksError`` (a ``ValueError``). Returns the blocks
    now under recompute. ``mode``: ``"full"``, ``"selective"`` or ``True`` (= full)."""
    mode = "full" if mode is True else mode
    _check_mode(mode)
    every_n = positive_int("every_n", every_n, EVERY_N_NOTE)
    blocks = require_blocks(model, block_types, purpose="recompute")
    chosen = [b for i, b in enumerate(blocks) if (i + 1) % every_n == 0]
    return [Recompute(b, mode=mode, preserve_rng_state=preserve_rng_state) for b in chosen]


def check_recompute_config(cfg, key: str = "recompute", every_n_key: str = "recompute_every_n") -> tuple[str | None, int]:
    """(mode or None, every_n) from ``cfg``, validated; no model needed (run it before any process group)."""
    mode = parse_recompute(config_get(cfg, key, False), key)
    return mode, positive_int(every_n_key, config_get(cfg, every_n_key, 1), EVERY_N_NOTE)


def apply_recompute_from_config(model: nn.Module, cfg, key: str = "recompute", every_n_key: str = "recompute_every_n",
                                block_types=None) -> str | None:
    """``apply_recompute`` driven by ``cfg[key]`` and ``cfg[every_n_key]`` (e.g. Hydra's ``cfg.train``).
    Returns the mode applied, or None when recompute is off."""
    mode, every_n = check_recompute_config(cfg, key, every_n_key)
    if mode is not None:
        apply_recompute(model, mode, every_n, block_types)
    return mode


def _raw_targets(batch):
    """The targets as the batch holds them (``y``, ``labels`` or ``targets``, unshifted), or None."""
    if isinstance(batch, dict):
        return next((batch[k] for k in model_io.TARGET_KEYS if k in batch), None)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    return None


def _forward_loss(model, batch, loss_fn):
    targets = _raw_targets(batch)
    if loss_fn is not None:
        output = model_io.forward(model, batch)
        return loss_fn(output) if targets is None else loss_fn(output, targets)
    if targets is None:
        return model_io.logits_of(model_io.forward(model, batch)).float().sum()
    loss_sum, n_valid = model_io.forward_loss_sum(model, batch)
    return loss_sum / n_valid.clamp(min=1)


def activation_memory(model: nn.Module, batch, loss_fn=None, peak: bool = True) -> dict:
    """Bytes the forward pass keeps for backward, and the peak over forward + backward.

    ``batch``: a tensor (the inputs), an ``(inputs, targets)`` pair, or a dict of keyword inputs with ``labels``
    (shifted inside, Hugging Face style) or ``targets`` (see ``primitives.model_io``). Default loss: the mean
    token cross-entropy, ``forward_loss_sum / count`` (the logits' sum for a batch without targets); the model
    may return logits, a ``ModelOutput`` / dict with ``logits`` or a tuple. ``loss_fn(output)`` (no targets) or
    ``loss_fn(output, targets)`` (targets as the batch holds them) overrides it, ``output`` being what the model
    returned. Gradients are cleared first and again at the end.

    * CPU: ``activation_bytes`` = ``sum(self_cpu_memory_usage)`` over a forward-only profile (allocations
      minus frees: exactly what is still alive when forward returns, output and loss included);
      ``peak_bytes`` = maximum of the profiler's memory timeline over forward + backward, minus its start.
      The timeline comes from ``torch.profiler._memory_profiler`` (a private API).
    * CUDA: ``torch.cuda.memory_allocated`` after forward minus before, and ``max_memory_allocated`` over
      forward + backward minus before.

    Also returns ``fwd_bwd_seconds`` of one unprofiled forward + backward. ``peak=False`` skips the peak
    (``peak_bytes`` is then None): on CPU the memory timeline is the slow part.
    """
    model.zero_grad(set_to_none=True)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = _forward_loss(model, batch, loss_fn)
        activation = torch.cuda.memory_allocated(device) - base
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = _forward_loss(model, batch, loss_fn)
        activation = sum(e.self_cpu_memory_usage for e in prof.key_averages())
        loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        if peak:
            from torch.profiler._memory_profiler import MemoryProfileTimeline

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                _forward_loss(model, batch, loss_fn).backward()
            _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
            totals = [sum(s) for s in sizes]
            peak = max(totals) - totals[0] if totals else 0
        else:
            peak = None
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    _forward_loss(model, batch, loss_fn).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"activation_bytes": int(activation), "peak_bytes": None if peak is None else int(peak),
            "fwd_bwd_seconds": seconds}
