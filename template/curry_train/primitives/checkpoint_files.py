"""A checkpoint's own files: fsynced writes, per-rank RNG states, and the record of what a complete one holds.

``save_fsynced`` / ``fsync_path``: data and directory entries on disk before anything points at them.
``rng_state`` / ``set_rng_state``: torch (CPU and every CUDA device), numpy if loaded, python ``random``, as
tensors, numbers and strings only, so the file loads with ``torch.load(weights_only=True)``.

``integrity.json`` in a checkpoint directory lists every other file with its size and sha256 (format 2: the
sha256 of its 64 MiB blocks' sha256s, ``block_digests``, so one large file hashes on every core; format 1, one
sha256 of the whole file, is still verified). Each rank ``seal``s the files it wrote (``RecordingWriter`` names
them): fsync and hashing at once. Rank 0 gathers the records, seals
whatever they miss, and writes (and fsyncs) the file after every rank's files are in the temporary directory and
*before* the rename that makes the checkpoint visible, so a visible checkpoint always carries the description of
its complete self.
``verify(path)`` re-reads the files and returns ``None`` (intact) or one line naming the first problem: a missing
file, a size or checksum that differs (expected vs found), unreadable JSON. Hashing reads every byte once
(about as long as reading the checkpoint back; the checkpoint bench reports it).

``integrity.json`` is required: a checkpoint without it fails ``verify`` (one line naming its files), unless the
caller passes ``allow_unverified=True`` (``checkpoint.allow_unverified``: checkpoints of curry_train versions before
the record; then only ``.metadata`` and ``meta.json`` are checked). A file in the folder that the record does not
list fails ``verify`` too, named: a checkpoint the package wrote holds no other file.
The record guards against accidents (a truncated copy, flipped bits, a half-synced folder, a stray file), not
against someone who can write the folder: they can rewrite ``integrity.json`` as well. What keeps such a file from
running code is that nothing here unpickles (``checkpoint_trust``).

``without_record_crc32()`` / ``quiet_dcp()``: context managers around a DCP call (``torch.save``'s per-record CRC32
off; DCP's no-process-group warning silenced). ``drop_page_cache(path)``: a file's or folder's clean pages out of the
OS page cache (``posix_fadvise(DONTNEED)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter

# One process without a process group is a supported mode (``no_dist``); DCP warns about it on every call.
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)  # also covers async saves' background thread


@contextlib.contextmanager
def without_record_crc32():
    """``torch.save`` computes a CRC32 of every record it writes (DCP writes each tensor with ``torch.save``): about
    a second per GB on one core, and redundant here, where ``integrity.json`` holds every file's sha256. Switched
    off for the duration of a synchronous save (PyTorch's own switch, ``torch.serialization.set_crc32_options``);
    ``torch.load`` reads such records."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


@contextlib.contextmanager
def quiet_dcp():
    """DCP's warning about running without a process group, silenced for one call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


def fsync_path(path: Path) -> None:
    """fsync a file (its data) or a directory (its entries: a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_fsynced(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_own_files(tmp: Path, meta: dict, scheduler, rank: int) -> None:
    """A save's files beside DCP's: every rank its RNG states; rank 0 the scheduler's state and ``meta.json``
    (each fsynced)."""
    save_fsynced(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        if scheduler is not None:
            save_fsynced(scheduler.state_dict(), tmp / "scheduler.pt")
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def rng_state() -> dict:
    """This process's RNG states: torch CPU, every CUDA device, numpy (if loaded) and python ``random``; tensors,
    numbers and strings only (``torch.load(weights_only=True)`` reads them back)."""
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, torch.tensor(internal, dtype=torch.int64), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")  # primitives import only torch; numpy's state matters only if it is in use
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [str(name), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    internal = internal.tolist() if torch.is_tensor(internal) else internal
    random.setstate((version, tuple(int(x) for x in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if "numpy" in state and np is not None:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys.tolist(), dtype=np.uint32), pos, has_gauss, cached))


class RecordingWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter``, remembering the files this rank wrote (``written``: names relative to the
    checkpoint directory, from DCP's own write results) so the rank can ``seal`` them itself."""

    written: list[str] = []

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        self.written = sorted({result.storage_data.relative_path for result in future.wait()})
        return future


INTEGRITY = "integrity.json"
REQUIRED = (".metadata", "meta.json")
CHUNK = 1 << 20


FORMAT = 2
HASH_BLOCK = 64 << 20  # format 2: files hashed in blocks of this many bytes, all blocks on parallel threads


def file_digest(path: Path) -> str:
    """sha256 of the whole file, one thread (``integrity.json`` format 1, still verified)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _block_sha256(path: Path, start: int, length: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while length > 0 and (chunk := f.read(min(CHUNK, length))):
            h.update(chunk)
            length -= len(chunk)
    return h.digest()


def block_digests(paths, block: int = HASH_BLOCK) -> list[str]:
    """Each file's format-2 digest: sha256 of the concatenated sha256 digests of its ``block``-byte blocks, in
    order (an empty file has no blocks: sha256 of nothing). Equally strong against corruption as one sha256 of the
    file, but the blocks of every file hash at once on up to ``os.cpu_count()`` threads (hashlib releases the
    GIL): one sha256 thread reads about 0.9 GB/s here, so a rank's single 1.2 GB file (``thread_count=1``) took
    1.2 s to record and as long to verify."""
    sizes = [Path(p).stat().st_size for p in paths]
    jobs = [(i, start, min(block, size - start)) for i, size in enumerate(sizes) for start in range(0, size, block)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        parts = list(pool.map(lambda job: _block_sha256(Path(paths[job[0]]), job[1], job[2]), jobs))
    roots = [hashlib.sha256() for _ in paths]
    for (i, _, _), digest in zip(jobs, parts):
        roots[i].update(digest)
    return [root.hexdigest() for root in roots]


def seal(directory: Path, names) -> dict:
    """fsync the files ``names`` (relative to ``directory``) and record them: ``{name: {"size", "sha256"}}``.

    Each file's fsync (a wait on the disk) and its sha256 (CPU work on the pages just written, still cached) run at
    the same time on their own threads (``os.fsync`` and hashlib release the GIL), so the record costs little beyond
    the flush a durable write needs anyway: at 100M parameters, fsync then hash took 0.9-1.0 s, both at once
    0.50 s (``bench checkpoint``). Hashes use up to ``os.cpu_count()`` threads."""
    paths = [Path(directory) / name for name in names]
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(paths), 16)) as flush:
        synced = [flush.submit(fsync_path, p) for p in paths]
        digests = block_digests(paths)
        for done in synced:
            done.result()
    return {name: {"size": p.stat().st_size, "sha256": d} for name, p, d in zip(names, paths, digests)}


def unrecorded(directory: Path, files: dict) -> list[str]:
    """The files under ``directory`` (recursively, ``integrity.json`` aside) that ``files`` does not name."""
    return [p.relative_to(directory).as_posix() for p in sorted(Path(directory).rglob("*"))
            if p.is_file() and p.name != INTEGRITY and p.relative_to(directory).as_posix() not in files]


def write_description(directory: Path, files: dict | None = None) -> None:
    """Write ``integrity.json`` for ``directory`` and fsync it (call before the directory is renamed into place).
    ``files``: records already made (``seal``, e.g. by each rank for its own files); every file they miss is sealed
    here, so the record always covers the whole directory."""
    files = dict(files or {})
    files.update(seal(directory, unrecorded(directory, files)))
    path = directory / INTEGRITY
    with open(path, "w") as f:
        json.dump({"format": FORMAT, "block_size": HASH_BLOCK, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def listing(directory: Path, limit: int = 8) -> str:
    """The files under ``directory``, comma-separated (the first ``limit``, then how many more)."""
    names = [p.relative_to(directory).as_posix() for p in sorted(Path(directory).rglob("*")) if p.is_file()]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "none"


def verify(directory: Path, allow_unverified: bool = False) -> str | None:
    """``None`` if ``directory`` is an intact checkpoint, else the first problem found, as one line. Without
    ``integrity.json`` that is a problem unless ``allow_unverified`` (then only the required files are checked)."""
    for name in REQUIRED:
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((directory / "meta.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return f"meta.json is not valid JSON ({e})"
    record = directory / INTEGRITY
    if not record.is_file():
        if allow_unverified:
            return None
        return (f"{INTEGRITY} is missing, so none of its files can be checked (files: {listing(directory)}); "
                "checkpoint.allow_unverified=true loads it unchecked (a checkpoint of curry_train before the record)")
    try:
        described = json.loads(record.read_text())
        files, form = described["files"], described.get("format", 1)
        block = described["block_size"] if form == 2 else None
        if form not in (1, 2) or not all(isinstance(w, dict) and "size" in w and "sha256" in w for w in files.values()):
            raise ValueError(f"format {form!r} with records of size and sha256 expected")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        return f"{INTEGRITY} is unreadable ({e})"
    stray = unrecorded(directory, files)
    if stray:
        return f"{len(stray)} file(s) not listed in {INTEGRITY}: {', '.join(stray[:8])}"
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, expected {want['size']}"
    names = list(files)
    digests = block_digests([directory / n for n in names], block) if form == 2 else \
        [file_digest(directory / n) for n in names]
    for name, digest in zip(names, digests):
        if digest != files[name]["sha256"]:
            return (f"{name} has sha256 {digest[:12]}..., expected {files[name]['sha256'][:12]}... (same size: "
                    "bytes changed)")
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """The exact element-wise test (used only for tensors whose fused norm below is not finite)."""
    return not bool(t.isnan().any() or t.isinf().any())


def _leaves(state, prefix: str, out: list) -> list:
    """``(name, value)`` of every floating-point tensor (DTensors: the local shard) and float, in traversal order."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        items = ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.is_floating_point() and local.numel():
                out.append((name, local))
        elif isinstance(value, float):
            out.append((name, value))
        elif isinstance(value, (dict, list, tuple)):
            _leaves(value, f"{name}.", out)
    return out


def first_nonfinite(state, prefix: str = "") -> str | None:
    """The key of the first floating-point tensor in a (nested) state dict holding NaN or Inf, else ``None``.
    DTensor shards are checked locally: call it on every rank and combine the answers.

    One fused ``torch._foreach_norm`` pass per (device, dtype): a finite norm means every element is finite (one
    NaN or Inf makes it NaN/Inf); only a tensor whose norm is not finite (it may merely have overflowed) gets the
    exact element-wise test (one op per tensor, the earlier per-tensor ``sum``, was a large part of a save's time:
    ``bench checkpoint`` shows the check's share)."""
    leaves = _leaves(state, prefix, [])
    groups: dict = {}
    for i, (_, value) in enumerate(leaves):
        if isinstance(value, torch.Tensor):
            groups.setdefault((value.device, value.dtype), []).append(i)
    suspect = set()
    for indices in groups.values():
        norms = torch._foreach_norm([leaves[i][1] for i in indices])
        finite = torch.isfinite(torch.stack([n.reshape(()) for n in norms])).tolist()
        suspect.update(i for i, ok in zip(indices, finite) if not ok)
    for i, (name, value) in enumerate(leaves):
        if isinstance(value, float):
            if not math.isfinite(value):
                return name
        elif i in suspect and not _all_finite(value):
            return name
    return None


def drop_page_cache(path) -> bool:
    """``posix_fadvise(DONTNEED)`` on ``path`` (a file, or every file under a folder): the next read comes from the
    disk for clean pages. False where the call is missing (not Linux)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    path = Path(path)
    for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True
