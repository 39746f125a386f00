"""Process-group plumbing: torchrun environment, spawned local launches, and a clean exit.

Two ways in:

* ``torchrun --nproc-per-node N -m curry_train train``: ``init_from_env()`` reads ``RANK``/``WORLD_SIZE``
  set by torchrun and starts the default group (nccl when CUDA is available, gloo otherwise).
* ``launch(fn, world_size, *args)``: tests and benches start ``world_size`` local ranks with
  ``torch.multiprocessing.spawn`` on 127.0.0.1, run ``fn(rank, world_size, *args)`` in each and return the
  per-rank return values. A hard timeout kills every rank: a hang is reported as a failure, never waited on.
  gloo by default; ``backend="nccl"`` gives rank ``r`` the GPU ``cuda:r`` (needs ``world_size`` GPUs).

Gloo worker threads can abort the interpreter at exit (``terminate called without an active exception``,
in a fraction of runs on PyTorch 2.13) *after* ``destroy_process_group`` has returned. ``exit_cleanly()``
avoids it: barrier, destroy, flush, ``os._exit``.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world_size() -> int:
    """World size announced by torchrun (1 when not launched by it). Readable before any group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Start the default process group if torchrun launched us with WORLD_SIZE > 1. Returns True if it did."""
    if env_world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // env_world_size()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = _restart_safe_store()
    if store is None:
        dist.init_process_group(default_backend())
    else:
        dist.init_process_group(default_backend(), store=store, rank=int(os.environ["RANK"]), world_size=env_world_size())
    return True


def _restart_safe_store():
    """After a torchelastic restart, a store whose keys cannot be stale; None = let torch build the store.

    torchrun keeps one TCPStore across restarts (the agent's, shared with the workers), so the keys the
    failed attempt wrote are still there: a restarted gloo rank can read its dead peer's address and fail
    with ``connectFullMesh ... Connection refused`` (seen on torch 2.13). Prefixing
    every key with ``TORCHELASTIC_RESTART_COUNT`` isolates the attempts. Only on one node, where every
    worker shares that count; multi-node jobs keep torch's default (or set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1).
    """
    env = os.environ
    restart = env.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or env.get("LOCAL_WORLD_SIZE") != env.get("WORLD_SIZE") or "MASTER_PORT" not in env:
        return None
    from datetime import timedelta

    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), env_world_size(),
        is_master=not agent_store and env.get("RANK") == "0", timeout=timedelta(minutes=10),
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"curry_train/attempt_{restart}/", store)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device if there is one, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but torch.cuda.is_available() is False; use device=cpu or device=auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def exit_cleanly(code: int = 0) -> None:
    """Barrier, destroy the group, flush, and leave without interpreter finalisation (see module docstring)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawn_entry(local_rank, fn, world_size, port, result_dir, args, backend="gloo"):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
        RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
    )
    torch.set_num_threads(1)
    code = 0
    try:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=local_rank, world_size=world_size)
        result = fn(local_rank, world_size, *args)
        torch.save(result, os.path.join(result_dir, f"rank{local_rank}.pt"))
    except BaseException:
        with open(os.path.join(result_dir, f"rank{local_rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    if code:
        # A failed rank must not wait in a barrier for peers that may be stuck; the launcher kills them.
        sys.stderr.flush()
        os._exit(code)
    exit_cleanly(0)


class LaunchError(RuntimeError):
    pass


def _first_traceback(result_dir: str) -> str:
    """The root cause: the non-empty error file written first (peers fail later, with 'connection closed')."""
    time.sleep(0.5)  # let a rank that is still writing its traceback finish
    paths = [os.path.join(result_dir, f) for f in os.listdir(result_dir) if f.endswith(".err")]
    written = sorted((os.path.getmtime(p), p) for p in paths if os.path.getsize(p))
    return open(written[0][1]).read() if written else ""


def launch(fn, world_size: int, *args, timeout: float = 180.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks (``backend``: gloo on CPU, or nccl
    with one GPU per rank); return each rank's result.

    ``fn`` must be importable by name (a module-level function). Raises ``LaunchError`` with the failing
    rank's traceback, or after ``timeout`` seconds with every rank killed.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank: world size {world_size}, "
                         f"{torch.cuda.device_count()} GPU(s) visible")
    with tempfile.TemporaryDirectory(prefix="curry_train_launch_") as result_dir:
        ctx = mp.spawn(
            _spawn_entry, args=(fn, world_size, free_port(), result_dir, args, backend), nprocs=world_size, join=False
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise LaunchError(f"{getattr(fn, '__name__', fn)} at world size {world_size} timed out after {timeout:.0f}s")
        except mp.ProcessExitedException as e:
            raise LaunchError(f"rank {e.error_index} exited with code {e.exit_code}\n{_first_traceback(result_dir)}") from None
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
        raise LaunchError(f"rank {rank}'s result holds a type torch.load(weights_only=True) refuses ({first}); return "
                     "tensors, numbers, strings, and dicts, lists or tuples of them") from None

