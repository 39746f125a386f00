"""Look at the model: ``python -m curry_train sample checkpoint.dir=DIR --prompt "..." --max-new-tokens N
--temperature T --top-k K [--seed S]``.

``load_run(checkpoint_dir, overrides)`` rebuilds a run from its checkpoints alone: the config saved with the
checkpoint (``meta.json``'s ``extra.config``; ``overrides`` such as ``data.tokenizer=...`` are applied on top),
the model it describes (the reference GPT or ``model._target_``) on CPU, loaded from the newest checkpoint that
verifies (``Checkpointer.load``: saved at any world size, resharded into this one process; damaged ones passed over
with a warning) and the run's tokenizer (``data.tokenizer``). Returns ``(cfg, model, tokenizer, meta)``.

``generate(model, ids, ...)``: autoregressive decoding of the reference GPT (or any ``model(x) -> logits``), the
context cropped to the model's block size; ``temperature`` 0 = greedy, else softmax sampling of
``logits / temperature`` restricted to the ``top_k`` most likely ids (0 = all), drawn from a ``torch.Generator``
seeded with ``seed``: the same seed gives the same text. Decoding stops at the tokenizer's end-of-text id (kept out
of the text) or after ``max_new_tokens``. A Hugging Face model (one with ``generate``) samples through its own
``generate`` with the same settings when the prompt plus ``max_new_tokens`` fit its context (past it, learned
positions would index out of range: the window above slides instead). An empty prompt starts from the end-of-text
id (a document's start).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .primitives.model_io import logits_of


def load_run(checkpoint_dir, overrides: list[str] | None = None):
    from omegaconf import OmegaConf

    from .primitives.checkpoint import Checkpointer
    from .tokenizer import load_tokenizer
    from .user_model import build_model

    if checkpoint_dir is None:
        raise ValueError("checkpoint.dir=DIR is required: the folder a run wrote its checkpoints to")
    ckpt = Checkpointer(str(Path(str(checkpoint_dir)).expanduser()))
    candidates = ckpt.candidates() if ckpt.dir.is_dir() else []
    if not candidates:
        raise FileNotFoundError(f"checkpoint.dir={checkpoint_dir!r}: no checkpoint there (train with "
                                "checkpoint.dir=DIR checkpoint.every=N to write some)")
    meta = json.loads((candidates[0] / "meta.json").read_text())
    saved = meta.get("extra", {}).get("config")
    if saved is None:
        raise ValueError(f"{candidates[0]} records no config (an older curry_train): cannot rebuild its model")
    cfg = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(list(overrides or [])))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg)
    meta = ckpt.load(model, restore_rng=False)
    model.eval()
    return cfg, model, tokenizer, meta


def block_size(model) -> int | None:
    from .user_model import context_length

    return context_length(model)[0]


@torch.no_grad()
def generate(model, ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, eot_id: int | None = None) -> list[int]:
    """The new token ids ``model`` writes after ``ids`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long)
    context = block_size(model)
    fits = context is None or len(ids) + max_new_tokens <= context
    if fits and hasattr(model, "generate") and hasattr(model, "config"):  # a Hugging Face model: its own generate
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or None} if temperature > 0 \
            else {"do_sample": False}
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             eos_token_id=eot_id, pad_token_id=eot_id, **sampling)
        new = out[0, len(ids):].tolist()
        return new[:new.index(eot_id)] if eot_id in new else new
    new = []
    for _ in range(max_new_tokens):
        logits = logits_of(model(x[:, -context:] if context else x))[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if nxt == eot_id:
            break
        new.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return new


def sample(checkpoint_dir, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
           seed: int = 0, overrides: list[str] | None = None) -> tuple[str, dict]:
    """``(prompt + the model's continuation, checkpoint meta)``."""
    from .primitives._checks import non_negative_float, non_negative_int, positive_int

    positive_int("--max-new-tokens", max_new_tokens)
    non_negative_float("--temperature", temperature, "(0 = greedy)")
    non_negative_int("--top-k", top_k, "(0 = every id)")
    cfg, model, tokenizer, meta = load_run(checkpoint_dir, overrides)
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    new = generate(model, ids, max_new_tokens, temperature, top_k, seed, tokenizer.eot_id)
    return prompt + tokenizer.decode(new), meta
