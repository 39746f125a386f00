"""Split a causal LM into pipeline stages, whatever family it comes from: the model-layout adapters of the
pipeline (``primitives/pipeline`` stays model-agnostic; this module knows where each family keeps its pieces).

``split_model(model, n_stages, layers_per_stage=None, block_types=None)`` returns ``n_stages`` modules:
embedding on the first, the blocks divided as ``primitives.pipeline.layer_split`` says (evenly, or
``layers_per_stage``), final norm + head on the last. Chained, ``stages[-1](...stages[0](idx))`` equals the model's
logits. Layouts (``LAYOUTS``):

* ``gpt``: the reference GPT (``model.GPTStage``, via ``model.split_model``);
* ``hf-llama``: Hugging Face ``LlamaForCausalLM`` and the families that share its layout and forward
  (``HF_LLAMA_TYPES``: Mistral, Qwen2, Qwen3): ``model.embed_tokens``, ``model.layers``, ``model.norm``,
  ``model.rotary_emb``, ``lm_head``;
* ``hf-gpt2``: Hugging Face ``GPT2LMHeadModel``: ``transformer.wte`` / ``wpe`` / ``drop`` / ``h`` / ``ln_f``,
  ``lm_head`` tied to ``wte``;
* ``nanogpt``: nanoGPT's ``GPT`` (``transformer`` an ``nn.ModuleDict`` of the same names, blocks called ``block(x)``);
* ``torchtitan``: torchtitan's llama (``tok_embeddings``, ``layers`` an ``nn.ModuleDict``, ``norm``, ``output``,
  buffer ``freqs_cis``; blocks called ``block(h, freqs_cis, None)``).

Each stage takes one tensor and returns one tensor (what ``PipelineSchedule`` sends between ranks): token ids into
the first, hidden states ``(B, T, D)`` between stages, logits out of the last. Everything else a block needs is
rebuilt inside every stage from the hidden state's shape, as the model's own forward builds it: positions
``arange(T)`` (or the ``position_ids`` keyword, ``(B, T)``, where the model's forward takes it: Hugging Face
Llama and GPT-2; ``PipelineSchedule`` passes keyword inputs to every stage, split by rows like the batch, so with
context parallelism every stage places its tokens at their global positions, ``context_batches``), rotary
``(cos, sin)`` from the model's ``rotary_emb`` at those positions, and the causal mask of the local tokens in order
(built from ``arange(T)``: jumps in ``position_ids``, a context-parallel shard's head and tail chunks, are not
packed sequences; the model's own forward under its default ``use_cache`` masks them the same) from Hugging Face's
``create_causal_mask`` / ``create_sliding_window_causal_mask`` with the model's config (``None`` under SDPA without
padding, which SDPA runs as ``is_causal``; an explicit mask under eager attention). No KV cache
(``use_cache=False``). Hence no padding mask and no packed-sequence positions: a batch is full rows of token ids.

Names. A stage keeps each module at the model's own attribute path (``model.layers.3.self_attn.q_proj.weight``;
blocks in an ``nn.ModuleDict`` keyed by their index in the model), sharing it, not copying it. So every stage's
parameter names are the model's, ``model.StageModules(stages)`` gives the model's ``state_dict`` keys, and a tied
weight (GPT-2's ``lm_head`` and ``wte``) is the same Parameter in the first and last stage, which
``PipelineSchedule`` finds by identity and all-reduces over ``pp``.

Another layout raises ``ValueError`` naming the model's class and the layouts above: write one ``nn.Module`` per
stage with the same contract (token ids in, one tensor between stages, logits out) and pass the list to
``PipelineSchedule``. ``block_types`` (classes) is a guard: each split block must be an instance of one of them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import StageModules, split_model as split_gpt
from .primitives.pipeline.schedule import layer_split

HF_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYOUTS = ("gpt", "hf-llama", "hf-gpt2", "nanogpt", "torchtitan")

__all__ = ["HF_LLAMA_TYPES", "LAYOUTS", "StageModules", "layout_of", "split_model"]


def _get(module, path: str):
    for part in path.split("."):
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    return module


def _block_items(container) -> list[tuple[str, nn.Module]]:
    """``(key, block)`` in forward order: an ``nn.ModuleDict``'s own keys, an ``nn.ModuleList``'s indices."""
    if isinstance(container, nn.ModuleDict):
        return list(container.items())
    return [(str(i), block) for i, block in enumerate(container)]


def _has(model, *paths: str) -> bool:
    return all(_get(model, p) is not None for p in paths)


def _no_cache(fn) -> dict:
    """``{"cache": None}`` where ``fn`` takes ``cache`` (transformers >= 5.2x renamed it), else
    ``{"past_key_values": None}``."""
    import inspect

    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        names = {}
    return {"cache": None} if "cache" in names else {"past_key_values": None}


class StageNode(nn.Module):
    """A bare container that holds a stage's modules under the model's attribute path (``model`` in
    ``model.layers.0``). ``StageModules`` merges these across stages."""

    _stage_container = True

    def forward(self, *args, **kwargs):
        raise RuntimeError("a StageNode only holds modules under the model's names; call the stage")


class DecoderStage(nn.Module):
    """A contiguous slice of a decoder: ``forward(x)`` = head(blocks(embed(x))), each part only where this stage
    holds it. Subclasses name the paths (``FIRST``, ``BLOCKS``, ``SHARED``, ``LAST``) and the calls."""

    FIRST: tuple[str, ...] = ()
    BLOCKS = ""
    SHARED: tuple[str, ...] = ()  # modules every stage with blocks needs (rotary embedding)
    LAST: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, block_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.block_ids = first, last, list(block_ids)
        paths = (self.FIRST if first else ()) + (self.SHARED if block_ids else ()) + (self.LAST if last else ())
        for path in paths:
            self._attach(path, _get(model, path))
        items = _block_items(_get(model, self.BLOCKS))
        self._attach(self.BLOCKS, nn.ModuleDict(dict(items[i] for i in block_ids)))

    def _attach(self, path: str, module: nn.Module) -> None:
        node, parts = self, path.split(".")
        for part in parts[:-1]:
            if part not in node._modules:
                node.add_module(part, StageNode())
            node = node._modules[part]
        node.add_module(parts[-1], module)

    def stage_blocks(self) -> list[nn.Module]:
        return list(_get(self, self.BLOCKS).values())

    takes_positions = True  # the model's forward takes ``position_ids`` (False: blocks place tokens by index)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids``: each token's position, ``(B, T)`` or ``(T,)``, as the model's forward takes it (None:
        ``arange(T)``)."""
        if position_ids is not None and not self.takes_positions:
            raise ValueError(f"{type(self).__name__} places tokens by their index in the sequence: it takes no "
                             "position_ids")
        pos = self._positions(x, position_ids)
        if self.first:
            x = self.embed(x, pos)
        if self.block_ids:
            context = self.context(x, pos)
            for index, block in zip(self.block_ids, self.stage_blocks()):
                x = self.run_block(block, index, x, context)
        if self.last:
            x = self.head(x)
        return x

    @staticmethod
    def _positions(x: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """``(B or 1, T)``: ``position_ids`` (``(T,)`` gets a batch dim), else ``arange(T)``; ``x``: token ids or
        hidden states, ``T = x.shape[1]``."""
        T = x.shape[1]
        if position_ids is None:
            return torch.arange(T, device=x.device).unsqueeze(0)
        pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        if pos.shape[-1] != T:
            raise ValueError(f"position_ids of {pos.shape[-1]} positions for a sequence of {T} tokens")
        return pos.to(x.device)


class HFLlamaStage(DecoderStage):
    FIRST, BLOCKS, LAST = ("model.embed_tokens",), "model.layers", ("model.norm", "lm_head")
    SHARED = ("model.rotary_emb",)

    def __init__(self, model, block_ids, first, last):
        super().__init__(model, block_ids, first, last)
        self.config = model.config
        types = getattr(self.config, "layer_types", None)
        sliding = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        self.mask_kinds = {i: types[i] if types else sliding for i in self.block_ids}

    def embed(self, idx, position_ids):
        return _get(self, "model.embed_tokens")(idx)

    def context(self, h, position_ids):
        from transformers import masking_utils

        makers = {"full_attention": masking_utils.create_causal_mask,
                  "sliding_attention": masking_utils.create_sliding_window_causal_mask}
        order = self._positions(h, None)  # the mask of one causal sequence: the module docstring
        masks = {kind: makers[kind](config=self.config, inputs_embeds=h, attention_mask=None, position_ids=order,
                                    **_no_cache(makers[kind])) for kind in set(self.mask_kinds.values())}
        return position_ids, _get(self, "model.rotary_emb")(h, position_ids), masks

    def run_block(self, block, index, h, context):
        position_ids, position_embeddings, masks = context
        return block(h, attention_mask=masks[self.mask_kinds[index]], position_ids=position_ids,
                     use_cache=False, position_embeddings=position_embeddings, **_no_cache(block.forward))

    def head(self, h):
        return _get(self, "lm_head")(_get(self, "model.norm")(h))


class GPT2Stage(DecoderStage):
    """Hugging Face GPT-2 (``hf=True``) or nanoGPT (blocks called ``block(x)``, no mask)."""

    FIRST, BLOCKS, LAST = ("transformer.wte", "transformer.wpe", "transformer.drop"), "transformer.h", (
        "transformer.ln_f", "lm_head")

    def __init__(self, model, block_ids, first, last, hf: bool = True):
        super().__init__(model, block_ids, first, last)
        self.config, self.hf, self.takes_positions = model.config, hf, hf  # nanoGPT: wpe(arange(T))
        self.n_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "block_size", None)

    def embed(self, idx, position_ids):
        T = idx.shape[1]
        if self.n_positions is not None and T > self.n_positions:
            raise ValueError(f"sequence length {T} exceeds the model's {self.n_positions} positions")
        t = self.transformer
        return t.drop(t.wte(idx) + t.wpe(position_ids if self.hf else position_ids[0]))

    def context(self, h, position_ids):
        if not self.hf:
            return None
        from transformers.masking_utils import create_causal_mask

        return position_ids, create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                                                position_ids=self._positions(h, None), **_no_cache(create_causal_mask))

    def run_block(self, block, index, h, context):
        if not self.hf:
            return block(h)
        position_ids, mask = context
        return block(h, None, mask, None, use_cache=False, position_ids=position_ids)

    def head(self, h):
        return self.lm_head(self.transformer.ln_f(h))


class TitanStage(DecoderStage):
    FIRST, BLOCKS, LAST = ("tok_embeddings",), "layers", ("norm", "output")
    takes_positions = False  # blocks apply freqs_cis[:T]

    def __init__(self, model, block_ids, first, last):
        super().__init__(model, block_ids, first, last)
        if block_ids:  # the same tensor, under the same name and persistence as in the model
            self.register_buffer("freqs_cis", model.freqs_cis,
                                 persistent="freqs_cis" not in model._non_persistent_buffers_set)

    def embed(self, idx, position_ids):
        return self.tok_embeddings(idx)

    def context(self, h, position_ids):
        return self.freqs_cis

    def run_block(self, block, index, h, freqs_cis):
        return block(h, freqs_cis, None)

    def head(self, h):
        return self.output(self.norm(h))


def layout_of(model: nn.Module) -> str | None:
    """The ``LAYOUTS`` name of ``model``'s layout, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if _has(model, "tok_emb", "pos_emb", "drop", "blocks", "ln_f", "head") and hasattr(model, "cfg"):
        return "gpt"
    if model_type in HF_LLAMA_TYPES and _has(model, *HFLlamaStage.FIRST, HFLlamaStage.BLOCKS, *HFLlamaStage.SHARED,
                                              *HFLlamaStage.LAST):
        return "hf-llama"
    if _has(model, *GPT2Stage.FIRST, GPT2Stage.BLOCKS, *GPT2Stage.LAST):
        if model_type == "gpt2":
            return "hf-gpt2"
        if model_type is None and isinstance(model.transformer, nn.ModuleDict):
            return "nanogpt"
    if _has(model, *TitanStage.FIRST, TitanStage.BLOCKS, *TitanStage.LAST) and isinstance(
            getattr(model, "freqs_cis", None), torch.Tensor) and isinstance(model.layers, nn.ModuleDict):
        return "torchtitan"
    return None


_STAGES = {"hf-llama": HFLlamaStage, "hf-gpt2": GPT2Stage, "nanogpt": GPT2Stage, "torchtitan": TitanStage}
_BLOCKS = {"gpt": "blocks", "hf-llama": HFLlamaStage.BLOCKS, "hf-gpt2": GPT2Stage.BLOCKS,
           "nanogpt": GPT2Stage.BLOCKS, "torchtitan": TitanStage.BLOCKS}


def split_model(model: nn.Module, n_stages: int, layers_per_stage=None, block_types=None) -> list[nn.Module]:
    """``n_stages`` stage modules of ``model`` (see the module docstring); they share its parameters."""
    layout = layout_of(model)
    if layout is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        kind = f" (config.model_type={model_type!r})" if model_type else ""
        raise ValueError(
            f"split_model does not know the layout of {type(model).__name__}{kind}; it splits {', '.join(LAYOUTS)} "
            f"(Hugging Face model_type {', '.join(HF_LLAMA_TYPES)}, gpt2). For another model write one nn.Module per "
            "stage (token ids in, one tensor between stages, logits out) and pass the list to PipelineSchedule")
    blocks = [block for _, block in _block_items(_get(model, _BLOCKS[layout]))]
    if block_types is not None:
        types = tuple(block_types) if isinstance(block_types, (list, tuple, set)) else (block_types,)
        wrong = sorted({type(b).__name__ for b in blocks if not isinstance(b, types)})
        if wrong:
            raise ValueError(f"block_types={[t.__name__ for t in types]} but {type(model).__name__}'s "
                             f"{_BLOCKS[layout]} holds {', '.join(wrong)}")
    if layout == "gpt":
        return split_gpt(model, n_stages, layers_per_stage)
    counts = layer_split(len(blocks), n_stages, layers_per_stage)
    starts = [sum(counts[:i]) for i in range(n_stages)]
    extra = {"hf": layout == "hf-gpt2"} if _STAGES[layout] is GPT2Stage else {}
    return [_STAGES[layout](model, list(range(starts[i], starts[i] + counts[i])), i == 0, i == n_stages - 1, **extra)
            for i in range(n_stages)]
