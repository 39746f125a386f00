"""Models nobody here wrote, built tiny and from a config (no downloads), for the "your model" tests.

* ``tiny_llama()``: Hugging Face ``LlamaForCausalLM`` (blocks at ``model.layers``, RoPE, RMSNorm, SwiGLU, GQA).
* ``tiny_gpt2()``: Hugging Face ``GPT2LMHeadModel`` (blocks at ``transformer.h``, learned positions, tied head).
* ``TitanLike``: torchtitan's llama layout: ``tok_embeddings``, blocks in an ``nn.ModuleDict`` ``layers`` keyed
  "0", "1"..., each called as ``block(h, freqs_cis, attention_masks)``, ``norm``, ``output``; ``forward(tokens)``.

Each factory takes keyword sizes, so ``model._target_=foreign_models.tiny_llama model.n_layer=4`` works from the
CLI (``tests/`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256


def tiny_llama(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_kv_head: int = 2, vocab_size: int = VOCAB,
               block_size: int = 128, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=2 * n_embd,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                      max_position_embeddings=block_size, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def tiny_gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = VOCAB, block_size: int = 128,
              seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def _rope(head_dim: int, seq_len: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (T, head_dim / 2, 2)


def _apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = freqs[: x.shape[1], :, 0][None, :, None, :], freqs[: x.shape[1], :, 1][None, :, None, :]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class TitanBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, attention_masks=None) -> torch.Tensor:
        h = self.attention_norm(x)
        B, T, _ = h.shape  # as torchtitan: heads inferred (-1), so a tensor-parallel rank runs its local heads
        q, k, v = (w(h).view(B, T, -1, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = _apply_rope(q, freqs_cis), _apply_rope(k, freqs_cis)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TitanLike(nn.Module):
    def __init__(self, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = VOCAB,
                 block_size: int = 128):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, n_embd)
        self.register_buffer("freqs_cis", _rope(n_embd // n_head, block_size), persistent=False)
        self.layers = nn.ModuleDict({str(i): TitanBlock(n_embd, n_head) for i in range(n_layer)})
        self.norm = nn.RMSNorm(n_embd)
        self.output = nn.Linear(n_embd, vocab_size, bias=False)
        nn.init.normal_(self.output.weight, std=1 / math.sqrt(n_embd))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis, None)
        return self.output(self.norm(h))


def titan_like(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab_size: int = VOCAB, block_size: int = 128,
               seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TitanLike(n_layer, n_embd, n_head, vocab_size, block_size)


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "titan": titan_like}


class _Poisoned(nn.Module):
    """A reference GPT whose forward returns NaN logits on calls ``nan_from`` .. ``nan_from + nan_calls - 1``
    (counted per instance, 0-based): a diverging step, on demand, for the non-finite guard tests."""

    def __init__(self, inner: nn.Module, nan_from: int, nan_calls: int):
        super().__init__()
        self.inner, self.nan_from, self.nan_calls, self.calls = inner, nan_from, nan_calls, 0

    def forward(self, idx):
        logits = self.inner(idx)
        call, self.calls = self.calls, self.calls + 1
        if self.nan_from <= call < self.nan_from + self.nan_calls:
            logits = logits * float("nan")
        return logits


def poisoned_gpt(nan_from: int = 3, nan_calls: int = 2, n_layer: int = 1, n_embd: int = 32, n_head: int = 2,
                 block_size: int = 32) -> nn.Module:
    from curry_train.model import GPT, GPTConfig

    return _Poisoned(GPT(GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size)),
                     nan_from, nan_calls)
