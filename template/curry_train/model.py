"""Reference decoder-only GPT: the model every curry_train primitive is tested and benchmarked on.

Plain PyTorch, nanoGPT-shaped: token + learned position embedding, ``n_layer`` pre-norm blocks
(causal ``scaled_dot_product_attention`` + GELU MLP), a final LayerNorm and an output head tied to the
token embedding. The blocks live in ``GPT.blocks`` (an ``nn.ModuleList``) so that recompute, FSDP and
pipeline splitting can wrap or move them one by one without touching this file. The fused ``attn.qkv`` is ordered
per head (q, k, v of head 0, then head 1, ...: Megatron's layout), so tensor parallelism's contiguous column shard
gives each rank whole heads (``primitives.tensor_parallel``); nanoGPT and GPT-2 order it ``[q; k; v]`` instead.

``GPT.forward(idx)`` returns logits; the loss is computed outside (``token_loss``) as a *sum* over valid
tokens plus the count, because gradient accumulation normalises by the global token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .primitives._checks import boolean, fraction, integer, non_negative_float, positive_float, positive_int
from .primitives.moe import MoEMLP
from .primitives.pipeline.schedule import layer_split

IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """Shape of the reference GPT. Every field is validated in ``__post_init__``."""

    vocab_size: int = 256
    """Token ids are ``0 .. vocab_size - 1``; 256 = byte-level tokens (the embedded corpus is raw UTF-8 bytes)."""
    block_size: int = 128
    """Maximum sequence length (size of the learned position table); ``train.seq_len`` must not exceed it."""
    n_layer: int = 4
    """Transformer blocks (``GPT.blocks``); a pipeline splits them over its stages."""
    n_head: int = 4
    """Attention heads; must divide ``n_embd``."""
    n_embd: int = 128
    """Residual-stream width."""
    mlp_ratio: int = 4
    """Hidden width of the MLP is ``mlp_ratio * n_embd``."""
    dropout: float = 0.0
    """Dropout probability in [0, 1) after embeddings, attention and MLP; 0 = off."""
    tie_embeddings: bool = True
    """Output head shares its weight with the token embedding (GPT-2, nanoGPT)."""
    moe_experts: int = 0
    """Mixture of experts: 0 = dense MLPs; E >= 2 = ``primitives.moe.MoEMLP`` with E SwiGLU experts of hidden width
    ``mlp_ratio * n_embd`` in the blocks ``moe_every`` picks."""
    moe_every: int = 1
    """With moe_experts: blocks 1, 1 + moe_every, ... (0-based index % moe_every == 0) are MoE, the others dense."""
    moe_top_k: int = 2
    """Experts per token, in [1, moe_experts]."""
    moe_capacity_factor: float = 1.25
    """Slots per expert = ceil(factor * tokens * top_k / experts); tokens beyond it are dropped (> 0)."""
    moe_aux_loss_weight: float = 0.01
    """Switch load-balancing loss weight, >= 0 (added to the training loss)."""
    moe_bias_balancing: bool = False
    """DeepSeek-V3 auxiliary-loss-free balancing: a per-expert selection bias moved toward uniform load each step."""

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            positive_int(f"model.{name}", getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        fraction("model.dropout", self.dropout, include_high=False)
        boolean("model.tie_embeddings", self.tie_embeddings)
        if self.moe_experts:
            integer("model.moe_experts", self.moe_experts, 2, None, "(0 = dense MLPs)")
            positive_int("model.moe_every", self.moe_every)
            integer("model.moe_top_k", self.moe_top_k, 1, self.moe_experts, f"(model.moe_experts={self.moe_experts})")
            positive_float("model.moe_capacity_factor", self.moe_capacity_factor)
            non_negative_float("model.moe_aux_loss_weight", self.moe_aux_loss_weight)
            boolean("model.moe_bias_balancing", self.moe_bias_balancing)

    @classmethod
    def from_config(cls, cfg) -> "GPTConfig":
        """Build from a mapping or attribute object (e.g. Hydra's ``cfg.model``); unknown keys are an error."""
        data = dict(cfg.items()) if hasattr(cfg, "items") else dict(vars(cfg))
        data.pop("name", None)
        data.pop("init_from", None)  # the run's key (export_hf.init_from), not the shape's
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown model key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**data)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with one fused ``qkv`` projection.

    ``qkv``'s output features are ordered per head, Megatron's layout ``(n_head, 3, head_dim)``: q, k, v of head 0,
    then of head 1, ... A contiguous slice of the rows (tensor parallelism's column shard) therefore holds whole
    heads with their own q, k and v, and the forward infers the number of heads it holds from the width it gets
    (``view(B, T, -1, 3, head_dim)``), so the same code runs on all heads or on a rank's ``n_head / tp``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(3)  # heads held here: inferred
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; ``mlp`` is a mixture of experts
    (``primitives.moe.MoEMLP``) when ``moe`` is set."""

    def __init__(self, cfg: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MoEMLP(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, cfg.moe_experts, cfg.moe_top_k,
                          cfg.moe_capacity_factor, cfg.moe_aux_loss_weight,
                          bias_balancing=cfg.moe_bias_balancing) if moe else MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, moe=bool(cfg.moe_experts) and i % cfg.moe_every == 0)
                                    for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``idx``: (B, T) int64 token ids -> logits (B, T, vocab_size). ``positions`` (T,): the tokens' positions in
        their sequence (default ``arange(T)``); context parallelism passes the global ones of a rank's shard."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device) if positions is None else positions
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def n_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head is counted once); ``non_embedding`` drops both embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Model FLOPs for one token of forward + backward (no recompute), following PaLM appendix B:

        ``6 * N + 6 * n_layer * n_embd * T``: 6N for the weight matmuls (2 forward + 4 backward per
        parameter, N excluding the embedding tables but including the tied head) plus causal attention
        ``QK^T`` and ``AV``: 12 * L * d * T halved because the causal mask skips half the scores.
        A mixture of experts counts the parameters a token uses: each MoE layer's router and ``moe_top_k`` of its
        ``moe_experts`` experts (the rest of the bank is idle for that token).
        """
        T = seq_len or self.cfg.block_size
        n = self.n_params(non_embedding=True)
        for m in self.modules():
            if isinstance(m, MoEMLP):
                bank = sum(p.numel() for p in m.experts.parameters())
                n -= bank - bank * self.cfg.moe_top_k // self.cfg.moe_experts
        if self.cfg.tie_embeddings:
            n += self.head.weight.numel()  # the head matmul is real compute even though the weight is shared
        return 6 * n + 6 * self.cfg.n_layer * self.cfg.n_embd * T


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token cross-entropy over valid targets, and the number of valid targets.

    Targets equal to ``IGNORE_INDEX`` (padding) contribute nothing. Returning the *sum* lets the caller
    divide by the right count: the global number of valid tokens in the optimizer step
    (see ``GradientAccumulation``), not the count of this micro-batch.
    """
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


# ---- pipeline stages of the reference GPT ------------------------------------------------------------------

class GPTStage(nn.Module):
    """A contiguous slice of the reference GPT. The first stage embeds token ids, the last applies ``ln_f`` and the
    head and returns logits. Blocks keep their GPT index as name (``blocks.3.attn...``), so a stage's state-dict
    keys are a subset of the full model's. Submodules are shared with the model they came from, not copied."""

    def __init__(self, model: nn.Module, block_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.block_size = model.cfg.block_size
        if first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        if last:
            self.ln_f, self.head = model.ln_f, model.head
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions``: as ``GPT.forward``'s, (T,) or (B, T) (a pipeline passes keyword inputs to every stage,
        split by rows); only the first stage reads them."""
        if self.first:  # same computation as GPT.forward
            T = x.shape[1]
            if T > self.block_size:
                raise ValueError(f"sequence length {T} exceeds model.block_size {self.block_size}")
            pos = torch.arange(T, device=x.device) if positions is None else positions
            x = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks.values():
            x = block(x)
        if self.last:
            x = self.head(self.ln_f(x))
        return x


def split_model(model: "GPT", n_stages: int, layers_per_stage=None) -> list[GPTStage]:
    """Split the reference GPT into ``n_stages`` ``GPTStage`` modules: embedding on the first, ``ln_f`` + head on
    the last, blocks divided evenly (or as ``layers_per_stage`` says). The stages share parameters with ``model``."""
    for attr in ("tok_emb", "pos_emb", "drop", "blocks", "ln_f", "head", "cfg"):
        if not hasattr(model, attr):
            raise ValueError(f"split_model splits the reference GPT (missing .{attr}); build your own stage modules "
                             "and pass them to PipelineSchedule")
    counts = layer_split(len(model.blocks), n_stages, layers_per_stage)
    starts = [sum(counts[:i]) for i in range(n_stages)]
    return [GPTStage(model, list(range(starts[i], starts[i] + counts[i])), i == 0, i == n_stages - 1)
            for i in range(n_stages)]


class StageModules(nn.Module):
    """One pipeline rank's stage modules merged under the model's attribute names, for the optimizer and checkpoints:
    parameter names (and DCP keys) are the full model's (``tok_emb.weight``, ``blocks.5.attn.qkv.weight``,
    ``head.weight``; ``model.layers.3.mlp.up_proj.weight`` for a Hugging Face stage from ``curry_train.stages``), so a
    checkpoint saved by ``pp`` ranks loads into the whole model. Merge rule: an ``nn.ModuleDict`` (a stage's blocks)
    or a container marked ``_stage_container`` (``stages.StageNode``) is merged key by key across stages, any other
    child is taken as it is; buffers registered on a stage itself keep their name and persistence. The stages run
    inside ``PipelineSchedule.train_step``; calling this module is an error."""

    def __init__(self, stages):
        super().__init__()
        for stage in stages:
            _merge_stage(self, stage)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline rank's modules run inside PipelineSchedule.train_step, not module(x)")


def _merge_stage(into: nn.Module, stage: nn.Module) -> None:
    for name, buf in stage.named_buffers(recurse=False):
        into.register_buffer(name, buf, persistent=name not in stage._non_persistent_buffers_set)
    for name, child in stage.named_children():
        if isinstance(child, nn.ModuleDict) or getattr(child, "_stage_container", False):
            if name not in into._modules:
                into.add_module(name, nn.ModuleDict())
            _merge_stage(into._modules[name], child)
        else:
            into.add_module(name, child)
