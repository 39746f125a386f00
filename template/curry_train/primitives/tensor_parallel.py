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
untied embedding              ``RowwiseParallel`` by    same, output ``Shard(1)`` where the model's forward
                              vocabulary, all-reduce    allows it (torchtitan), else split at the first block
untied head                   ``ColumnParallelLinear``  input ``Shard(1)`` (all-gather); ``loss_parallel``:
                              gathered logits           logits stay ``Shard(-1)`` by vocabulary
final norm                    replicated                ``SequenceParallel``
tied embedding + head         replicated                replicated; the head's input all-gathered
============================  ========================  =================================================

Each "output made a ``Replicate`` DTensor once" is ``PrepareModuleOutput`` on the norm: q, k and v (or gate and up)
then share one DTensor input, so backward sums their partial input gradients and reduces once per sub-block
(Megatron's ``f``), not once per projection. Layouts (``tp_layout``): the reference GPT (``model.GPT``: fused
``attn.qkv`` ordered per head, so a contiguous column shard holds whole heads), Hugging Face ``LlamaForCausalLM`` and
the families with its layout (``HF_LLAMA_TYPES``: Mistral, Qwen2, Qwen3), and torchtitan's Llama (``layers`` an
``nn.ModuleDict``; ``attention.wq`` ... or ``wq`` ... on the block). GPT-2 and nanoGPT fuse ``c_attn`` as ``[q; k; v]``:
a contiguous column shard would give a rank the q of some heads and the k of others, so they are refused
(``ValueError``), as is any other layout. Attention must infer its local head count from the width it gets
(``view(B, T, -1, head_dim)``: Hugging Face, torchtitan, the reference GPT).

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
from dataclasses import dataclass

import torch
import torch.nn as nn

HF_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TP_LAYOUTS = ("gpt", "hf-llama", "torchtitan")


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


# -- layouts -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TPLayout:
    """Where a model keeps the pieces the plan shards. Paths are attribute paths; block paths are relative to a
    block. ``seq_entry``: where activations become sequence-sharded under SP: ``"embed"`` (the vocabulary-sharded
    embedding reduce-scatters, torchtitan), ``"drop"`` (the reference GPT's embedding dropout gets the split
    input) or ``"first_block"`` (the model computes masks/positions from the embedding output, which must stay
    whole: the first block's input is split). ``heads``: ``((count, where it comes from), (kv count, where))``."""

    name: str
    blocks: str
    attn_norm: str
    qkv: tuple[str, ...]
    attn_out: str
    mlp_norm: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embed: str
    final_norm: str
    head: str
    seq_entry: str
    heads: tuple[tuple[int, str], tuple[int, str]]


def _get(module, path: str):
    for part in path.split("."):
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    return module


def _blocks(model, path: str) -> list[tuple[str, nn.Module]]:
    container = _get(model, path)
    items = container.items() if isinstance(container, nn.ModuleDict) else enumerate(container)
    return [(f"{path}.{k}", b) for k, b in items]


def _fused_refusal(model) -> str | None:
    """GPT-2 / nanoGPT: ``transformer.h[0].attn.c_attn`` fuses ``[q; k; v]``."""
    h = _get(model, "transformer.h")
    if isinstance(h, (nn.ModuleList, nn.ModuleDict)) and len(h):
        first = next(iter(h.values())) if isinstance(h, nn.ModuleDict) else h[0]
        if _get(first, "attn.c_attn") is not None:
            return "transformer.h.0.attn.c_attn"
    return None


def tp_layout(model: nn.Module) -> TPLayout:
    """The ``TPLayout`` of ``model``, or ``ValueError`` naming why it cannot be tensor-parallel (see module doc)."""
    name = type(model).__name__
    fused = _fused_refusal(model)
    if fused is not None:
        raise ValueError(
            f"{name}: {fused} is a fused [q; k; v] projection (GPT-2 / nanoGPT layout); a contiguous column shard "
            "would give a rank the q of some heads and the k/v of others, so tensor parallelism refuses it. Split it "
            "into q/k/v linears, or order its rows per head (q, k, v of head 0, then head 1...) as the reference GPT "
            "does, or use parallel.tp=1")
    config = getattr(model, "config", None)
    if all(_get(model, p) is not None for p in ("tok_emb", "pos_emb", "drop", "blocks", "ln_f", "head")) \
            and hasattr(model, "cfg") and _get(model, "blocks.0.attn.qkv") is not None:
        n_head = model.cfg.n_head
        return TPLayout("gpt", "blocks", "ln1", ("attn.qkv",), "attn.proj", "ln2", ("mlp.fc",), "mlp.proj",
                        "tok_emb", "ln_f", "head", "drop", ((n_head, "model.n_head"), (n_head, "model.n_head")))
    model_type = getattr(config, "model_type", None)
    if model_type in HF_LLAMA_TYPES and all(_get(model, p) is not None for p in
                                            ("model.embed_tokens", "model.layers", "model.norm", "lm_head")):
        q = (config.num_attention_heads, "config.num_attention_heads")
        kv = getattr(config, "num_key_value_heads", None)
        heads = (q, (kv, "config.num_key_value_heads") if kv else q)
        return TPLayout("hf-llama", "model.layers", "input_layernorm",
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                        "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                        "model.embed_tokens", "model.norm", "lm_head", "first_block", heads)
    layers = _get(model, "layers")
    if isinstance(layers, nn.ModuleDict) and len(layers) and all(
            _get(model, p) is not None for p in ("tok_embeddings", "norm", "output")):
        block = next(iter(layers.values()))
        a = "attention." if _get(block, "attention") is not None else ""
        f = "feed_forward." if _get(block, "feed_forward") is not None else ""
        paths = [f"{a}w{x}" for x in "qkvo"] + [f"{f}w{i}" for i in (1, 2, 3)] + ["attention_norm", "ffn_norm"]
        if all(isinstance(_get(block, p), nn.Module) for p in paths):
            attention = _get(block, "attention") if a else block
            heads = _titan_heads(attention, _get(block, f"{a}wq"), f"layers.0{'.attention' if a else ''}")
            return TPLayout("torchtitan", "layers", "attention_norm", (f"{a}wq", f"{a}wk", f"{a}wv"), f"{a}wo",
                            "ffn_norm", (f"{f}w1", f"{f}w3"), f"{f}w2", "tok_embeddings", "norm", "output", "embed",
                            heads)
    kind = f" (config.model_type={model_type!r})" if model_type else ""
    raise ValueError(
        f"tensor parallelism does not know the layout of {name}{kind}; it shards {', '.join(TP_LAYOUTS)} (the "
        f"reference GPT, Hugging Face model_type {', '.join(HF_LLAMA_TYPES)}, torchtitan's Llama). For another "
        "model write its plan with torch.distributed.tensor.parallel.parallelize_module, or use parallel.tp=1")


def _titan_heads(attention, wq, where: str) -> tuple[tuple[int, str], tuple[int, str]]:
    heads = next((getattr(attention, a) for a in ("n_heads", "n_head", "num_heads") if
                  isinstance(getattr(attention, a, None), int)), None)
    if heads is None and isinstance(getattr(attention, "head_dim", None), int):
        heads = wq.out_features // attention.head_dim
    if heads is None:
        raise ValueError(f"{where} has no n_heads (or head_dim) attribute: tensor parallelism cannot check that "
                         "the heads divide over the tp ranks; give the attention module n_heads")
    q, kv = (heads, f"{where}.n_heads"), getattr(attention, "n_kv_heads", None)
    return q, (kv, f"{where}.n_kv_heads") if isinstance(kv, int) else q


def describe(model: nn.Module) -> dict:
    """``{"layout", "n_layer", "d", "tied"}`` of a model ``tp_layout`` knows: the numbers ``block_comm`` takes."""
    layout = tp_layout(model)
    blocks = _blocks(model, layout.blocks)
    return {"layout": layout.name, "n_layer": len(blocks), "d": _get(blocks[0][1], layout.qkv[0]).in_features,
            "tied": _tied(model, layout)}


def _tied(model, layout: TPLayout) -> bool:
    head, embed = _get(model, layout.head), _get(model, layout.embed)
    return getattr(head, "weight", None) is not None and head.weight is getattr(embed, "weight", None)


def _dropouts(model) -> list[str]:
    found = [f"{n or type(model).__name__} (p={m.p})" for n, m in model.named_modules()
             if isinstance(m, nn.Dropout) and m.p > 0]
    found += [f"{n}.dropout={m.dropout}" for n, m in model.named_modules()
              if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0]
    attention_dropout = getattr(getattr(model, "config", None), "attention_dropout", 0.0)
    if isinstance(attention_dropout, (int, float)) and attention_dropout > 0:
        found.append(f"config.attention_dropout={attention_dropout}")
    return found


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
    first = _blocks(model, layout.blocks)[0]
    for path in (*layout.qkv, *layout.mlp_in, layout.attn_out, layout.mlp_out):
        linear = _get(first[1], path)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"tp={tp}: {first[0]}.{path} is a {type(linear).__name__}, not an nn.Linear: tensor "
                             "parallelism splits nn.Linear layers")
        features = linear.in_features if path in (layout.attn_out, layout.mlp_out) else linear.out_features
        if features % tp:
            raise ValueError(f"tp={tp} must divide the width of {first[0]}.{path} ({features} features)")
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
        norm_feeding_columns(_get(block, layout.attn_norm))
        norm_feeding_columns(_get(block, layout.mlp_norm))
        for path in (*layout.qkv, *layout.mlp_in):
            ColumnParallelLinear.from_linear(_get(block, path), tp_mesh, name=f"{name}.{path}")
        for path in (layout.attn_out, layout.mlp_out):
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
