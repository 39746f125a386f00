"""``python -m curry_train bench checkpoint``: checkpoint size and save/load time, and the save interval they imply.

Size. A checkpoint holds the fp32 weights (4 B/param) and AdamW's ``exp_avg`` and ``exp_avg_sq`` (4 + 4 B/param),
so ``bytes ~= 12 * params`` plus a fixed cost per checkpoint entry (every tensor, and every per-parameter
hyperparameter of the flattened optimizer state, plus DCP ``.metadata``), which matters only for tiny models.
The tied head is stored under both names. The bench sums the file sizes actually written by
``Checkpointer.save`` and reports ``(bytes - 12 * params) / entries``.

Time. ``save`` is timed end to end (state dict, DCP write, fsync with the integrity record, rename, ``latest``), median of
``bench.repeats`` saves; ``async_save=True`` is timed twice: until ``save()`` returns (the training stall: staging
copies the state to CPU memory) and until the background write is committed. ``load`` is timed into a fresh model,
its integrity check (``checkpoint_files.verify``: sha256 of every file) on its own too.

Interval (Young 1974, Daly 2006, first order). With blocking save cost ``C``, mean time between failures ``M``
and restart cost ``R``, checkpointing every ``T`` seconds wastes the fraction ``C/T + (T/2 + R)/M`` of the run
(the save itself, plus on average half an interval of lost work and a restart per failure). It is smallest at
``T* = sqrt(2 C M)``, where the waste is ``sqrt(2 C / M) + R / M``. The bench prints ``T*`` and its waste for an
MTBF of 1 h and 24 h with the measured ``C`` and ``R = 60 s``.

Large state (``measure_large``). The tiny GPT's save is dominated by fixed costs, so a synthetic state of
``bench.checkpoint_params`` parameters (null: the bench's ``large_params``, 100M; 5M with ``--quick``, which also
runs 3 side-by-side rounds instead of 5, one async save, load and raw save per option, and 4 of the 8
``FileSystemWriter`` options, then prints one "reduced run" line saying so) is saved too: fp32 weights shaped
like a GPT-2 style transformer (``SyntheticTransformer``, never run) plus the AdamW ``exp_avg``/``exp_avg_sq``
after one step with random gradients, 12 B/param. Compared with the disk's own bandwidth
on the same file system (``disk_bandwidth``: a file as large as the checkpoint, written + fsynced, then read
back after its pages were dropped from the page cache with ``posix_fadvise(DONTNEED)``): ``Checkpointer.save``
end to end (and per phase: state dict, NaN/Inf check, small files, DCP write, seal: each file's fsync with its sha256
record, rename), the async stall vs the time until committed, ``load`` (cold, integrity check included), and raw
``dcp.save``/``load`` with each ``FileSystemWriter`` option side by side (interleaved rounds). Target:
``Checkpointer.save`` (sync, durable), at the faster ``checkpoint.thread_count`` of 1 and 2, reaches >= 50% of the
disk's write bandwidth (PASS/MISS); the best durable raw ``dcp.save`` option is printed beside it. Before
the large run, free memory and disk are checked (``check_resources``): too little is one ``ValueError`` line.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from ..loop import build_optimizer, build_scheduler
from ..primitives.checkpoint import Checkpointer, step_dirname
from ..primitives.checkpoint_files import verify
from ..primitives.model_io import forward_loss_sum
from ..user_model import VOCAB, build_model, model_name, n_params as count_params
from .checkpoint_large import DCP_OPTIONS, LARGE_PARAMS, LARGE_ROUNDS, check_resources, measure_large, print_large
from .common import user_loss

ADAMW_FP32_BYTES_PER_PARAM = 12  # weights + exp_avg + exp_avg_sq, fp32


def young_daly_interval(save_seconds: float, mtbf_seconds: float) -> float:
    """Optimal seconds between checkpoints, ``sqrt(2 * C * M)`` (first order, C << M)."""
    if save_seconds <= 0 or mtbf_seconds <= 0:
        raise ValueError(f"save_seconds and mtbf_seconds must be > 0, got {save_seconds!r}, {mtbf_seconds!r}")
    return math.sqrt(2.0 * save_seconds * mtbf_seconds)


def expected_waste(interval_seconds: float, save_seconds: float, mtbf_seconds: float, restart_seconds: float = 0.0) -> float:
    """Fraction of wall time lost to saving and to failures: ``C/T + (T/2 + R)/M``."""
    return save_seconds / interval_seconds + (interval_seconds / 2.0 + restart_seconds) / mtbf_seconds


def checkpoint_bytes(n_params: int, bytes_per_param: float = ADAMW_FP32_BYTES_PER_PARAM) -> float:
    return n_params * bytes_per_param


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _trained(cfg, seed: int):
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = build_optimizer(model, 1e-3)
    sched = build_scheduler(opt, 1, 10)
    x = torch.randint(0, VOCAB, (2, min(16, cfg.train.seq_len)))
    loss_sum, n = (user_loss(cfg) or forward_loss_sum)(model, (x, x))
    (loss_sum / n).backward()
    opt.step()  # creates the AdamW state that the checkpoint carries
    sched.step()
    return model, opt, sched


def measure(cfg, repeats: int = 5, directory=None) -> dict:
    """Save/load the configured model (``user_model``) + AdamW ``repeats`` times in one process; sizes in bytes, times
    in seconds."""
    model, opt, sched = _trained(cfg, 0)
    params = count_params(model)
    with tempfile.TemporaryDirectory(prefix="curry_train_ckpt_bench_", dir=directory) as tmp:
        ckpt = Checkpointer(Path(tmp) / "sync", keep_last=1)
        saves = []
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            path = ckpt.save(step, model, opt, sched)
            saves.append(time.perf_counter() - t0)
        total = dir_bytes(path)
        data = sum(p.stat().st_size for p in path.glob("*.distcp"))
        entries = len(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        async_ckpt = Checkpointer(Path(tmp) / "async", keep_last=1, async_save=True)
        blocking, committed = [], []
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            async_ckpt.save(step, model, opt, sched)
            blocking.append(time.perf_counter() - t0)
            async_ckpt.wait()
            committed.append(time.perf_counter() - t0)
        assert (Path(tmp) / "async" / step_dirname(repeats) / ".metadata").is_file()
        verifies = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert verify(path) is None
            verifies.append(time.perf_counter() - t0)
        loads = []
        for _ in range(repeats):
            fresh, fresh_opt, fresh_sched = _trained(cfg, 1)
            t0 = time.perf_counter()
            ckpt.load(fresh, fresh_opt, fresh_sched)
            loads.append(time.perf_counter() - t0)
    save_s = statistics.median(saves)
    return {
        "model": model_name(cfg), "params": params, "bytes": total, "data_bytes": data,
        "bytes_per_param": total / params, "entries": entries,
        "overhead_bytes_per_entry": (total - ADAMW_FP32_BYTES_PER_PARAM * params) / entries, "save_s": save_s, "save_s_all": saves,
        "async_blocking_s": statistics.median(blocking), "async_total_s": statistics.median(committed),
        "load_s": statistics.median(loads), "verify_s": statistics.median(verifies), "write_MB_per_s": total / save_s / 1e6, "repeats": repeats,
    }


def _young_daly_rows(save_s: float, mtbf_hours, restart_seconds: float) -> list[dict]:
    rows = []
    for hours in mtbf_hours:
        m = hours * 3600.0
        t = young_daly_interval(save_s, m)
        rows.append({"mtbf_h": hours, "interval_s": t, "waste": expected_waste(t, save_s, m, restart_seconds)})
    return rows


def _print_young_daly(rows: list[dict], save_s: float, restart_seconds: float) -> None:
    print(f"  Young/Daly interval sqrt(2 * save * MTBF) with save = {save_s:.3f} s, waste C/T + (T/2 + R)/M with "
          f"R = {restart_seconds:.0f} s:")
    for row in rows:
        print(f"    MTBF {row['mtbf_h']:5.1f} h -> save every {row['interval_s']:8.1f} s, waste {row['waste'] * 100:.3f} %")


def reduced_note(params: int, rounds: int, names: tuple, params_configured: bool = False,
                 repeats: int | None = None) -> str:
    """One line naming what this run measured below the full run's settings (``LARGE_PARAMS`` parameters unless
    ``bench.checkpoint_params`` names a size, ``LARGE_ROUNDS`` rounds, every ``DCP_OPTIONS`` entry; ``repeats``: set
    only when given explicitly, instead of from ``bench.repeats``), or ""."""
    parts = []
    if params < LARGE_PARAMS and not params_configured:
        parts.append(f"a {params / 1e6:g}M-parameter state (the full run: {LARGE_PARAMS / 1e6:g}M)")
    if rounds < LARGE_ROUNDS:
        parts.append(f"{rounds} side-by-side rounds (the full run: {LARGE_ROUNDS})")
    if repeats is not None:
        parts.append(f"{repeats} async save(s), load(s) and raw save(s) per option (the full run: "
                     f"min(3, bench.repeats // 3), at least 2)")
    left_out = [n for n in DCP_OPTIONS if n not in names]
    if left_out:
        parts.append(f"{len(names)} of the {len(DCP_OPTIONS)} FileSystemWriter options (not measured: "
                     f"{', '.join(left_out)})")
    if not parts:
        return ""
    return (f"  reduced run: {'; '.join(parts)}; fewer bytes weigh the fixed costs (files, fsyncs) more, so the "
            f"target's verdict is the full run's: python -m curry_train bench checkpoint (without --quick)")


def bench_checkpoint(cfg, mtbf_hours=(1.0, 24.0), restart_seconds: float = 60.0,
                     large_params: int = LARGE_PARAMS, large_rounds: int = LARGE_ROUNDS,
                     large_repeats: int | None = None, dcp_options: tuple | None = None) -> dict:
    """The configured model's checkpoint, then the large synthetic state of ``bench.checkpoint_params`` (null:
    ``large_params``) parameters (``checkpoint_large``); memory and disk are checked before anything runs.
    ``large_rounds``: side-by-side rounds of the disk file and ``Checkpointer.save``; ``large_repeats`` (None: from
    ``bench.repeats``) of the async saves, loads and raw DCP options; ``dcp_options``: the ``DCP_OPTIONS`` names
    measured (None: all). Any of them below the full run's prints one line saying what this run left out."""
    configured = cfg.bench.checkpoint_params
    params = int(configured if configured is not None else large_params)
    repeats = large_repeats if large_repeats is not None else min(3, max(2, int(cfg.bench.repeats) // 3))
    names = tuple(DCP_OPTIONS) if dcp_options is None else tuple(dcp_options)
    unknown = [n for n in names if n not in DCP_OPTIONS]
    if unknown:
        raise ValueError(f"bench checkpoint: unknown dcp_options {unknown}; choose from {', '.join(DCP_OPTIONS)}")
    with tempfile.TemporaryDirectory(prefix="curry_train_ckpt_bench_") as tmp:
        check_resources(params, tmp)
        r = measure(cfg, repeats=max(3, int(cfg.bench.repeats) // 2), directory=tmp)
        print(f"checkpoint of {r['model']} + AdamW (fp32), one process, median of {r['repeats']} saves")
        print(f"  params              {r['params']:>12,}")
        print(f"  size on disk        {r['bytes']:>12,} B  = {r['bytes_per_param']:.2f} B/param "
              f"(weights + 2 AdamW moments = {ADAMW_FP32_BYTES_PER_PARAM} B/param; the rest: {r['entries']} entries, "
              f"{r['overhead_bytes_per_entry']:.0f} B each)")
        print(f"  save (sync)         {r['save_s'] * 1e3:>12.1f} ms  ({r['write_MB_per_s']:.0f} MB/s end to end)")
        print(f"  save (async) stall  {r['async_blocking_s'] * 1e3:>12.1f} ms, committed after {r['async_total_s'] * 1e3:.1f} ms")
        print(f"  load                {r['load_s'] * 1e3:>12.1f} ms  (of which verify, sha256 of every file: "
              f"{r['verify_s'] * 1e3:.1f} ms = {r['bytes'] / r['verify_s'] / 1e6:.0f} MB/s)")
        rows = _young_daly_rows(r["save_s"], mtbf_hours, restart_seconds)
        _print_young_daly(rows, r["save_s"], restart_seconds)
        sizes = {n: checkpoint_bytes(n) for n in (124_000_000, 1_300_000_000, 7_000_000_000)}
        print(f"  size at {ADAMW_FP32_BYTES_PER_PARAM} B/param:  "
              + ", ".join(f"{n / 1e9:g}B params -> {b / 1e9:.1f} GB" for n, b in sizes.items()))
        large = measure_large(params, tmp, repeats=repeats, rounds=large_rounds,
                              options={n: DCP_OPTIONS[n] for n in names})
    print_large(large)
    reduced = reduced_note(params, large_rounds, names, configured is not None, large_repeats)
    if reduced:
        print(reduced)
    large["reduced"] = reduced or None
    large["young_daly"] = _young_daly_rows(large["save_s"], mtbf_hours, restart_seconds)
    _print_young_daly(large["young_daly"], large["save_s"], restart_seconds)
    return {**r, "young_daly": rows, "restart_s": restart_seconds, "sizes_fp32_adamw": sizes, "large": large}
