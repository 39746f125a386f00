"""Where the benches run: the device, the backend and the rank counts they take from the machine, and its description.

* Single-process benches (``mfu``, ``recompute``): ``device`` (``auto`` = CUDA when ``torch.cuda.is_available()``,
  else CPU), through ``distributed.resolve_device``.
* Spawned ranks (``sharding``): CUDA + nccl, one GPU per rank, when the bench device is CUDA and there are at least
  2 GPUs; else CPU + gloo (one thread per rank). ``pipeline`` always spawns CPU + gloo ranks: its measured
  timeline is host-side time around each stage call (``PipelineSchedule(record=True)``), which on a GPU would time
  kernel launches, not kernels.
* Rank counts (``bench.world_sizes``, null = from the machine): the powers of two from 2 up to the number of GPUs
  (nccl) or of CPU cores this process may use (gloo), capped at 8 GPUs or 4 CPU ranks, at least ``[2]``: 2 cores
  give ``[2]``, 4 cores or 4 GPUs ``[2, 4]``, 8 GPUs ``[2, 4, 8]``. Given sizes are checked before any rank
  starts (``check_world_sizes``): nccl needs a GPU per rank, gloo ``RANK_BASE_BYTES`` of memory per rank.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch

from ..distributed import resolve_device

MAX_RANKS = {"nccl": 8, "gloo": 4}
# A lower bound on one spawned CPU rank's resident memory before its share of the model: the interpreter, torch, a
# gloo group, the benches' profiler and allocator caches (the sharding bench's tiny-GPT ranks grow past this).
RANK_BASE_BYTES = 512 << 20


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def bench_device(cfg) -> torch.device:
    """The device of the single-process benches: ``cfg.device`` resolved (``auto`` = CUDA if available)."""
    return resolve_device(str(cfg.device))


def rank_backend(cfg, bench: str = "sharding") -> str:
    """``nccl`` (one GPU per rank) or ``gloo`` (CPU) for the ranks ``bench`` spawns; see the module doc."""
    if bench == "pipeline":
        return "gloo"
    cuda = bench_device(cfg).type == "cuda" and torch.cuda.device_count() >= 2
    return "nccl" if cuda else "gloo"


def world_sizes(cfg, bench: str = "sharding") -> list[int]:
    """``bench.world_sizes`` if set, else the powers of two in ``[2, min(units, cap)]`` (at least ``[2]``), units =
    GPUs for nccl, CPU cores for gloo."""
    given = cfg.bench.world_sizes
    backend = rank_backend(cfg, bench)
    if given is not None:
        sizes = [int(n) for n in given]
        check_world_sizes(sizes, backend)
        return sizes
    units = torch.cuda.device_count() if backend == "nccl" else cpu_cores()
    sizes, n = [2], 4
    while n <= min(units, MAX_RANKS[backend]):
        sizes.append(n)
        n *= 2
    return sizes


def available_bytes(backend: str) -> list[float]:
    """Memory the ranks can use: each GPU's total (nccl), or the host's MemAvailable shared by every rank (gloo)."""
    if backend == "nccl":
        return [torch.cuda.mem_get_info(i)[1] for i in range(torch.cuda.device_count())]
    try:
        with open("/proc/meminfo") as f:
            return [next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))]
    except (OSError, StopIteration):
        return [float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]


def check_world_sizes(sizes, backend: str, key: str = "bench.world_sizes") -> None:
    """One ``ValueError`` line naming ``key`` when a size needs more GPUs than there are (nccl: one rank per GPU) or
    more memory than is available for that many CPU processes (gloo: ``RANK_BASE_BYTES`` each, before any model)."""
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        for n in sizes:
            if n > gpus:
                raise ValueError(f"{key}: N={n} needs {n} GPUs (one rank per GPU), this machine has {gpus}; "
                                 f"use N <= {gpus}")
        return
    have = available_bytes(backend)[0]
    limit = max(1, int(have // RANK_BASE_BYTES))
    for n in sizes:
        if n > limit:
            raise ValueError(f"{key}: N={n} spawns {n} CPU ranks of at least {RANK_BASE_BYTES / 2**30:.1f} GiB each "
                             f"({n * RANK_BASE_BYTES / 2**30:.1f} GiB), {have / 2**30:.1f} GiB available; use N <= "
                             f"{limit}")


def rank_device(backend: str, rank: int) -> torch.device:
    """The device a spawned rank computes on: its own GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a host clock read after it times the work; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def git_commit(path: str = ".") -> dict | None:
    """``{"commit", "dirty"}`` of the git repository holding ``path``, or None outside one (or without git)."""
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def describe(cfg) -> dict:
    """The machine and the software, as the report prints them."""
    device = bench_device(cfg)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    backend = rank_backend(cfg)
    return {
        "cpu": cpu_model(), "cpu_cores": cpu_cores(), "torch_threads": torch.get_num_threads(),
        "gpus": gpus, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": str(device), "sharding_ranks": f"{backend} on {'GPUs' if backend == 'nccl' else 'CPU'}",
        "pipeline_ranks": "gloo on CPU", "world_sizes": world_sizes(cfg), "git": git_commit(),
    }
