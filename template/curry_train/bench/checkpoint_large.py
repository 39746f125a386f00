"""The large-state part of ``bench checkpoint``: save/load throughput of a >= 100M-parameter state against the disk's
own bandwidth on the same file system, the ``FileSystemWriter`` options side by side, what each part of a save costs.

* ``disk_bandwidth(dir, nbytes)``: write ``nbytes`` of random bytes to one file in ``dir`` (4 MiB writes, over a
  truncated file of the same size so the page cache has memory at hand), fsync,
  time it (write MB/s = bytes / (write + fsync)); drop the file's pages from the page cache (``posix_fadvise
  DONTNEED``: the pages are clean after the fsync) and time reading it back (cold read MB/s; ``read_cold`` is False
  where fadvise is missing, and the read then may come from memory; this is the OS's cache only, a hypervisor's or
  a controller's cache below it is not dropped); the file is removed in a ``finally``, also when a write fails.
  Median of ``repeats``.
* ``SyntheticTransformer(n_params)``: fp32 weights shaped like a GPT-2 style model (``synthetic_shape``), never run;
  ``synthetic_training_state`` adds AdamW after one step with random gradients (12 B/param with both moments).
* ``measure_large``: ``Checkpointer.save`` sync (median per phase, ``Checkpointer.last_save_seconds``) in rounds side
  by side with the disk's own file, async
  (stall until ``save()`` returns vs until committed), a cold ``load`` (integrity check included) checked bit-exact,
  then raw ``dcp.save``/``dcp.load`` per ``FileSystemWriter`` option (``DCP_OPTIONS``) in interleaved rounds.
  MB/s are 1e6 bytes/s of the checkpoint's files; fractions are of ``disk_bandwidth`` measured in the same run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from ..primitives.checkpoint import Checkpointer, training_state
from ..primitives.checkpoint_files import drop_page_cache, without_record_crc32

LARGE_PARAMS = 100_000_000
LARGE_ROUNDS = 5  # side-by-side rounds of the disk file and Checkpointer.save
BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq
MEMORY_COPIES = 4  # state + fresh copy to load into + async staging copy + gradients/AdamW temporaries
DISK_COPIES = 5  # sync and async Checkpointer dirs, each old + new during a save, one raw DCP variant
TARGET_FRACTION = 0.5
CHUNK = 4 << 20
# name -> FileSystemWriter keyword arguments (RECORD_CRC32: torch.save's per-record CRC32, on by default; Checkpointer's
# sync saves switch it off).
RECORD_CRC32 = "record_crc32"
DCP_OPTIONS = {
    "default": {},
    "thread_count=2": {"thread_count": 2},
    "thread_count=4": {"thread_count": 4},
    "record_crc32=False": {RECORD_CRC32: False},
    "thread_count=2,record_crc32=False": {"thread_count": 2, RECORD_CRC32: False},
    "single_file_per_rank=False": {"single_file_per_rank": False},
    "sync_files=False": {"sync_files": False},
    "overwrite=False": {"overwrite": False},
}


def disk_bandwidth(directory, nbytes: int, repeats: int = 3) -> dict:
    """Write + fsync ``nbytes`` to a file in ``directory``, then read it back cold; median MB/s of ``repeats``.

    The timed write truncates a file of the same size written just before: new disk blocks, and page-cache memory at
    hand (on a VM that hands freed memory back to its host, a write into fresh pages runs at the speed of the
    host's page faults, not of the disk)."""
    if nbytes <= 0 or repeats <= 0:
        raise ValueError(f"nbytes and repeats must be > 0, got {nbytes!r}, {repeats!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(min(CHUNK, nbytes))
    buf = bytearray(len(chunk))
    writes, reads, cold = [], [], True

    def write_file(path) -> float:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter()
            left = nbytes
            while left > 0:
                left -= os.write(fd, memoryview(chunk)[: min(left, len(chunk))])
            os.fsync(fd)
            return time.perf_counter() - t0
        finally:
            os.close(fd)

    for i in range(repeats):
        path = directory / f".disk-bandwidth-{os.getpid()}-{i}"
        try:
            write_file(path)  # untimed: the truncate below frees its cached pages right before the timed write
            writes.append(write_file(path))
            cold = drop_page_cache(path) and cold
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
            reads.append(time.perf_counter() - t0)
        finally:
            path.unlink(missing_ok=True)
    return {"bytes": nbytes, "write_MB_per_s": nbytes / statistics.median(writes) / 1e6,
            "read_MB_per_s": nbytes / statistics.median(reads) / 1e6, "read_cold": cold, "repeats": repeats}


def synthetic_shape(n_params: int) -> tuple[int, int, int]:
    """``(d_model, n_layer, vocab)`` with about ``n_params`` weights (at least): ``d = 64 * round(sqrt(n/160)/64)``,
    the embedding at most a quarter of the total, each block ``12 d^2 + 13 d`` (attention qkv/proj, 4x MLP, 2 norms)."""
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 10_000:
        raise ValueError(f"bench.checkpoint_params must be an integer >= 10000, got {n_params!r}")
    d = max(64, 64 * round(math.sqrt(n_params / 160) / 64))
    vocab = min(50304, max(256, n_params // (4 * d)))
    n_layer = max(1, math.ceil((n_params - vocab * d - 2 * d) / (12 * d * d + 13 * d)))
    return d, n_layer, vocab


class SyntheticTransformer(nn.Module):
    """Parameters only (``wte``, per block ``ln1/ln2``, ``qkv``, ``proj``, ``fc``, ``fc_proj`` with biases, ``ln_f``),
    initialised N(0, 0.02) from ``seed``: a checkpoint of the size and entry count of a real transformer."""

    def __init__(self, n_params: int, seed: int = 0):
        super().__init__()
        d, n_layer, vocab = synthetic_shape(n_params)
        g = torch.Generator().manual_seed(seed)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape).normal_(0.0, 0.02, generator=g))

        self.wte = param(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            block = nn.Module()
            for name, shape in (("ln1", (2, d)), ("qkv", (3 * d, d)), ("qkv_bias", (3 * d,)), ("proj", (d, d)),
                                ("proj_bias", (d,)), ("ln2", (2, d)), ("fc", (4 * d, d)), ("fc_bias", (4 * d,)),
                                ("fc_proj", (d, 4 * d)), ("fc_proj_bias", (d,))):
                setattr(block, name, param(*shape))
            self.blocks.append(block)
        self.ln_f = param(2, d)


def synthetic_training_state(n_params: int, seed: int = 0):
    """``(model, AdamW)`` after one step with random gradients: both moments filled, gradients freed."""
    model = SyntheticTransformer(n_params, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_resources(params: int, directory, key: str = "bench.checkpoint_params") -> None:
    """One ``ValueError`` line naming ``key`` if memory (``MEMORY_COPIES`` x 12 B/param) or free disk under
    ``directory`` (``DISK_COPIES`` x 12 B/param + the bandwidth file) is short."""
    copy = params * BYTES_PER_PARAM
    need, free = MEMORY_COPIES * copy, _available_memory()
    if need > free:
        raise ValueError(f"{key}={params} needs {need / 1e9:.1f} GB of memory ({MEMORY_COPIES} copies of "
                         f"{BYTES_PER_PARAM} B/param), {free / 1e9:.1f} GB available; lower {key}")
    need, free = (DISK_COPIES + 1) * copy, shutil.disk_usage(directory).free
    if need > free:
        raise ValueError(f"{key}={params} needs {need / 1e9:.1f} GB of disk under {directory}, {free / 1e9:.1f} GB "
                         f"free; lower {key}")


def dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (torch.equal(x, b[k]) if isinstance(x, torch.Tensor) else
         _equal_state(x, b[k]) if isinstance(x, dict) else x == b[k]) for k, x in a.items())


def save_with(state: dict, path: Path, options: dict) -> float:
    """``dcp.save`` with ``FileSystemWriter(path, **options)``; ``options[RECORD_CRC32]=False`` switches
    ``torch.save``'s record CRC32 off for this save only, as ``Checkpointer``'s sync save does. Returns seconds."""
    options = dict(options)
    crc = options.pop(RECORD_CRC32, True)
    with without_record_crc32() if crc is False else contextlib.nullcontext():
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=FileSystemWriter(str(path), **options), no_dist=True)
        return time.perf_counter() - t0


def raw_dcp(state: dict, path: Path, options: dict) -> tuple[float, float, int, int]:
    """``save_with``, then a cold ``dcp.load`` into ``state`` (same values): ``(save_s, load_s, bytes, files)``."""
    save_s = save_with(state, path, options)
    size, files = dir_bytes(path), sum(1 for p in path.rglob("*") if p.is_file())
    drop_page_cache(path)
    t0 = time.perf_counter()
    dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return save_s, time.perf_counter() - t0, size, files


def measure_large(params: int, directory, repeats: int = 3, options: dict | None = None,
                  thread_counts: tuple = (1, 2), rounds: int = LARGE_ROUNDS) -> dict:
    """Everything in the module docstring, in ``directory`` (removed pieces as it goes); seconds, bytes, MB/s.
    ``Checkpointer.save`` runs at each of ``thread_counts`` (``checkpoint.thread_count``) in ``rounds`` rounds, each
    round also writing the disk's own file (``disk_bandwidth``), so the target's two sides share the machine's state
    (this machine's write speed swings 2-5x with what ran seconds before); the top-level ``save_*`` numbers are the
    fastest thread count's (the first thread count's checkpoint is the one loaded). ``repeats``: async saves, loads
    and each raw DCP option."""
    directory = Path(directory)
    options = DCP_OPTIONS if options is None else options
    model, opt = synthetic_training_state(params, seed=0)
    ckpts = {t: Checkpointer(directory / f"sync-{t}", keep_last=1, thread_count=t) for t in thread_counts}
    saves, phases = {t: [] for t in thread_counts}, {t: [] for t in thread_counts}
    disk_runs, sides = [], ["disk", *thread_counts]
    for step in range(1, rounds + 1):  # the disk file and each thread count side by side, who goes first rotating
        for side in sides[step % len(sides):] + sides[: step % len(sides)]:
            if side == "disk":
                disk_runs.append(disk_bandwidth(directory, max(params * BYTES_PER_PARAM, 8 << 20), repeats=1))
                continue
            t0 = time.perf_counter()
            ckpts[side].save(step, model, opt)
            saves[side].append(time.perf_counter() - t0)
            phases[side].append(dict(ckpts[side].last_save_seconds))
    for t in thread_counts[1:]:
        shutil.rmtree(directory / f"sync-{t}", ignore_errors=True)
    ckpt = ckpts[thread_counts[0]]
    path = ckpt.latest_path()
    size = dir_bytes(path)
    disk = {"bytes": disk_runs[0]["bytes"], "repeats": rounds, "read_cold": all(d["read_cold"] for d in disk_runs),
            "write_MB_per_s": statistics.median(d["write_MB_per_s"] for d in disk_runs),
            "read_MB_per_s": statistics.median(d["read_MB_per_s"] for d in disk_runs),
            "write_MB_per_s_all": [d["write_MB_per_s"] for d in disk_runs]}
    sync_rows = [{"thread_count": t, "save_s": statistics.median(saves[t]), "save_s_all": saves[t],
                  "phases_s": {k: statistics.median(p.get(k, 0.0) for p in phases[t]) for k in phases[t][0]}}
                 for t in thread_counts]
    for row in sync_rows:
        row["save_MB_per_s"] = size / row["save_s"] / 1e6
        row["save_of_disk"] = row["save_MB_per_s"] / disk["write_MB_per_s"]
        row["save_of_disk_per_round"] = [size / s / 1e6 / d["write_MB_per_s"] for s, d in zip(row["save_s_all"], disk_runs)]
    best = min(sync_rows, key=lambda row: row["save_s"])
    async_ckpt = Checkpointer(directory / "async", keep_last=1, async_save=True)
    stalls, totals = [], []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        async_ckpt.save(step, model, opt)
        stalls.append(time.perf_counter() - t0)
        async_ckpt.wait()
        totals.append(time.perf_counter() - t0)
    shutil.rmtree(directory / "async", ignore_errors=True)
    fresh, fresh_opt = synthetic_training_state(params, seed=1)
    loads, verifies = [], []
    for _ in range(repeats):
        drop_page_cache(path)
        t0 = time.perf_counter()
        ckpt.load(fresh, fresh_opt)
        loads.append(time.perf_counter() - t0)
        drop_page_cache(path)
        t0 = time.perf_counter()
        assert ckpt.verify(path) is None
        verifies.append(time.perf_counter() - t0)
    exact = _equal_state(training_state(fresh, fresh_opt), training_state(model, opt))
    del fresh, fresh_opt
    shutil.rmtree(directory / f"sync-{thread_counts[0]}", ignore_errors=True)
    state = training_state(model, opt)
    raw = {name: [] for name in options}
    names = list(options)
    for r in range(repeats):  # interleaved rounds; the side that goes first rotates
        for name in names[r % len(names):] + names[: r % len(names)]:
            target = directory / "raw" / f"{name}-{r}"
            raw[name].append(raw_dcp(state, target, options[name]))
            shutil.rmtree(target, ignore_errors=True)
    rows = []
    for name, runs in raw.items():
        save_s, load_s = statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs)
        rows.append({"option": name, "files": runs[0][3], "bytes": runs[0][2], "save_s": save_s,
                     "save_MB_per_s": runs[0][2] / save_s / 1e6, "save_of_disk": runs[0][2] / save_s / 1e6 / disk["write_MB_per_s"],
                     "load_s": load_s, "load_MB_per_s": runs[0][2] / load_s / 1e6,
                     "load_of_disk": runs[0][2] / load_s / 1e6 / disk["read_MB_per_s"]})
    return {"params": n_params(model), "shape": dict(zip(("d_model", "n_layer", "vocab"), synthetic_shape(params))),
            "bytes": size, "disk": disk, "checkpointer": sync_rows, "thread_count": best["thread_count"],
            "save_s": best["save_s"], "save_phases_s": best["phases_s"], "save_MB_per_s": best["save_MB_per_s"],
            "save_of_disk": best["save_of_disk"], "save_of_disk_per_round": best["save_of_disk_per_round"],
            "async_stall_s": statistics.median(stalls), "async_total_s": statistics.median(totals),
            "load_s": statistics.median(loads), "verify_s": statistics.median(verifies),
            "load_MB_per_s": size / statistics.median(loads) / 1e6, "load_exact": exact, "dcp_options": rows,
            "repeats": repeats, "rounds": rounds}


def print_large(r: dict) -> None:
    disk, sh = r["disk"], r["shape"]
    print(f"large state: synthetic fp32 transformer (d_model {sh['d_model']}, {sh['n_layer']} blocks, vocab "
          f"{sh['vocab']}) + AdamW exp_avg/exp_avg_sq, {r['params']:,} params, {r['bytes'] / 1e9:.2f} GB on disk; "
          f"the disk file and Checkpointer.save: median of {r['rounds']} side-by-side rounds, the rest median of "
          f"{r['repeats']}")
    how = "cold: pages dropped with posix_fadvise" if disk["read_cold"] else "may be from the page cache"
    runs = ", ".join(f"{x:.0f}" for x in disk.get("write_MB_per_s_all", []))
    print(f"  disk, same file system   write+fsync {disk['write_MB_per_s']:8.0f} MB/s   read {disk['read_MB_per_s']:8.0f} "
          f"MB/s ({how}; {disk['bytes'] / 2**20:.0f} MiB file)")
    if runs:
        print(f"    write MB/s per round: {runs} (the disk file's own spread)")
    for row in r["checkpointer"]:
        print(f"  Checkpointer.save (sync), checkpoint.thread_count={row['thread_count']}: {row['save_s']:6.2f} s = "
              f"{row['save_MB_per_s']:.0f} MB/s = {row['save_of_disk'] * 100:.0f}% of disk write")
    print(f"    parts at thread_count={r['thread_count']} (the faster):")
    during_seal = {"nonfinite_check"}  # a sync save runs it on a thread while it seals: part of seal's time
    total = sum(v for k, v in r["save_phases_s"].items() if k not in during_seal)
    print("      " + ", ".join(f"{k} {v:.2f} s (during seal)" if k in during_seal else f"{k} {v:.2f} s ({v / total * 100:.0f}%)"
                               for k, v in r["save_phases_s"].items()))
    sealed = r["save_phases_s"].get("seal", 0.0)
    print(f"    seal (each file's fsync and sha256 at once, integrity.json) at {r['bytes'] / max(sealed, 1e-9) / 1e6:.0f} "
          f"MB/s; dcp_write is DCP's write into the page cache")
    print(f"  async save               stall {r['async_stall_s']:.2f} s (staging to CPU memory), committed after "
          f"{r['async_total_s']:.2f} s")
    print(f"  load (cold, verify incl.) {r['load_s']:7.2f} s = {r['load_MB_per_s']:.0f} MB/s (verify alone "
          f"{r['verify_s']:.2f} s); bit-exact: {r['load_exact']}")
    print("  raw dcp.save / dcp.load per FileSystemWriter option (interleaved rounds; load cold):")
    print(f"    {'option':<28s}{'files':>6s}{'save s':>9s}{'MB/s':>8s}{'of disk':>9s}{'load s':>9s}{'MB/s':>8s}{'of disk':>9s}")
    for row in r["dcp_options"]:
        print(f"    {row['option']:<28s}{row['files']:>6d}{row['save_s']:>9.2f}{row['save_MB_per_s']:>8.0f}"
              f"{row['save_of_disk'] * 100:>8.0f}%{row['load_s']:>9.2f}{row['load_MB_per_s']:>8.0f}"
              f"{row['load_of_disk'] * 100:>8.0f}%")
    print("    (sync_files=False skips the fsync: not durable; overwrite=False only refuses an existing checkpoint;")
    print("     record_crc32=False: torch.save's per-record CRC32 off, as Checkpointer's sync save does)")
    durable = [row for row in r["dcp_options"] if DCP_OPTIONS.get(row["option"], {}).get("sync_files", True)]
    if durable:
        best = max(durable, key=lambda row: row["save_of_disk"])
        print(f"  best durable raw dcp.save option: {best['option']} at {best['save_of_disk'] * 100:.0f}% of disk write")
    verdict = "PASS" if r["save_of_disk"] >= TARGET_FRACTION else "MISS"
    rounds = r.get("save_of_disk_per_round", [])
    per_round = (f"; per round, against that round's disk file: {', '.join(f'{x * 100:.0f}%' for x in rounds)} "
                 f"({sum(x >= TARGET_FRACTION for x in rounds)} of {len(rounds)} >= {TARGET_FRACTION:.0%})") if rounds else ""
    print(f"  target: Checkpointer.save (sync, durable; best thread_count={r['thread_count']}) >= "
          f"{TARGET_FRACTION:.0%} of disk write: {r['save_of_disk'] * 100:.0f}% -> {verdict}{per_round}")
