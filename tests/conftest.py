"""Fixtures shared by several test files: the bad-input guard, and a pool for fresh interpreters."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch


@pytest.fixture
def no_launch(monkeypatch):
    """Fail loudly if bad input gets as far as a process group or a bench (and CUDA is absent, as on CI)."""
    import curry_train.bench
    import curry_train.distributed

    def reached(*args, **kwargs):
        raise AssertionError("bad input reached init / a bench")

    monkeypatch.setattr(curry_train.distributed, "init_from_env", reached)
    monkeypatch.setattr(curry_train.bench, "run_benches", reached)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def interpreter_pool():
    """Threads that each wait on one fresh interpreter (a subprocess), at most two at a time and one per core: such a
    process spends most of its time importing torch on one core, so two at once halve the wait on 2 cores."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
