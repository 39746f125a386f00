"""Prepared data at any size: ``python -m curry_train prepare data.path=<file | folder | glob> --out DIR``.

Inputs (``find_inputs``): text files (``TEXT_SUFFIXES``: one document per file), JSON lines (``.jsonl``/``.json``:
one document per line, its text under ``data.text_key``) and Parquet (``.parquet``: one document per row of the
``data.text_key`` column, read with ``pyarrow``, local files only). A folder is searched recursively for those
kinds; without ``data.path`` the embedded corpus's files (``data.stdlib_files``, up to ``data.max_bytes``) are used.
Bad input is one ``ValueError`` line: an empty folder, a file of another kind, a missing ``text_key``, a
vocabulary that does not fit the chosen dtype, a tokenizer without an end-of-text token.

``prepare(...)`` cuts the inputs into work units of about ``chunk_bytes`` (whole small files grouped; a big text or
JSON-lines file split at line ends; a Parquet file by row group), tokenizes them in ``workers`` spawned processes
(each single-threaded, ``TOKENIZERS_PARALLELISM=false``) with a tqdm bar over the input bytes, appends the
tokenizer's end-of-text id after every document, and writes the units' tokens, in input order, into shards of at
most ``shard_tokens`` tokens: ``train-00000.bin``... (raw ``uint16`` when every id is below 65,536, else
``uint32``). The last ``data.val_fraction`` of the tokens becomes ``val.bin`` (the held-out validation shard).
``index.json``, written last and atomically (the dataset exists once it does), records the tokenizer's identity
(``tokenizer.load_tokenizer(...).identity``), the dtype, the end-of-text id, the document and token counts and each
shard's size and sha256; a copy of the tokenizer goes into ``DIR/tokenizer/``.

Reading (``train data.prepared=DIR``): ``shard_stream.py`` (``open_prepared``, ``ShardStream``, re-exported here).
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shard_stream import DTYPES, FORMAT, INDEX, ShardStream, open_prepared, prepared_stream  # noqa: F401 (API)
from .tokenizer import BYTES, CONFIG_FILE, TOKENIZER_FILE, atomic_write, load_tokenizer, tokenizer_file

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl", ".json")  # .json: a JSON array of rows, or JSON lines
PARQUET_SUFFIXES = (".parquet",)


def kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in JSONL_SUFFIXES:
        return "jsonl" if suffix == ".jsonl" else "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return None


KINDS_HELP = (f"text {' '.join(TEXT_SUFFIXES)}, JSON lines {' '.join(JSONL_SUFFIXES)}, Parquet "
              f"{' '.join(PARQUET_SUFFIXES)}")


def find_inputs(spec, max_bytes: int | None = None) -> list[Path]:
    """The files ``data.path=spec`` names, sorted: a file, a folder (searched recursively) or a glob."""
    if spec is None:
        from .data import stdlib_files

        files, total = [], 0
        for p in stdlib_files():
            if max_bytes is not None and total >= max_bytes:
                break
            files.append(p)
            total += p.stat().st_size
        return files
    raw = str(spec)
    p = Path(raw).expanduser()
    if p.is_file():
        if kind_of(p) is None:
            raise ValueError(f"data.path={raw!r}: {p.suffix or 'a file without a suffix'} is not a kind prepare "
                             f"reads ({KINDS_HELP})")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and kind_of(f) is not None
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise ValueError(f"data.path={raw!r}: the folder holds no file prepare reads ({KINDS_HELP})")
        return files
    matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(raw), recursive=True) if Path(m).is_file())
    if not matches:
        raise FileNotFoundError(f"data.path={raw!r}: no such file or folder, and no file matches it as a glob")
    wrong = [m for m in matches if kind_of(m) is None]
    if wrong:
        raise ValueError(f"data.path={raw!r}: {wrong[0]} is not a kind prepare reads ({KINDS_HELP})")
    return matches


def _parquet_check(path: Path, text_key: str) -> int:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path}: not a Parquet file ({' '.join(str(e).split())[:160]})") from None
    names = f.schema_arrow.names
    if text_key not in names:
        raise ValueError(f"{path}: no column {text_key!r} (data.text_key); its columns: {', '.join(names)}")
    return f.num_row_groups


@dataclass(frozen=True)
class Piece:
    """A part of one input file: bytes ``[start, end)`` (text, JSON lines) or row group ``start`` (Parquet)."""

    path: str
    kind: str
    start: int
    end: int
    size: int  # bytes, for the progress bar
    ends_document: bool = True  # text: the file's last piece (the end-of-text id follows it)


def _line_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about ``chunk_bytes`` each, every one ending at a line end (or the file's)."""
    size = path.stat().st_size
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = min(size, start + chunk_bytes)
            if end < size:
                f.seek(end)
                f.readline()
                end = f.tell()
            ranges.append((start, end))
            start = end
    return ranges


def plan_pieces(files: list[Path], text_key: str, chunk_bytes: int) -> list[Piece]:
    pieces = []
    for path in files:
        kind = kind_of(path) or "text"
        if kind == "parquet":
            n = _parquet_check(path, text_key)
            size = path.stat().st_size
            pieces += [Piece(str(path), kind, i, i + 1, size // max(n, 1)) for i in range(n)]
            continue
        size = path.stat().st_size
        ranges = [(0, size)] if kind == "json" else _line_ranges(path, chunk_bytes) or [(0, 0)]
        pieces += [Piece(str(path), kind, a, b, b - a, ends_document=(i == len(ranges) - 1))
                   for i, (a, b) in enumerate(ranges)]
    return pieces


def group_pieces(pieces: list[Piece], chunk_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into work units of about ``chunk_bytes`` (input order kept)."""
    units, current, size = [], [], 0
    for piece in pieces:
        if current and size + piece.size > chunk_bytes:
            units.append(current)
            current, size = [], 0
        current.append(piece)
        size += piece.size
    return units + ([current] if current else [])


def read_documents(piece: Piece, text_key: str) -> list[str]:
    """The documents (strings) of one piece; a JSON line without ``text_key`` is one line naming file and line."""
    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        column = pq.ParquetFile(piece.path).read_row_group(piece.start, columns=[text_key]).column(0)
        return [t for t in column.to_pylist() if t]
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    if piece.kind == "text":
        return [data.decode("utf-8", errors="replace")]
    rows = None
    if piece.kind == "json":  # a whole JSON document (an array of rows, or one row), else JSON lines
        try:
            whole = json.loads(data)
            rows = whole if isinstance(whole, list) else [whole]
        except json.JSONDecodeError:
            pass
    if rows is None:
        rows = []
        for n, line in enumerate(data.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{piece.path}: line {n} of the chunk at byte {piece.start} is not JSON "
                                     f"({e.msg}); JSON lines need one object per line") from None
    docs = []
    for row in rows:
        if not isinstance(row, dict) or text_key not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{piece.path}: a row has no key {text_key!r} (data.text_key); it has: {keys}")
        if row[text_key]:
            docs.append(str(row[text_key]))
    return docs


_WORKER: dict = {}


def _init_worker(tokenizer_spec: str, text_key: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the processes are the parallelism
    _WORKER.update(tok=load_tokenizer(tokenizer_spec), text_key=text_key, dtype=DTYPES[dtype])


def encode_unit(unit: list[Piece]) -> tuple[np.ndarray, int, int]:
    """``(tokens, documents, input bytes)`` of one work unit, the end-of-text id after every document."""
    tok, key, dtype = _WORKER["tok"], _WORKER["text_key"], _WORKER["dtype"]
    parts, n_docs = [], 0
    eot = np.array([tok.eot_id], dtype=dtype)
    for piece in unit:
        docs = read_documents(piece, key)
        if tok.kind == BYTES:
            ids = [np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(dtype) for d in docs]
        else:
            ids = [np.asarray(e, dtype=dtype) for e in tok.encode_batch(docs)]
        for arr in ids:
            parts.append(arr)
            if piece.kind != "text" or piece.ends_document:  # a text piece holds one document (or a part of it)
                parts.append(eot)
                n_docs += 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, n_docs, sum(p.size for p in unit)


def choose_dtype(vocab_size: int, dtype: str = "auto") -> str:
    if dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    if vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
        raise ValueError(f"--dtype {dtype} holds ids below {np.iinfo(DTYPES[dtype]).max + 1}; the tokenizer has "
                         f"{vocab_size} ids: use --dtype uint32 (or auto)")
    return dtype


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    def __init__(self, out: Path, dtype: str, shard_tokens: int):
        self.out, self.dtype, self.limit = out, np.dtype(dtype), shard_tokens
        self.shards: list[list] = []  # [name, tokens]
        self.f = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.f is None or self.shards[-1][1] >= self.limit:
                self._open()
            room = self.limit - self.shards[-1][1]
            self.f.write(tokens[:room].tobytes())
            self.shards[-1][1] += min(room, tokens.size)
            tokens = tokens[room:]

    def _open(self) -> None:
        if self.f is not None:
            self.f.close()
        name = f"train-{len(self.shards):05d}.bin"
        self.shards.append([name, 0])
        self.f = open(self.out / name, "wb")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()

    def split_off_tail(self, n_val: int) -> int:
        """Move the last ``n_val`` tokens into ``val.bin`` (truncating the train shards they came from)."""
        chunks, left = [], n_val
        while left > 0 and self.shards:
            name, count = self.shards[-1]
            take = min(left, count)
            mm = np.memmap(self.out / name, dtype=self.dtype, mode="r")
            chunks.insert(0, np.array(mm[count - take:count]))
            del mm
            if take == count:
                os.remove(self.out / name)
                self.shards.pop()
            else:
                os.truncate(self.out / name, (count - take) * self.dtype.itemsize)
                self.shards[-1][1] = count - take
            left -= take
        data = np.concatenate(chunks) if chunks else np.zeros(0, self.dtype)
        data.tofile(self.out / "val.bin")
        return data.size


def prepare(data_path, out_dir, tokenizer_spec=BYTES, text_key: str = "text", val_fraction: float = 0.1,
            workers: int | None = None, dtype: str = "auto", shard_tokens: int = 100_000_000,
            chunk_bytes: int = 4_000_000, max_bytes: int | None = None, progress: bool = True) -> dict:
    """Tokenize the inputs ``data_path`` names into ``out_dir`` (see the module docstring); returns the index."""
    from tqdm import tqdm

    from .primitives._checks import fraction, positive_int

    fraction("data.val_fraction", val_fraction, include_high=False)
    positive_int("--shard-tokens", shard_tokens)
    workers = positive_int("--workers", workers if workers is not None else (os.cpu_count() or 1))
    out = Path(str(out_dir)).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out_dir}: {'already holds files' if out.is_dir() else 'is a file'}; give a new "
                              "or empty folder")
    tok = load_tokenizer(tokenizer_spec)
    if tok.eot_id is None:
        raise ValueError(f"data.tokenizer={tokenizer_spec!r} has no end-of-text token (one of <|endoftext|>, </s>, "
                         "...; or tokenizer_config.json's eos_token): documents could not be separated")
    dtype = choose_dtype(tok.vocab_size, dtype)
    files = find_inputs(data_path, max_bytes)
    total_bytes = sum(f.stat().st_size for f in files)
    chunk = max(1, min(chunk_bytes, total_bytes // (4 * workers) or 1))  # >= 4 units per worker: balanced
    units = group_pieces(plan_pieces(files, text_key, chunk), chunk)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, dtype, shard_tokens)
    spec = BYTES if tok.kind == BYTES else str(tokenizer_file(tokenizer_spec).resolve())
    n_docs = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress, leave=False)
    try:
        if workers == 1:
            _init_worker(spec, text_key, dtype)
            results = map(encode_unit, units)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (spec, text_key, dtype))
            results = pool.imap(encode_unit, units)
        for tokens, docs, size in results:
            writer.write(tokens)
            n_docs += docs
            bar.update(size)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        writer.close()
        if workers > 1 and pool is not None:
            pool.terminate()
    n_total = sum(c for _, c in writer.shards)
    n_val = writer.split_off_tail(int(n_total * val_fraction))
    if tok.kind != BYTES:  # a copy beside the shards: the dataset names its tokenizer even if the original moves
        src = tokenizer_file(tokenizer_spec)
        (out / "tokenizer").mkdir()
        shutil.copy2(src, out / "tokenizer" / TOKENIZER_FILE)
        if (src.parent / CONFIG_FILE).is_file():
            shutil.copy2(src.parent / CONFIG_FILE, out / "tokenizer" / CONFIG_FILE)
    index = {
        "format": FORMAT, "tokenizer": {**tok.identity, "spec": spec}, "dtype": dtype, "eot_id": tok.eot_id,
        "text_key": text_key, "files": len(files), "input_bytes": total_bytes, "documents": n_docs,
        "tokens": {"train": n_total - n_val, "val": n_val},
        "train": [{"file": name, "tokens": count, "sha256": sha256_file(out / name)} for name, count in writer.shards],
        "val": [{"file": "val.bin", "tokens": n_val, "sha256": sha256_file(out / "val.bin")}],
    }
    atomic_write(out / INDEX, json.dumps(index, indent=2) + "\n")
    return index
