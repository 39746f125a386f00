"""What a checkpoint directory may do to the process that reads or writes it: run no code, lose no user file, have
one owner, and fail on a full disk in one line.

* ``SafeReader``: DCP's ``FileSystemReader`` whose ``.metadata`` (a pickle DCP writes) is read by an unpickler that
  builds only DCP's own metadata classes, ``torch.Size``, dtypes and layouts; anything else (``os.system``, any
  callable a tampered file names) is ``UntrustedPickleError`` before it runs. ``load_tensors`` is ``torch.load``
  with ``weights_only=True``: every other file the package writes beside DCP's holds tensors and plain values only.
* Temporary names: ``.curry-train~<run>~<what>`` (``temp_name``). The marker is in no user's file name, and
  ``<run>`` names the run that wrote it. ``remove_stale_temporaries`` deletes only marked entries of other runs,
  and is called only by the holder of the lock below (so those runs are over); anything else in the folder
  (a user's ``.tmp-data/``, another tool's files, leftovers of curry_train versions before the marker) is kept.
* ``DirectoryLock``: one owner per checkpoint folder, an advisory ``flock`` on ``<dir>/.curry-train.lock`` held by
  the process that writes (rank 0) until ``release`` or exit. The kernel drops it when the holder dies, however it
  dies (SIGKILL included), so a lock is never stale; a clean release also removes the file. The file holds the
  holder's pid, host and start time, which a refused second run prints (``DirectoryInUseError``). Re-entrant within
  one process (every ``Checkpointer`` on the same folder shares the hold). On a network filesystem it is as good as the filesystem's ``flock`` (NFS v4: yes).
* ``is_disk_full(exc)``: ENOSPC/EDQUOT anywhere in an exception's causes, DCP's per-rank failures included.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import FileSystemReader


class UntrustedPickleError(pickle.UnpicklingError):
    """A pickle in a checkpoint names something other than DCP's metadata classes: refused, nothing was run."""


class DirectoryInUseError(ValueError):
    """Another live process owns the checkpoint folder (its lock names the holder)."""


class CheckpointDiskFullError(RuntimeError):
    """A save ran out of disk space; its partial directory was removed and every committed checkpoint kept."""


# -- what DCP's .metadata may contain -----------------------------------------------------------------------------

def _allowed(module: str, name: str):
    """The object ``module.name`` if a DCP metadata pickle may name it, else None."""
    if module == dcp_metadata.__name__ and not name.startswith("__"):
        value = getattr(dcp_metadata, name, None)
        return value if isinstance(value, type) else None  # dataclasses and enums: their constructors run no code
    if module == dcp_filesystem.__name__ and name == "_StorageInfo":
        return dcp_filesystem._StorageInfo
    if module == "torch":
        value = getattr(torch, name, None)
        if value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout  # a lookup of torch.strided & co by name
    if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        return getattr(__import__("pathlib"), name)
    if module in ("collections", "builtins") and name in ("OrderedDict", "set", "frozenset", "slice"):
        return getattr(__import__(module), name)
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        value = _allowed(module, name)
        if value is None:
            raise UntrustedPickleError(f"names {module}.{name}, which is not DCP metadata (not loaded, nothing run)")
        return value


class SafeReader(FileSystemReader):
    """``FileSystemReader`` reading ``.metadata`` with ``_MetadataUnpickler`` (DCP uses ``pickle.load``)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UntrustedPickleError(f".metadata holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_tensors(path: Path):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists, dicts; never a code object."""
    return torch.load(path, map_location="cpu", weights_only=True)


# -- temporary names -----------------------------------------------------------------------------------------------

MARKER = ".curry-train~"
_TEMP = re.compile(r"^\.curry-train~([0-9a-z]+)~(.+)$")


def new_run_id() -> str:
    """This process's run id for temporary names: pid and 16 random bits, hex."""
    return f"{os.getpid():x}{secrets.token_hex(2)}"


def temp_name(run: str, what: str) -> str:
    return f"{MARKER}{run}~{what}"


def temp_run(name: str) -> str | None:
    """The run that wrote a temporary entry named ``name``; None for every other name (the user's)."""
    found = _TEMP.match(name)
    return found.group(1) if found else None


def remove_stale_temporaries(directory: Path, own_run: str | None) -> list[str]:
    """Delete the marked temporaries of every run but ``own_run`` (call only while holding the folder's lock);
    returns their names. Unmarked entries are never touched."""
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        run = temp_run(p.name)
        if run is None or run == own_run:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


# -- one owner per folder ------------------------------------------------------------------------------------------

LOCK_NAME = ".curry-train.lock"
_HELD: dict[str, list] = {}  # resolved folder -> [open lock file, holders in this process]


def _holder_line(lock_path: Path) -> str:
    try:
        h = json.loads(lock_path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["since"])))
        return f"pid {h['pid']} on host {h['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _same_file(f, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        return False


class DirectoryLock:
    """The advisory lock that makes this process the one owner of ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, key: str = "checkpoint.dir"):
        self.directory, self.key, self.held = Path(directory), key, False

    def acquire(self) -> "DirectoryLock":
        """Take the lock (creating the folder); ``DirectoryInUseError`` naming the holder if a live process has it,
        ``ValueError`` naming the key if the folder or the lock file cannot be created."""
        if self.held:
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.key}={str(self.directory)!r} is not writable: {e}") from None
        where = str(self.directory.resolve())
        if where not in _HELD:
            lock_path = self.directory / LOCK_NAME
            while True:
                try:
                    f = open(lock_path, "a+")
                except OSError as e:
                    raise ValueError(f"{self.key}={str(self.directory)!r} is not writable: {e}") from None
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    f.close()
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise DirectoryInUseError(
                        f"{self.key}={str(self.directory)!r} is in use by another run ({_holder_line(lock_path)}): "
                        f"wait for it to end, or give this run another {self.key}") from None
                if _same_file(f, lock_path):
                    break
                f.close()  # the holder removed the file as we opened it: lock the one there now
            _HELD[where] = [f, 0]
            self._where = where
            self.note_holder()
        _HELD[where][1] += 1
        self.held, self._where = True, where
        return self

    def note_holder(self) -> bool:
        """Write this process's pid, host and start time into the lock file; False if the disk is full (the lock
        holds all the same; ``Checkpointer.acquire`` tries again after removing stale temporaries)."""
        f = _HELD[self._where][0]
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
            f.flush()
            return True
        except OSError:
            return False

    def release(self) -> None:
        """Give the hold back; the last holder in this process unlocks the file (the file itself stays)."""
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self._where)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD[self._where]
            lock_path = Path(self._where) / LOCK_NAME
            if _same_file(entry[0], lock_path):
                lock_path.unlink(missing_ok=True)  # ours; removed while still locked (see ``acquire``'s retry)
            fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
            try:
                entry[0].close()
            except OSError:  # a holder line that a full disk kept in the buffer
                pass


# -- disk full -----------------------------------------------------------------------------------------------------

def is_disk_full(exc: BaseException | None) -> bool:
    """True if ENOSPC or EDQUOT is anywhere in ``exc``'s causes (DCP's ``CheckpointException.failures`` too)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return False


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
