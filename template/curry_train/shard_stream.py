"""Reading prepared data (``train data.prepared=DIR``; ``prepared_data.prepare`` writes it).

``open_prepared(dir, tokenizer_spec)`` reads ``index.json``, refuses a dataset written by another tokenizer than
``data.tokenizer`` (one line naming both) and checks that every shard has the size the index records (the sha256
sums are there for tools; hashing a large dataset at every start would cost minutes). ``prepared_stream(meta,
split)`` is the train (or val) shards as one ``ShardStream``: ``len()`` tokens and ``stream[a:b]`` an int64 tensor,
read through ``np.memmap`` (no copy in memory, no size cap; a window may span two shards), which ``data.Batches``
cuts windows from exactly as from an in-memory tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tokenizer import BYTES, load_tokenizer

INDEX = "index.json"
FORMAT = "curry_train-prepared-1"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}



class ShardStream:
    """Token shards as one read-only stream: ``len()`` tokens, ``stream[a:b]`` an int64 tensor (``np.memmap``)."""

    def __init__(self, paths: list[Path], dtype: str):
        self.maps = [np.memmap(p, dtype=DTYPES[dtype], mode="r") for p in paths if p.stat().st_size]
        self.offsets = np.cumsum([0] + [m.size for m in self.maps])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def numel(self) -> int:
        return len(self)

    def __getitem__(self, index: slice):
        import torch  # here, not at the top: the spawned prepare workers never import torch

        start, stop, _ = index.indices(len(self))
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            local = start - self.offsets[i]
            take = min(stop - start, self.maps[i].size - local)
            parts.append(self.maps[i][local:local + take].astype(np.int64))
            start += take
            i += 1
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


def read_index(prepared) -> tuple[Path, dict]:
    root = Path(str(prepared)).expanduser()
    index = root / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"data.prepared={prepared!r}: no {INDEX} there (make one with `python -m curry_train "
                                "prepare data.path=... --out DIR`; an interrupted prepare writes none)")
    meta = json.loads(index.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"data.prepared={prepared!r}: {INDEX} is not a curry_train prepared-data index "
                         f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    return root, meta


def open_prepared(prepared, tokenizer_spec=BYTES) -> dict:
    """The index of ``data.prepared``, checked: written by ``tokenizer_spec``'s tokenizer, every shard its size."""
    root, meta = read_index(prepared)
    mine = load_tokenizer(tokenizer_spec).identity
    theirs = meta["tokenizer"]
    if (mine["kind"], mine["sha256"]) != (theirs["kind"], theirs["sha256"]):
        raise ValueError(f"data.prepared={prepared!r} was written with the tokenizer {theirs['spec']} "
                         f"({theirs['vocab_size']} ids), not data.tokenizer={tokenizer_spec} "
                         f"({mine['vocab_size']} ids): set data.tokenizer={theirs['spec']}, or prepare the data again")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for shard in meta["train"] + meta["val"]:
        path = root / shard["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["tokens"] * itemsize:
            found = "missing" if size is None else f"{size} bytes"
            raise ValueError(f"data.prepared={prepared!r}: {shard['file']} is {found}, the index says "
                             f"{shard['tokens'] * itemsize} bytes: prepare the data again")
    meta["root"] = root
    return meta


def prepared_stream(meta: dict, split: str = "train") -> ShardStream:
    return ShardStream([meta["root"] / s["file"] for s in meta[split]], meta["dtype"])
