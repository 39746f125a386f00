"""``Checkpointer``: atomic, resharding, optionally asynchronous checkpoints on ``torch.distributed.checkpoint``.

Layout of ``dir``::

    step-00000010/          one complete checkpoint (the step = optimizer steps done = next step to run)
        .metadata, __0_0.distcp, ...   DCP: model + optimizer, every rank writes its own shards
        meta.json           step, world size, ``extra`` (e.g. the data position), written by rank 0
        scheduler.pt        LR scheduler state, rank 0
        rng-rank0.pt ...    torch / cuda / numpy / python RNG states as tensors, one file per rank
        integrity.json      every other file's size and sha256 (``checkpoint_files``), written last
    latest                  text file naming the newest complete step directory
    .curry-train.lock       the owner's lock (``checkpoint_trust.DirectoryLock``: pid, host, since)
    .curry-train~RUN~step-00000020/   a save in progress by run RUN (or one that crashed: removed by the next run)

Trust (``checkpoint_trust``): nothing read from a checkpoint runs code (``.metadata`` through an unpickler that
builds DCP's metadata classes only, the ``.pt`` files through ``torch.load(weights_only=True)``). Rank 0 holds the
folder's lock from its first save (``acquire``, or ``train_state.prepare_checkpointing``) to ``close``/``release``;
a second live run is ``DirectoryInUseError`` naming the holder. Only the lock holder deletes, and only the marked
temporaries of runs that are over. A save that runs out of disk space removes its partial directory, keeps every
committed checkpoint and raises ``CheckpointDiskFullError`` (one line: folder, bytes needed, bytes free).

Integrity: ``load`` verifies a checkpoint against its ``integrity.json`` before reading it (a checkpoint without
one only with ``allow_unverified=True``, warned); on resume a damaged one (truncated, flipped bytes, garbage or
missing metadata, a file the record does not list) is skipped with a ``CheckpointWarning`` naming the file, for the
newest older one that verifies; none left is ``CheckpointDamagedError``, one line listing each.
A state holding NaN/Inf is never committed (``NonFiniteStateError``; a sync save checks it while its files are
fsynced and removes them, an async save before staging).

Atomicity: every rank writes into the temporary ``step-N`` (rank 0 writes ``.metadata`` only after every rank
reported its writes done) and fsyncs its files (``checkpoint_files.seal``); rank 0 then writes ``integrity.json``,
renames the directory to ``step-N`` and only then moves ``latest`` (``checkpoint_layout``). A crash at any point leaves the
previous ``latest`` and its directory untouched. Pruning (``keep_last``, ``checkpoint_layout.prune``) runs after
``latest`` moved, never removes the directory it names, and deletes on a background thread.

Resharding: what is saved is ``checkpoint_state.training_state`` (wrapper-free FQNs, DTensor shards with global
shapes, per-FQN optimizer state, expert banks as ``Shard(0)`` DTensors), so a checkpoint written at world size 4
with FSDP2, pipeline stages, ZeRO-1 or expert parallelism loads at any other layout, 1 process included. RNG
states are per rank and restored only at the same world size (data order depends only on ``(seed, step)``, so a
resharded resume is still exact).

``async_save=True`` uses ``dcp.async_save`` (state staged to CPU memory before it returns, written by a
background thread over a dedicated gloo group so it never interleaves with training collectives). The
pending save is committed (rename + ``latest``) by ``poll()`` once done, and always waited on before the
next save and by ``wait()``/``close()`` at exit.

Speed (``bench checkpoint``): a save drops the previous checkpoint's pages from the page cache; a sync save turns
off ``torch.save``'s per-record CRC32 (the sha256 covers every byte) and fsyncs each file while hashing it (``seal``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ._config import config_getter
from .checkpoint_files import RecordingWriter, drop_page_cache, seal, write_own_files
from .checkpoint_files import first_nonfinite, quiet_dcp, verify, without_record_crc32, write_description
from .checkpoint_layout import (  # noqa: F401  (LATEST, step_dirname, step_of: part of this module's API)
    LATEST, check_writable, complete_steps, latest_complete, point_latest, prune, read_pointer,
    rename_into_place, resume_candidates, step_dirname, step_of,
)
from .checkpoint_load import CheckpointDamagedError, CheckpointWarning, load_first_usable, load_one
from .checkpoint_state import (  # noqa: F401  (CheckpointMismatchError, training_state: part of this module's API)
    CheckpointMismatchError, training_state,
)
from .checkpoint_trust import (  # noqa: F401  (the errors: part of this module's API)
    CheckpointDiskFullError, DirectoryInUseError, DirectoryLock, UntrustedPickleError, new_run_id,
    remove_stale_temporaries, temp_name,
)
from . import checkpoint_failure as save_failure
from .checkpoint_failure import attempt as _attempt, first_bad as _first_bad, timed as _timed


DCP_FAILURES = (Exception, CheckpointException)  # DCP's CheckpointException is a BaseException (not Exception)


class NonFiniteStateError(ValueError):
    """The state to save holds NaN or Inf: it is never written (a checkpoint must be a state worth resuming)."""


def _warn(message: str) -> None:
    if _rank() == 0:
        warnings.warn(message, CheckpointWarning, stacklevel=3)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


class Checkpointer:
    """Save / load / prune checkpoints under one directory. Every rank calls every method (they are collective)."""

    def __init__(self, dir, keep_last: int = 2, async_save: bool = False, process_group=None, thread_count: int = 1,
                 allow_unverified: bool = False):
        if dir is None or str(dir) == "":
            raise ValueError("checkpoint.dir must be a directory path")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be an integer >= 0 (0 keeps every checkpoint), got {keep_last!r}")
        if not isinstance(async_save, bool):
            raise ValueError(f"checkpoint.async_save must be true or false, got {async_save!r}")
        self.dir = Path(str(dir)).expanduser()
        self.keep_last = keep_last
        self.async_save = async_save
        if isinstance(thread_count, bool) or not isinstance(thread_count, int) or thread_count < 1:
            raise ValueError(f"checkpoint.thread_count must be an integer >= 1 (DCP writer threads per rank; each "
                             f"writes its own file), got {thread_count!r}")
        self.thread_count = thread_count
        if not isinstance(allow_unverified, bool):
            raise ValueError(f"checkpoint.allow_unverified must be true or false, got {allow_unverified!r}")
        self.allow_unverified = allow_unverified
        self.run, self._run_shared = new_run_id(), False  # rank 0's id names every temporary (shared at 1st save)
        self._lock = DirectoryLock(self.dir)
        weakref.finalize(self, self._lock.release)
        self._group = process_group
        self._group_ready = process_group is not None
        self._pending = None  # (future, step, tmp_dir, final_dir) of an async save not yet committed
        self._purger = None  # the thread deleting pruned checkpoints (renamed to .tmp-purge-step-N first)
        # Seconds per phase of the last save (rank 0's clock): state (state dict), nonfinite_check (sync: on a
        # thread during seal, not added to the sum), files (rng, meta, scheduler), dcp_write (sync: DCP's write into
        # the page cache; async: staging only), seal (fsync of every file with its sha256 at once, integrity.json;
        # async: the sha256 only), rename (fsync dirs, rename, latest, prune). The checkpoint bench prints them.
        self.last_save_seconds: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg, process_group=None) -> "Checkpointer":
        """From ``cfg.checkpoint`` (mapping or attribute object): ``dir``, ``keep_last``, ``async_save``,
        ``thread_count``, ``allow_unverified``."""
        get = config_getter(cfg)
        return cls(get("dir"), keep_last=get("keep_last", 2), async_save=get("async_save", False),
                   process_group=process_group, thread_count=get("thread_count", 1),
                   allow_unverified=get("allow_unverified", False))

    # -- paths and ownership -------------------------------------------------------------------------
    def acquire(self) -> list[str]:
        """Rank 0 (not collective): become the folder's one owner (``DirectoryInUseError`` naming the holder if a live
        run is), then delete the marked temporaries of runs that are over; returns their names."""
        if self._lock.held:
            return []
        self._lock.acquire()
        removed = remove_stale_temporaries(self.dir, self.run)
        if removed:  # they may be what filled the disk: the holder's name fits now
            self._lock.note_holder()
        return removed

    def release(self) -> None:
        """Give up ownership without waiting for a pending save (``close`` waits first)."""
        self._lock.release()

    def check_writable(self) -> None:
        """Create ``dir`` and write/remove a probe file; ``ValueError`` naming ``checkpoint.dir`` if that fails."""
        check_writable(self.dir, "checkpoint.dir", self.run)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in ``dir`` (directories that were renamed into place), ascending."""
        return complete_steps(self.dir)

    def latest_path(self) -> Path | None:
        """The directory ``latest`` names; if that is missing or dangling, the newest complete step directory."""
        return latest_complete(self.dir)

    def _pointer(self) -> tuple[int | None, str | None]:
        return read_pointer(self.dir)

    def candidates(self) -> list[Path]:
        """``checkpoint_layout.resume_candidates``: where a resume looks, newest first (this rank's view)."""
        return resume_candidates(self.dir)

    # -- save ----------------------------------------------------------------------------------------
    def _ensure_group(self):
        if not self._group_ready:
            if _distributed() and self.async_save:
                # Async saves run collectives from a background thread: give them their own gloo group.
                self._group = dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group

    def _barrier(self) -> None:
        if _distributed():
            dist.barrier(group=self._group)

    def save(self, step: int, model, optimizer=None, scheduler=None, extra: dict | None = None) -> Path:
        """Checkpoint the state after ``step`` optimizer steps; returns ``dir/step-N`` (committed unless async)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        extra = dict(extra or {})
        try:
            json.dumps(extra)  # extra must be JSON: fail here, not after half a save
        except TypeError as e:
            raise ValueError(f"extra must hold JSON values only (numbers, strings, lists, dicts): {e}") from None
        self.wait()
        group = self._ensure_group()
        rank, world = _rank(), _world_size()
        if not self._run_shared:
            self.run, self._run_shared = self._from_rank0(self.run), True
        clock = time.perf_counter()
        state = training_state(model, optimizer)
        self.last_save_seconds = {"state": time.perf_counter() - clock}
        if self.async_save:  # checked before staging; a sync save checks while it seals (``_seal_and_commit``)
            clock = time.perf_counter()
            self._refuse_nonfinite(step, _first_bad(self._gather(self._nonfinite(state, scheduler))))
            self.last_save_seconds["nonfinite_check"] = time.perf_counter() - clock
        clock = time.perf_counter()
        previous = self.latest_path()
        if previous is not None:  # its pages stay cached but are not needed: freed, the new files can reuse them
            drop_page_cache(previous)
        tmp, final = self.dir / temp_name(self.run, step_dirname(step)), self.dir / step_dirname(step)
        self._agree(_attempt(self._start, tmp)[1] if rank == 0 else None, step, tmp, state)
        meta = {"step": step, "world_size": world, "extra": extra, "has_optimizer": optimizer is not None,
                "has_scheduler": scheduler is not None, "saved_at": time.time()}
        self._agree(_attempt(write_own_files, tmp, meta, scheduler, rank)[1], step, tmp, state)
        # Sync saves fsync their files themselves (``seal``: each file's fsync and sha256 at once); async saves let
        # DCP's writer threads do it, off the training thread.
        writer = RecordingWriter(str(tmp), sync_files=self.async_save, thread_count=self.thread_count)
        self.last_save_seconds["files"] = time.perf_counter() - clock
        clock = time.perf_counter()
        try:  # DCP shares every rank's write failure: all ranks raise, and all meet in ``_agree``
            if self.async_save:
                with quiet_dcp():
                    future = dcp.async_save(state, storage_writer=writer, process_group=group,
                                            no_dist=not _distributed())
            else:
                with quiet_dcp(), without_record_crc32():
                    dcp.save(state, storage_writer=writer, process_group=group, no_dist=not _distributed())
        except DCP_FAILURES as e:
            self._agree(e, step, tmp, state)
        self.last_save_seconds["dcp_write"] = time.perf_counter() - clock
        if self.async_save:
            self._pending = (future, step, tmp, final, state)
        else:
            self._seal_and_commit(step, tmp, final, [*writer.written, f"rng-rank{rank}.pt"], state, scheduler)
        return final

    def _start(self, tmp: Path) -> None:
        """Rank 0: own the folder (first save) and create the temporary directory."""
        self.acquire()
        shutil.rmtree(tmp, ignore_errors=True)  # this run's own failed earlier attempt at this step
        tmp.mkdir(parents=True)

    def _agree(self, error, step: int, tmp: Path, state: dict) -> None:
        """Collective: return if no rank's ``error`` is set; else remove ``tmp`` and raise on every rank (one line:
        ``CheckpointDiskFullError`` when a disk filled up, the failing rank's own error there, a ``RuntimeError``
        naming it elsewhere). Every committed checkpoint is kept."""
        infos = self._gather(save_failure.info(error, state))
        if all(i is None for i in infos):
            return
        self._fail(step, tmp, infos, error)

    def _fail(self, step: int, tmp: Path, infos: list, error) -> None:
        free = save_failure.free_bytes(self.dir)  # before the partial directory goes: was the disk full?
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise save_failure.error(step, self.dir, infos, free, self.steps(), error, _rank())

    def _seal_and_commit(self, step: int, tmp: Path, final: Path, own_files: list, state: dict, scheduler) -> None:
        """Sync save, after DCP wrote: every rank ``seal``s its own files (fsync + sha256) while a thread checks
        its state for NaN/Inf (the check's compute hides behind the wait on the disk); one gather shares both.
        A bad state anywhere: the files are removed, ``NonFiniteStateError`` on every rank. Else rank 0 commits."""
        clock = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as checking:
            check = checking.submit(_timed, self._nonfinite, state, scheduler)
            records, error = _attempt(seal, tmp, own_files)  # fsync can be where a full disk shows
            bad, self.last_save_seconds["nonfinite_check"] = check.result()
        everyone = self._gather((bad, records, save_failure.info(error, state)))
        self.last_save_seconds["seal"] = time.perf_counter() - clock
        if any(info is not None for _, _, info in everyone):
            self._barrier()
            self._fail(step, tmp, [info for _, _, info in everyone], error)
        bad = _first_bad([b for b, _, _ in everyone])
        if bad is not None:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # written, never committed
            self._barrier()
            self._refuse_nonfinite(step, bad)
        error = None
        if _rank() == 0:
            _, error = _attempt(self._commit, tmp, final, {n: r for _, rs, _ in everyone for n, r in rs.items()})
        info = self._from_rank0(save_failure.info(error, state) if _rank() == 0 else None)
        if info is not None:
            self._fail(step, tmp, [info], error)

    def _gather(self, value) -> list:
        """``value`` from every rank, in rank order (``[value]`` without a process group)."""
        if not _distributed():
            return [value]
        everyone = [None] * _world_size()
        dist.all_gather_object(everyone, value, group=self._group)
        return everyone

    @staticmethod
    def _nonfinite(state: dict, scheduler) -> str | None:
        """This rank's first tensor (or scheduler value) holding NaN/Inf, else None."""
        bad = first_nonfinite(state)
        if bad is None and scheduler is not None:
            bad = first_nonfinite(scheduler.state_dict(), "scheduler.")
        return bad

    def _refuse_nonfinite(self, step: int, bad: str | None) -> None:
        """Raise ``NonFiniteStateError`` (on every rank: ``bad`` is the shared verdict) if a state held NaN/Inf."""
        if bad is not None:
            raise NonFiniteStateError(f"not saving step {step}: {bad} holds NaN or Inf. Earlier checkpoints in "
                                      f"{self.dir} are kept; lower train.lr or check the data")

    def _commit(self, tmp: Path, final: Path, records: dict | None = None) -> None:
        """Rank 0, after every rank's files are written: record them (``integrity.json``; ``records``: the files the
        ranks sealed already, the rest sealed here), rename into place, move ``latest``, prune."""
        clock = time.perf_counter()
        write_description(tmp, records)
        self.last_save_seconds["seal"] = self.last_save_seconds.get("seal", 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()
        rename_into_place(tmp, final, self.run)
        point_latest(final, self.run)
        self._prune(step_of(final))
        self.last_save_seconds["rename"] = time.perf_counter() - clock

    def _prune(self, latest_step: int) -> None:
        """``checkpoint_layout.prune`` (never a checkpoint after ``latest``); what it renamed away is deleted on a
        thread (torchtitan purges so too), joined by the next save, ``wait()`` and ``close()``."""
        self._join_purger()
        doomed = prune(self.dir, self.keep_last, latest_step, self.run)
        if doomed:
            self._purger = threading.Thread(target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in doomed],
                                            name="checkpoint-purge", daemon=True)
            self._purger.start()

    def poll(self) -> bool:
        """Commit a finished async save without blocking; True if nothing is pending any more."""
        if self._pending is not None and self._pending[0].done():
            self.wait()
        return self._pending is None

    def _join_purger(self) -> None:
        if self._purger is not None:
            self._purger.join()
            self._purger = None

    def wait(self) -> Path | None:
        """Block until a pending async save finished and commit it, and until pruned checkpoints are deleted;
        returns the committed directory (None if none)."""
        self._join_purger()
        if self._pending is None:
            return None
        future, step, tmp, final, state = self._pending
        self._pending = None
        try:  # not collective (``poll`` calls it when this rank's future is done): each rank reports its own failure
            future.result()  # re-raises a failed background save: latest was not moved
            if _rank() == 0:
                # Rank 0's DCP future completes only after every rank reported its writes done (finish()).
                self._commit(tmp, final)
        except DCP_FAILURES as e:
            self._fail(step, tmp, [save_failure.info(e, state)], e)
        return final

    def close(self) -> None:
        """Wait for the last async save (call at exit: an unwaited save is lost), then give up ownership."""
        try:
            self.wait()
        finally:
            self.release()

    # -- load ----------------------------------------------------------------------------------------
    def _from_rank0(self, value):
        """``value`` as rank 0 computed it, on every rank."""
        if _distributed():
            box = [value]
            dist.broadcast_object_list(box, src=0, group=self._group if self._group_ready else None)
            return box[0]
        return value

    def shared_candidates(self) -> list[Path]:
        """``candidates()`` as rank 0 sees them, on every rank (collective): a save rank 0 is still committing
        (renaming into place) must not be missing from another rank's list."""
        return self._from_rank0(self.candidates() if _rank() == 0 else None)

    def verify(self, path) -> str | None:
        """``checkpoint_files.verify`` run by rank 0, its verdict shared with every rank (``None`` = intact)."""
        return self._from_rank0(verify(Path(path), self.allow_unverified) if _rank() == 0 else None)

    def load(self, model, optimizer=None, scheduler=None, path=None, restore_rng: bool = True) -> dict | None:
        """Load ``path`` (default: the newest checkpoint that verifies) into model/optimizer/scheduler; returns its
        ``meta``, or None when ``dir`` holds no checkpoint at all.

        Without ``path``: ``latest`` first, then older checkpoints, newest first. A checkpoint that fails
        verification (``checkpoint_files``) or whose files cannot be read is skipped with a
        ``CheckpointWarning`` naming the file and what is wrong; if none is left, ``CheckpointDamagedError``
        lists every one tried. With ``path``: that checkpoint or ``CheckpointDamagedError``. A model of another
        shape is ``CheckpointMismatchError`` (nothing loaded), never a fallback. ``meta`` gains ``path``,
        ``skipped`` (``[(name, reason)]``) and ``rng_restored`` (False with ``rng_note`` saying why).
        """
        self.wait()
        if path is not None:
            tried = [Path(path)]
        else:
            tried, problem = self._from_rank0((self.candidates(), self._pointer()[1]) if _rank() == 0 else None)
            if problem:
                _warn(f"{problem}; looking at the step directories instead")
        if not tried:
            return None
        return load_first_usable(tried, self.verify,
                                 lambda c: self._load_one(c, model, optimizer, scheduler, restore_rng),
                                 lambda message: _warn(message), self.dir, explicit=path is not None)

    def _load_one(self, candidate: Path, model, optimizer, scheduler, restore_rng: bool) -> dict:
        meta, note = load_one(candidate, model, optimizer, scheduler, restore_rng,
                              self._group if self._group_ready else None, _rank(), _world_size(), _distributed())
        if note is not None:
            warnings.warn(note, CheckpointWarning, stacklevel=4)
        return meta
