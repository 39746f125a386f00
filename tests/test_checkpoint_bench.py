"""``bench checkpoint``'s large-state part (``bench/checkpoint_large.py``): the disk bandwidth helper leaves nothing behind,
a synthetic transformer + AdamW state round-trips bit-exactly through every exposed DCP option and through
``Checkpointer`` (sync and async), bad sizes and short memory/disk are refused with one line. No timings are checked."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from curry_train.__main__ import main
from curry_train.bench import checkpoint_large as large
from curry_train.primitives.checkpoint import Checkpointer, training_state

SMALL = 200_000  # ~2.4 MB with AdamW: the same code path as 100M, in a fraction of a second


def test_disk_bandwidth_writes_reads_and_removes_its_file(tmp_path):
    r = large.disk_bandwidth(tmp_path, 3 << 20, repeats=2)
    assert list(tmp_path.iterdir()) == []
    assert r["bytes"] == 3 << 20 and r["write_MB_per_s"] > 0 and r["read_MB_per_s"] > 0 and r["repeats"] == 2
    assert r["read_cold"] is hasattr(os, "posix_fadvise")
    with pytest.raises(ValueError, match="nbytes and repeats must be > 0"):
        large.disk_bandwidth(tmp_path, 0)


def test_disk_bandwidth_removes_its_file_when_the_write_fails(tmp_path, monkeypatch):
    seen = []

    def failing_fsync(fd):
        seen.append([p.name for p in tmp_path.iterdir()])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(large.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        large.disk_bandwidth(tmp_path, 1 << 20)
    assert seen and seen[0][0].startswith(".disk-bandwidth-")  # it was written, then removed
    assert list(tmp_path.iterdir()) == []


def test_synthetic_state_is_shaped_like_a_transformer_with_adamw_moments():
    d, n_layer, vocab = large.synthetic_shape(100_000_000)
    assert (d, n_layer) == (768, 11) and vocab * d <= 25_000_000
    model, opt = large.synthetic_training_state(SMALL)
    params = large.n_params(model)
    assert SMALL <= params < 1.3 * SMALL
    moments = [opt.state[p][k] for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(list(model.parameters())) and all(m.abs().sum() > 0 for m in moments)
    assert all(p.grad is None for p in model.parameters())
    again, _ = large.synthetic_training_state(SMALL)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # seeded
    for bad in (5, 1.5e6, True, "100M"):
        with pytest.raises(ValueError, match=r"^bench.checkpoint_params must be an integer >= 10000, got"):
            large.synthetic_shape(bad)


@pytest.mark.slow
def test_every_dcp_option_and_the_checkpointer_round_trip_bit_exactly(tmp_path):
    model, opt = large.synthetic_training_state(SMALL, seed=0)
    want = training_state(model, opt)
    for name, options in large.DCP_OPTIONS.items():
        path = tmp_path / name
        large.save_with(want, path, options)
        assert torch.serialization.get_crc32_options() is True  # switched for that save only
        fresh, fresh_opt = large.synthetic_training_state(SMALL, seed=1)
        got = training_state(fresh, fresh_opt)
        assert not large._equal_state(got, want)
        dcp.load(got, storage_reader=FileSystemReader(str(path)), no_dist=True)
        assert large._equal_state(got, want), name
    for async_save in (False, True):
        ckpt = Checkpointer(tmp_path / f"ckpt-{async_save}", keep_last=1, async_save=async_save)
        ckpt.save(1, model, opt)
        ckpt.wait()
        assert torch.serialization.get_crc32_options() is True  # the sync save's switch is restored
        assert set(ckpt.last_save_seconds) == {"state", "nonfinite_check", "files", "dcp_write", "seal", "rename"}
        assert all(v >= 0 for v in ckpt.last_save_seconds.values())
        fresh, fresh_opt = large.synthetic_training_state(SMALL, seed=1)
        ckpt.load(fresh, fresh_opt)
        assert large._equal_state(training_state(fresh, fresh_opt), want)


@pytest.mark.slow
def test_measure_large_reports_every_option_and_cleans_up(tmp_path):
    r = large.measure_large(SMALL, tmp_path, repeats=1, rounds=2)
    assert r["load_exact"] is True and r["params"] >= SMALL
    assert r["bytes"] > large.BYTES_PER_PARAM * r["params"]
    assert [row["option"] for row in r["dcp_options"]] == list(large.DCP_OPTIONS)
    assert all(row["bytes"] > large.BYTES_PER_PARAM * r["params"] for row in r["dcp_options"])
    assert next(row for row in r["dcp_options"] if row["option"] == "single_file_per_rank=False")["files"] > 20
    assert set(r["save_phases_s"]) == {"state", "nonfinite_check", "files", "dcp_write", "seal", "rename"}
    assert [row["thread_count"] for row in r["checkpointer"]] == [1, 2]
    assert r["save_s"] == min(row["save_s"] for row in r["checkpointer"])
    assert 0 < r["async_stall_s"] <= r["async_total_s"]
    assert r["save_of_disk"] == pytest.approx(r["save_MB_per_s"] / r["disk"]["write_MB_per_s"])
    per_round = [r["bytes"] / s / 1e6 / w for s, w in zip(next(row for row in r["checkpointer"] if row["thread_count"]
                 == r["thread_count"])["save_s_all"], r["disk"]["write_MB_per_s_all"])]
    assert r["save_of_disk_per_round"] == pytest.approx(per_round) and len(per_round) == 2
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # checkpoints and the bandwidth file removed


def test_short_memory_or_disk_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(large, "_available_memory", lambda: 2 * 10**9)
    with pytest.raises(ValueError) as e:
        large.check_resources(100_000_000, tmp_path)
    assert str(e.value) == ("bench.checkpoint_params=100000000 needs 4.8 GB of memory (4 copies of 12 B/param), "
                            "2.0 GB available; lower bench.checkpoint_params")
    monkeypatch.setattr(large, "_available_memory", lambda: 100 * 10**9)
    monkeypatch.setattr(large.shutil, "disk_usage", lambda path: _Usage(10**9))
    with pytest.raises(ValueError, match=r"^bench.checkpoint_params=100000000 needs 7.2 GB of disk under .*, 1.0 GB "
                                         r"free; lower bench.checkpoint_params$"):
        large.check_resources(100_000_000, tmp_path)


class _Usage:
    def __init__(self, free):
        self.free = free


@pytest.mark.parametrize("value,message", [
    ("5", "bench.checkpoint_params must be an integer >= 10000 (or null = 100M, 5M with --quick), got 5"),
    ("abc", "bench.checkpoint_params"),
])
def test_bad_checkpoint_params_is_one_cli_line(value, message, capsys, no_launch):
    assert main(["bench", "checkpoint", f"bench.checkpoint_params={value}"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_the_fused_nonfinite_check_names_the_first_bad_tensor_and_ignores_overflowed_norms():
    from curry_train.primitives.checkpoint_files import first_nonfinite

    nan, inf = float("nan"), float("inf")
    assert first_nonfinite({"a": torch.ones(3), "b": {"c": torch.tensor([1.0, nan]), "d": torch.tensor([inf])}}) == "b.c"
    assert first_nonfinite({"x": 1.5, "y": -inf}, "p.") == "p.y"
    assert first_nonfinite([torch.zeros(2), (torch.ones(1), torch.tensor(nan))]) == "1.1"
    assert first_nonfinite({"h": torch.tensor([1.0, -inf], dtype=torch.bfloat16), "z": torch.empty(0)}) == "h"
    # finite values whose norm overflows (fp32 near its max, fp16 sums of squares): exact check, not refused
    assert first_nonfinite({"big": torch.full((4,), 3e38), "f16": torch.full((100,), 6e4, dtype=torch.float16),
                            "ints": torch.tensor([1, 2]), "step": 3}) is None
    model, opt = large.synthetic_training_state(SMALL)
    state = training_state(model, opt)
    assert first_nonfinite(state) is None
    with torch.no_grad():
        model.blocks[1].fc.view(-1)[7] = nan
    assert first_nonfinite(training_state(model, opt)) == "model.blocks.1.fc"


@pytest.mark.slow
def test_checkpoint_thread_count_is_applied_and_checked(tmp_path, capsys, no_launch):
    model, opt = large.synthetic_training_state(SMALL, seed=0)
    want = training_state(model, opt)
    files = {}
    for threads in (1, 2, 3):
        ckpt = Checkpointer.from_config({"dir": str(tmp_path / f"t{threads}"), "thread_count": threads})
        assert ckpt.thread_count == threads
        files[threads] = len(list(ckpt.save(1, model, opt).glob("*.distcp")))  # one file per writer thread
        fresh, fresh_opt = large.synthetic_training_state(SMALL, seed=1)
        ckpt.load(fresh, fresh_opt)
        assert large._equal_state(training_state(fresh, fresh_opt), want)
    assert files == {1: 1, 2: 2, 3: 3}
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"^checkpoint.thread_count must be an integer >= 1 \(DCP writer"):
            Checkpointer(tmp_path, thread_count=bad)
    assert main(["train", "checkpoint.thread_count=0"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "checkpoint.thread_count must be a positive integer" in err, err
