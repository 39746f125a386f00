"""Where a model keeps the layers tensor parallelism shards: ``tp_layout(model) -> TPLayout`` (attribute paths of
the blocks, norms, q/k/v, MLP, embedding, head; where SP splits the sequence; where the head counts come from).

Layouts (``TP_LAYOUTS``): the reference GPT (``model.GPT``: fused ``attn.qkv`` ordered per head, so a contiguous
column shard holds whole heads), Hugging Face ``LlamaForCausalLM`` and the families with its layout
(``HF_LLAMA_TYPES``: Mistral, Qwen2, Qwen3), and torchtitan's Llama (``layers`` an ``nn.ModuleDict``;
``attention.wq`` ... or ``wq`` ... on the block). GPT-2 and nanoGPT fuse ``c_attn`` as ``[q; k; v]``: a contiguous
column shard would give a rank the q of some heads and the k of others, so they are refused (``ValueError``), as is
any other layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

HF_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TP_LAYOUTS = ("gpt", "hf-llama", "torchtitan")


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


def replicated_mlp(block: nn.Module, layout: TPLayout):
    """The block's MLP when it is a mixture of experts (``primitives.moe.MoEMLP``: router + expert bank), which
    tensor parallelism leaves whole on every tp rank; None for a dense MLP (``mlp_in`` / ``mlp_out`` split)."""
    from .moe import MoEMLP

    mlp = _get(block, layout.mlp_out.rpartition(".")[0])
    return mlp if isinstance(mlp, MoEMLP) else None


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
