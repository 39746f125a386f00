"""Training data that needs no download: the Python standard library's own source, as bytes.

``load_tokens(path=None)`` returns a 1-D uint8 tensor of byte tokens (vocab 256):

* ``path=None``: the embedded corpus, every ``*.py`` file under the running interpreter's stdlib
  directory (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded) in sorted order, concatenated
  until ``max_bytes``. The result is cached as a tensor file keyed by Python version and size.
* ``path="/some/file.txt"``: the user's own text file, as bytes.

``token_streams(cfg)`` gives the train and validation streams through ``data.tokenizer`` (``tokenizer.py``), or
``data.prepared``'s memmapped shards (``prepared_data.py``: any size). ``Batches`` cuts deterministic batches out
of a stream (a tensor or a ``prepared_data.ShardStream``): the global batch of optimizer step ``s`` depends only
on ``(seed, s)``, so a data-parallel run sees exactly the rows a single process would, and a resumed run
continues with the batches an uninterrupted one would have drawn (the data position *is* the step).
With ``variable_length=True`` each row is a random-length sequence right-padded with ``PAD_TOKEN``
whose padded targets are ``IGNORE_INDEX``: the case where gradient accumulation must count tokens.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import IGNORE_INDEX
from .primitives._checks import fraction, integer

PAD_TOKEN = 0


def _cache_dir() -> Path:
    root = os.environ.get("CURRY_TRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "curry_train")
    return Path(root)


def stdlib_files() -> list[Path]:
    """Sorted list of the interpreter's stdlib ``.py`` files (no site-packages, no test data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def embedded_corpus(max_bytes: int = 4_000_000) -> torch.Tensor:
    """The stdlib source corpus as uint8 tokens, built once and cached."""
    key = hashlib.sha1(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{max_bytes}".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{key}.pt"
    if cache.exists():
        return torch.load(cache)
    chunks, total = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    tokens = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save(tokens, tmp)
    os.replace(tmp, cache)  # atomic: concurrent ranks never read a half-written cache
    return tokens


def check_text_file(path) -> Path:
    """``data.path`` as a ``Path`` (``~`` expanded); ``FileNotFoundError`` naming the key when it is not a file."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path={path!r}: no such file (give a text file, or leave data.path unset "
                                "for the embedded corpus; a folder, a glob, JSON lines or Parquet: `python -m "
                                "curry_train prepare data.path=... --out DIR`, then train with data.prepared=DIR)")
    return p


def load_tokens(path: str | None = None, max_bytes: int = 4_000_000) -> torch.Tensor:
    """Byte tokens of ``path`` (a text file), or of the embedded stdlib corpus when ``path`` is None."""
    if path is None:
        return embedded_corpus(max_bytes)
    p = check_text_file(path)
    tokens = torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8).clone()
    if tokens.numel() < 2:
        raise ValueError(f"data.path={path!r} holds {tokens.numel()} bytes; need at least 2 to form a training pair")
    return tokens


def split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``1 - val_fraction`` of the bytes for training, the tail for validation."""
    fraction("data.val_fraction", val_fraction, include_high=False)
    n = int(tokens.numel() * (1.0 - val_fraction))
    return tokens[:n], tokens[n:]


@dataclass
class Batches:
    """Deterministic batches of ``(inputs, targets)`` from a token stream.

    ``global_batch(step)`` is the full batch of one optimizer step: ``batch_size`` rows of ``seq_len`` tokens.
    ``microbatches(step, rank, world_size, n_micro)`` gives this rank's contiguous slice of it, split into
    ``n_micro`` equal micro-batches (rows ``[rank * B/W, (rank+1) * B/W)``).
    """

    tokens: torch.Tensor
    batch_size: int
    seq_len: int
    seed: int = 0
    variable_length: bool = False
    min_len: int = 8

    def __post_init__(self):
        if self.tokens.numel() <= self.seq_len + 1:
            raise ValueError(f"corpus has {self.tokens.numel()} tokens; need more than train.seq_len + 1 = {self.seq_len + 1}")
        if self.variable_length:
            integer("data.min_len", self.min_len, 1, self.seq_len, f"(train.seq_len={self.seq_len})")

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=g)
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        x, y = rows[:, :-1].clone(), rows[:, 1:].clone()
        if self.variable_length:
            lengths = torch.randint(self.min_len, self.seq_len + 1, (self.batch_size,), generator=g)
            pad = torch.arange(self.seq_len)[None, :] >= lengths[:, None]
            x[pad] = PAD_TOKEN
            y[pad] = IGNORE_INDEX
        return x, y

    def microbatches(self, step: int, rank: int = 0, world_size: int = 1, n_micro: int = 1):
        """This rank's share of step ``step``'s global batch as a list of ``n_micro`` (x, y) pairs."""
        per_rank = check_batch_split(self.batch_size, world_size, n_micro)
        x, y = self.global_batch(step)
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        return list(zip(x.chunk(n_micro), y.chunk(n_micro)))


def check_batch_split(batch_size: int, world_size: int, n_micro: int) -> int:
    """Rows per rank; the global batch must split evenly over ranks and then over micro-batches."""
    if batch_size % world_size:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the data-parallel world size {world_size}"
        )
    per_rank = batch_size // world_size
    if per_rank % n_micro:
        raise ValueError(
            f"train.batch_size={batch_size} over {world_size} rank(s) gives {per_rank} rows per rank, "
            f"not divisible by train.gradient_accumulation_steps={n_micro}"
        )
    return per_rank


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch: every rank that calls it with the same seed builds the same initial weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_text_tokens(path, max_bytes: int, tokenizer) -> torch.Tensor:
    """``data.path`` (or the embedded corpus) encoded by a non-byte ``tokenizer`` in memory, as int64 ids (for a
    corpus larger than memory: ``prepare`` it and train with ``data.prepared``)."""
    raw = bytes(load_tokens(path, max_bytes).numpy())
    return torch.tensor(tokenizer.encode(raw.decode("utf-8", errors="replace")), dtype=torch.int64)


def token_streams(cfg):
    """``(train, val)`` token streams: ``data.prepared``'s memmapped shards (``prepared_data``), or ``data.path`` /
    the embedded corpus through ``data.tokenizer`` with the tail ``data.val_fraction`` held out (``split``)."""
    from .tokenizer import load_tokenizer

    d = cfg.data
    if d.prepared is not None:
        from .prepared_data import open_prepared, prepared_stream

        meta = open_prepared(d.prepared, d.tokenizer)
        return prepared_stream(meta, "train"), prepared_stream(meta, "val")
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.kind == "bytes":
        tokens = load_tokens(d.path, d.max_bytes)
    else:
        tokens = encode_text_tokens(d.path, d.max_bytes, tokenizer)
    return split(tokens, d.val_fraction)


def build_batches(cfg, streams=None) -> Batches:
    """The training batches ``cfg.data`` and ``cfg.train`` describe (the validation split held out);
    ``streams``: ``token_streams(cfg)`` if the caller already has them."""
    train_tokens, _ = streams or token_streams(cfg)
    return Batches(
        train_tokens, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed,
        variable_length=cfg.data.variable_length, min_len=cfg.data.min_len,
    )
