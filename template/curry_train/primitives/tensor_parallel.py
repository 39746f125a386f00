"""Tensor parallelism (Megatron-LM) and sequence parallelism on PyTorch DTensor: ``ColumnParallelLinear``,
``RowParallelLinear`` and ``apply_tensor_parallel(model, tp_mesh, sequence_parallel=False, loss_parallel=False)``.

A column-parallel linear ``y = x W^T`` splits ``W`` (out x in) by output features: rank ``r`` of ``tp`` holds rows
``[r out/tp, (r+1) out/tp)`` (DTensor ``Shard(0)``), takes the whole input (``Replicate``) and produces its slice of
the output features (``Shard(-1)``); gathering the output is an all-gather. A row-parallel linear splits ``W`` by input
features (``Shard(1)``), takes its slice of the input features and produces a partial sum of the whole output, which
an all-reduce (or a reduce-scatter over the sequence, with sequence parallelism) completes. Column then row needs no
communication in between: attention's q, k, v are column-parallel (each rank computes its own heads, whole) and
its output projection row-parallel; the MLP's up (and gate) column-parallel, down row-parallel.

Communication of one transformer block (``B`` rows of ``N`` tokens, width ``d``, fp32 = 4 bytes per element):

* TP: forward 2 all-reduces of ``B N d`` elements (after attention and after the MLP); backward 2 more (the
  gradient of the input of q/k/v and of the MLP's first layer, Megatron's ``f``). Per step ``4 L`` all-reduces,
  each moving ``2 (tp-1)/tp B N d`` elements per rank (ring).
* TP + SP: each all-reduce becomes a reduce-scatter (row output, sequence-sharded) plus an all-gather (before the
  next column layer): forward 2 all-gathers + 2 reduce-scatters of ``B N d``, backward the same; the same bytes
  on the wire as TP (an all-reduce *is* a reduce-scatter + an all-gather). What changes is memory: norms, dropout
  and the residual stream hold ``B N d / tp`` per rank instead of ``B N d``. Per layer, Korthikanti et al. 2022
  (16-bit activations, ``a`` heads): ``N B d (34 + 5 a N / d)`` bytes without TP, ``N B d (10 + 24/tp + 5 a N / (d
  tp))`` with TP, ``N B d / tp (34 + 5 a N / d)`` with TP + SP. SP also all-reduces the norms' weight gradients
  (``d`` elements each) over tp, since each rank saw only its tokens.
* Parameters per rank: every block linear divided by ``tp`` (biases of row layers and the norms replicated);
  an untied embedding and head are split by vocabulary (``V / tp`` rows each).

Plan (``TP_LAYOUTS``; the same for every layout, names differ):

============================  ========================  =================================================
module                        TP                        + SP (``sequence_parallel=True``)
============================  ========================  =================================================
attention norm, MLP norm      replicated; output made   ``SequenceParallel`` (runs on ``N / tp`` tokens),
                              a ``Replicate`` DTensor   output all-gathered to ``Replicate`` once
                              once (1 all-reduce bwd)
q, k, v (or fused ``qkv``)    ``ColumnParallelLinear``  same
attention output              ``RowParallelLinear``     ``RowParallelLinear``, output ``Shard(1)``
                              (all-reduce)              (reduce-scatter)
MLP up, gate                  ``ColumnParallelLinear``  same
MLP down                      ``RowParallelLinear``     ``RowParallelLinear``, output ``Shard(1)``
MoE MLP (``MoEMLP``) and its  whole on every rank,      norm ``SequenceParallel``; the MoE all-gathers its
norm                          plain tensors             input, hands back this rank's tokens (a slice)
untied embedding              ``RowwiseParallel`` by    same, output ``Shard(1)`` where the model's forward
                              vocabulary, all-reduce    allows it (torchtitan), else split at the first block
untied head                   ``ColumnParallelLinear``  input ``Shard(1)`` (all-gather); ``loss_parallel``:
                              gathered logits           logits stay ``Shard(-1)`` by vocabulary
final norm                    replicated                ``SequenceParallel``
tied embedding + head         replicated                replicated; the head's input all-gathered
============================  ========================  =================================================

A mixture of experts (``primitives.moe.MoEMLP``, ``tp_layouts.replicated_mlp``) is not split: its input, after the
attention's all-reduce (under SP: all-gathered), is the same on every rank, so every rank routes alike and computes
the same expert outputs; backward, the gradient reaching its output is the whole one (the next column input
all-reduces it; under SP the output slice all-gathers it), so its parameters' gradients are equal on every rank
(plain tensors: FSDP2 shards them over dp like the norms). Capacity and the balancing loss see the same tokens as
one process. Such a block makes one all-reduce per pass fewer (under SP one reduce-scatter; ``block_comm`` counts
dense blocks).

Each "output made a ``Replicate`` DTensor once" is ``PrepareModuleOutput`` on the norm: q, k and v (or gate and up)
then share one DTensor input, so backward sums their partial input gradients and reduces once per sub-block
(Megatron's ``f``), not once per projection. Layouts: ``tp_layouts.py`` (the reference GPT, Hugging Face Llama and
its family, torchtitan's Llama; GPT-2/nanoGPT's fused ``[q; k; v]`` is refused). Attention must infer its local head
count from the width it gets (``view(B, T, -1, head_dim)``: Hugging Face, torchtitan, the reference GPT).

Loss parallel (``loss_parallel=True``): the untied head's logits stay split by vocabulary (a ``Shard(-1)``
DTensor, never gathered: ``B N V / tp`` per rank instead of ``B N V``) and the cross-entropy runs inside
``torch.distributed.tensor.parallel.loss_parallel()`` (``loss_parallel_context``), backward too: it all-reduces
only the per-token max and sum of exponentials. A tied head (the reference GPT, GPT-2) shares its weight with the
embedding, which stays replicated here, so there is nothing vocabulary-sharded to keep: refused.

PyTorch pieces: ``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` (inside
``ColumnParallelLinear`` / ``RowParallelLinear``, and on the embedding), ``SequenceParallel``,
``PrepareModuleInput`` / ``PrepareModuleOutput``, ``DTensor.redistribute`` (the one split of the sequence where a
model computes masks and positions from its embedding output), ``loss_parallel``. Parameters become DTensors on
``tp_mesh`` (``.full_tensor()`` gathers one); parameter names do not change, so DCP checkpoints reshard between
tp sizes. ``check_tensor_parallel`` finds every error without a process group. Dropout with ``p > 0`` is
refused: without a per-rank RNG (Megatron's ``get_cuda_rng_tracker``) the tp ranks would draw the same masks
for different heads and tokens. All ranks of a tp group must get the same batch and the same initial weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .tp_layouts import (HF_LLAMA_TYPES, TP_LAYOUTS, TPLayout, _blocks, _dropouts, _get, _tied, describe,
                         replicated_mlp, tp_layout)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "apply_tensor_parallel", "check_tensor_parallel",
           "loss_parallel_context", "local_value", "block_comm", "norm_saved_bytes", "tp_layout", "describe",
           "TPLayout", "HF_LLAMA_TYPES", "TP_LAYOUTS"]


# -- the two linears ---------------------------------------------------------------------------------------------

class _ParallelLinear(nn.Linear):
    """Shared by the two: construction from sizes (initialised as ``nn.Linear``, then split) or from a Linear."""

    SPLIT = ""  # "column" (by output features) | "row" (by input features)

    def __init__(self, in_features: int, out_features: int, tp_mesh, bias: bool = True, *, input_layout=None,
                 output_layout=None, use_local_output: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._shard(tp_mesh, input_layout, output_layout, use_local_output)

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp_mesh, *, input_layout=None, output_layout=None,
                    use_local_output: bool = True, name: str = "linear"):
        """Split ``linear`` in place (its class becomes this one, parameter names unchanged) and return it."""
        if isinstance(linear, _ParallelLinear):
            raise ValueError(f"{name} is already a {type(linear).__name__}")
        if type(linear) is not nn.Linear:
            raise ValueError(f"{cls.__name__} splits an nn.Linear; {name} is a {type(linear).__name__}")
        cls._check_divisible(linear, tp_mesh.size(), name)
        linear.__class__ = cls
        linear._shard(tp_mesh, input_layout, output_layout, use_local_output)
        return linear

    @classmethod
    def _check_divisible(cls, linear: nn.Linear, size: int, name: str) -> None:
        which = "out_features" if cls.SPLIT == "column" else "in_features"
        if getattr(linear, which) % size:
            raise ValueError(f"{cls.__name__}: {name}.{which}={getattr(linear, which)} is not divisible by the tp "
                             f"size {size}")

    def _shard(self, tp_mesh, input_layout, output_layout, use_local_output):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        self._check_divisible(self, tp_mesh.size(), type(self).__name__)
        style = ColwiseParallel if self.SPLIT == "column" else RowwiseParallel
        parallelize_module(self, tp_mesh, style(input_layouts=input_layout, output_layouts=output_layout,
                                                use_local_output=use_local_output))
        self.tp_size = tp_mesh.size()

    def extra_repr(self) -> str:
        side = "output" if self.SPLIT == "column" else "input"
        return f"{super().extra_repr()}, tp={self.tp_size} split by {side} features"


class ColumnParallelLinear(_ParallelLinear):
    """``nn.Linear`` split by output features over ``tp_mesh``: weight and bias ``Shard(0)`` (rank ``r`` holds
    ``out_features / tp`` rows), built on ``ColwiseParallel``.

    ``input_layout``: how the input arrives, ``Replicate()`` (default: every rank has the whole input) or
    ``Shard(1)`` (sequence-sharded: all-gathered first). ``output_layout``: ``Shard(-1)`` (default: this rank's
    output features, no communication; what a following row-parallel layer takes) or ``Replicate()`` (gathered,
    an all-gather). ``use_local_output=False`` returns the DTensor (for ``loss_parallel``).
    ``ColumnParallelLinear(in, out, tp_mesh, bias=True)`` builds one (initialised like ``nn.Linear``: equal on
    every rank under the same seed, then split); ``ColumnParallelLinear.from_linear(linear, tp_mesh)`` splits an
    existing one in place.
    """

    SPLIT = "column"


class RowParallelLinear(_ParallelLinear):
    """``nn.Linear`` split by input features over ``tp_mesh``: weight ``Shard(1)`` (``in_features / tp`` columns),
    bias replicated (added once, after the reduction), built on ``RowwiseParallel``.

    ``input_layout``: ``Shard(-1)`` (default: this rank's slice of the input features, as a column-parallel layer
    produces them). ``output_layout``: ``Replicate()`` (default: the partial sums all-reduced) or ``Shard(1)``
    (reduce-scattered over the sequence: sequence parallelism). ``RowParallelLinear(in, out, tp_mesh)`` or
    ``RowParallelLinear.from_linear(linear, tp_mesh)``, as for ``ColumnParallelLinear``.
    """

    SPLIT = "row"


# -- checks ------------------------------------------------------------------------------------------------------

def check_tensor_parallel(model: nn.Module, tp: int, sequence_parallel: bool = False, loss_parallel: bool = False,
                          seq_len: int | None = None) -> TPLayout:
    """Every error ``apply_tensor_parallel`` would raise, without a process group (``model`` may be on the meta
    device). Returns the layout. Messages start with ``tp=...`` or the flag's name (the config layer adds
    ``parallel.``)."""
    layout = tp_layout(model)
    for (count, source), what in zip(layout.heads, ("attention heads", "key/value heads")):
        if count % tp:
            raise ValueError(f"tp={tp} must divide the {what}: {type(model).__name__} has {count} ({source}); "
                             "each rank runs whole heads")
    blocks = _blocks(model, layout.blocks)
    first = blocks[0]
    dense = next((b for b in blocks if replicated_mlp(b[1], layout) is None), None)
    checked = [(first, path) for path in (*layout.qkv, layout.attn_out)]
    checked += [(dense, path) for path in (*layout.mlp_in, layout.mlp_out)] if dense else []
    for (where, block), path in checked:
        linear = _get(block, path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"tp={tp}: {where}.{path} is a {type(linear).__name__}, not an nn.Linear: tensor "
                             "parallelism splits nn.Linear layers")
        features = linear.in_features if path in (layout.attn_out, layout.mlp_out) else linear.out_features
        if features % tp:
            raise ValueError(f"tp={tp} must divide the width of {where}.{path} ({features} features)")
    tied = _tied(model, layout)
    if not tied:
        vocab = _get(model, layout.embed).weight.shape[0]
        if vocab % tp or _get(model, layout.head).out_features % tp:
            raise ValueError(f"tp={tp} must divide the vocabulary: {layout.embed} has {vocab} rows and "
                             f"{layout.head} {_get(model, layout.head).out_features} outputs (split by vocabulary)")
    if loss_parallel and tied:
        raise ValueError(f"loss_parallel=true needs an untied, vocabulary-sharded head; {type(model).__name__}'s "
                         f"{layout.head} shares its weight with {layout.embed}, which stays replicated (set "
                         "loss_parallel=false, or untie the head)")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        raise ValueError(f"sequence_parallel=true splits each sequence over the tp ranks: seq_len={seq_len} must be "
                         f"divisible by tp={tp}")
    dropouts = _dropouts(model) if tp > 1 else []
    if dropouts:
        raise ValueError(f"tp={tp} with dropout > 0 ({', '.join(dropouts[:3])}): the tp ranks would draw the same "
                         "masks for different heads and tokens (no per-rank RNG); set dropout to 0 or use tp=1")
    return layout


# -- the plan ----------------------------------------------------------------------------------------------------

def _split_sequence_at_input(module: nn.Module, tp_mesh) -> None:
    """The first positional input (whole on every rank) becomes this rank's ``N / tp`` tokens: a local slice
    forward, an all-gather of the gradient backward (``DTensor.redistribute`` Replicate -> Shard(1))."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(_, args):
        x = DTensor.from_local(args[0], tp_mesh, (Replicate(),), run_check=False)
        return (x.redistribute(tp_mesh, (Shard(1),)).to_local(), *args[1:])

    module.register_forward_pre_hook(hook)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False, loss_parallel: bool = False
                          ) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` (``ParallelState.mesh["tp"]``) with the plan of the module
    docstring; returns it. Every rank of the tp group must hold the same initial weights and get the same batch.
    ``loss_parallel=True``: the logits come out as a vocabulary-sharded DTensor; compute the loss (and run
    backward) inside ``loss_parallel_context(True)``. Apply before recompute, ``torch.compile`` and FSDP2."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (PrepareModuleInput, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    tp = tp_mesh.size()
    layout = check_tensor_parallel(model, tp, sequence_parallel, loss_parallel)
    sp = sequence_parallel  # a mesh of one rank runs the whole plan with no-op collectives: a cheap way to test it
    tied = _tied(model, layout)

    def norm_feeding_columns(norm: nn.Module) -> None:
        # One Replicate DTensor for all the column layers it feeds: their partial input gradients add up as a
        # DTensor and are reduced once (all-reduce; under SP a reduce-scatter back to the token shards).
        if sp:
            parallelize_module(norm, tp_mesh, SequenceParallel())
        parallelize_module(norm, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1) if sp else Replicate(),
                                                              desired_output_layouts=Replicate(),
                                                              use_local_output=False))

    out_layout = Shard(1) if sp else Replicate()
    for name, block in _blocks(model, layout.blocks):
        moe = replicated_mlp(block, layout)
        norm_feeding_columns(_get(block, layout.attn_norm))
        if moe is None:
            norm_feeding_columns(_get(block, layout.mlp_norm))
        elif sp:  # the MoE takes the whole sequence (all-gather) and hands back this rank's tokens
            parallelize_module(_get(block, layout.mlp_norm), tp_mesh, SequenceParallel(use_local_output=True))
            parallelize_module(moe, tp_mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                                desired_input_layouts=(Replicate(),),
                                                                use_local_output=True))
            parallelize_module(moe, tp_mesh, PrepareModuleOutput(output_layouts=Replicate(),
                                                                 desired_output_layouts=Shard(1),
                                                                 use_local_output=True))
        for path in (*layout.qkv, *(() if moe is not None else layout.mlp_in)):
            ColumnParallelLinear.from_linear(_get(block, path), tp_mesh, name=f"{name}.{path}")
        for path in (layout.attn_out, *(() if moe is not None else (layout.mlp_out,))):
            RowParallelLinear.from_linear(_get(block, path), tp_mesh, output_layout=out_layout, name=f"{name}.{path}")

    embed, head = _get(model, layout.embed), _get(model, layout.head)
    embed_splits = sp and not tied and layout.seq_entry == "embed"
    if not tied:
        parallelize_module(embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(),
                                                           output_layouts=Shard(1) if embed_splits else Replicate()))
        ColumnParallelLinear.from_linear(head, tp_mesh, input_layout=Shard(1) if sp else Replicate(),
                                         output_layout=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel, name=layout.head)
    if sp:
        if layout.seq_entry == "drop":
            parallelize_module(_get(model, "drop"), tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True))
        elif not embed_splits:
            _split_sequence_at_input(_blocks(model, layout.blocks)[0][1], tp_mesh)
        parallelize_module(_get(model, layout.final_norm), tp_mesh, SequenceParallel(use_local_output=True))
        if tied:  # the replicated head takes the whole sequence
            parallelize_module(head, tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    return model


def loss_parallel_context(enabled: bool):
    """``torch.distributed.tensor.parallel.loss_parallel()`` when ``enabled`` (cross-entropy on vocabulary-sharded
    DTensor logits; backward must run inside it too), else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: ``t.full_tensor()`` for a DTensor (e.g. the loss under ``loss_parallel``), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def block_comm(batch: int, seq_len: int, d: int, n_layer: int, tp: int, sequence_parallel: bool = False) -> dict:
    """The blocks' activation collectives of one forward + backward (the module docstring's formula):
    ``{"forward"|"backward": {op: (count, elements per collective)}}``, ``op`` in all_reduce, all_gather,
    reduce_scatter; elements = the whole ``B N d`` tensor (an all-gather's output, a reduce-scatter's input)."""
    if tp == 1:
        return {"forward": {}, "backward": {}}
    full = batch * seq_len * d
    if sequence_parallel:
        per_pass = {"all_gather": (2 * n_layer, full), "reduce_scatter": (2 * n_layer, full)}
    else:
        per_pass = {"all_reduce": (2 * n_layer, full)}
    return {"forward": dict(per_pass), "backward": dict(per_pass)}


def norm_saved_bytes(model: nn.Module, forward) -> int:
    """Bytes of this rank's tensors that autograd saves for backward inside the norms (attention norm, MLP norm of
    every block, the final norm) while ``forward()`` runs: the activations sequence parallelism divides by ``tp``.
    Parameters (the norms' weights) are not counted; a storage saved twice counts once."""
    layout = tp_layout(model)
    norms = [_get(block, path) for _, block in _blocks(model, layout.blocks) for path in (layout.attn_norm,
                                                                                           layout.mlp_norm)]
    norms.append(_get(model, layout.final_norm))
    params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    inside, seen = [0], {}

    def pack(t):
        local = _local(t)
        ptr = local.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            seen[ptr] = local.untyped_storage().nbytes()
        return t

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    handles = [h for m in norms for h in (m.register_forward_pre_hook(enter, prepend=True),
                                         m.register_forward_hook(leave, always_call=True))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    while hasattr(t, "_local_tensor") or hasattr(t, "elem"):  # DTensor, AsyncCollectiveTensor
        t = t._local_tensor if hasattr(t, "_local_tensor") else t.elem
    return t
