"""Helpers for the standalone primitive tests: a tiny decoder nobody here wrote, batches, and a process launcher.

Only the standard library and torch: this file travels with ``python -m curry_train add NAME`` into any
repository, next to the primitive's tests.

* ``tiny_decoder(...)``: a torchtitan-style causal decoder (``tok_embeddings``, ``layers`` = an ``nn.ModuleDict``
  keyed "0", "1", ..., pre-norm attention + SwiGLU MLP, final ``norm``, ``output``, optionally tied to the
  embedding); ``forward(tokens) -> logits``.
* ``split_stages(model, n)``: the same model as ``n`` pipeline stage modules sharing its parameters.
* ``make_batch(...)``: a deterministic ``(tokens, targets)`` pair, optionally with padded targets (-100).
* ``token_loss(logits, targets)``: ``(summed token cross-entropy, number of valid targets)``.
* ``spawn(fn, world_size, *args)``: ``fn(rank, world_size, *args)`` on gloo ranks; their return values, the
  first failing rank's traceback as an exception, and a hard timeout (every rank killed).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


# -- a tiny decoder in the style of torchtitan's Llama ------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # heads inferred (-1), as torchtitan: a tensor-parallel rank runs its n_heads / tp heads
        q, k, v = (w(x).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, 4 * dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Decoder(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, T, vocab]``. No position encoding: the causal mask is enough here."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, dropout: float = 0.0, tie: bool = False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(dim, n_heads, dropout) for i in range(n_layers)})
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        if tie:  # one Parameter for the embedding and the output head
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def tiny_decoder(vocab: int = 64, dim: int = 32, n_layers: int = 2, n_heads: int = 2, seed: int = 0,
                 dropout: float = 0.0, tie: bool = False) -> Decoder:
    """A fresh ``Decoder``; the same ``seed`` gives bit-identical weights in every process."""
    torch.manual_seed(seed)
    return Decoder(vocab, dim, n_layers, n_heads, dropout, tie)


class Stage(nn.Module):
    """Part of a ``Decoder`` for pipeline parallelism: embeddings on the first stage, some layers, norm + output
    on the last. It holds the model's own modules (no copies), so parameter names match the model's."""

    def __init__(self, model: Decoder, layer_ids: list[str], first: bool, last: bool):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict({i: model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.output = model.output if last else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        for layer in self.layers.values():
            h = layer(h)
        if self.output is not None:
            h = self.output(self.norm(h))
        return h


def split_stages(model: Decoder, n_stages: int) -> list[Stage]:
    """``model`` as ``n_stages`` stages with the same number of layers each (running them in order = ``model``)."""
    ids = list(model.layers.keys())
    if len(ids) % n_stages:
        raise ValueError(f"{len(ids)} layers do not split evenly into {n_stages} stages")
    per = len(ids) // n_stages
    return [Stage(model, ids[s * per:(s + 1) * per], first=s == 0, last=s == n_stages - 1) for s in range(n_stages)]


# -- data and loss ------------------------------------------------------------------------------------------------

def make_batch(rows: int = 8, seq: int = 16, vocab: int = 64, seed: int = 0, padded: bool = False):
    """``(tokens, targets)`` of shape ``[rows, seq]``, targets = the next token. ``padded=True`` masks the tail of
    each row's targets with -100, a different length per row, so micro-batches hold uneven valid-token counts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    if padded:
        for r in range(rows):
            y[r, 1 + (11 * r) % seq:] = IGNORE_INDEX  # valid lengths 1, 12, 8, 2, 13, ... for seq=16
    return x, y


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of cross-entropy over valid targets, number of valid targets)``; the mean is ``sum / count``."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: grad}`` of every parameter that has one (cloned)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two ``{name: tensor}`` dicts with the same keys."""
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- local multi-process launches ---------------------------------------------------------------------------------

class SpawnError(RuntimeError):
    """A rank failed (message: its traceback) or the launch ran past its timeout."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, result_dir, args, backend="gloo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        torch.save(fn(rank, world_size, *args), os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)  # no barrier: the peers may be stuck; the parent kills them
    # gloo worker threads can abort the interpreter at exit (torch 2.13): leave without finalisation
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _first_traceback(result_dir: str) -> str:
    """The root cause: the error file written first (peers fail later, with 'connection closed')."""
    time.sleep(0.5)  # let a rank still writing its traceback finish
    paths = [os.path.join(result_dir, f) for f in os.listdir(result_dir) if f.endswith(".err")]
    written = sorted((os.path.getmtime(p), p) for p in paths if os.path.getsize(p))
    return open(written[0][1]).read() if written else "(no traceback written)"


def spawn(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local gloo ranks (``backend="nccl"``: one GPU per
    rank); return the per-rank results.

    ``fn`` must be a module-level function (it is pickled by name) and return something ``torch.save`` can
    write. Raises ``SpawnError`` with the first failing rank's traceback, or after ``timeout`` seconds with
    every rank killed: a hang is a failure, never waited on.
    """
    with tempfile.TemporaryDirectory(prefix="standalone_spawn_") as result_dir:
        ctx = mp.spawn(_entry, args=(fn, world_size, free_port(), result_dir, args, backend), nprocs=world_size,
                       join=False)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise SpawnError(f"{fn.__name__} at world size {world_size} timed out after {timeout:.0f}s")
        except mp.ProcessExitedException as e:
            raise SpawnError(f"rank {e.error_index} exited with code {e.exit_code}:\n"
                             f"{_first_traceback(result_dir)}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [_load_result(os.path.join(result_dir, f"rank{r}.pt"), r) for r in range(world_size)]


def _load_result(path: str, rank: int):
    """A rank's result, read with ``weights_only=True`` (nothing read from disk runs code): tensors, numbers,
    strings and containers of them come back; another type is one error line naming it."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), type(e).__name__)
        raise SpawnError(f"rank {rank}'s result holds a type torch.load(weights_only=True) refuses ({first}); return "
                     "tensors, numbers, strings, and dicts, lists or tuples of them") from None
