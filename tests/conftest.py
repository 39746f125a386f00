"""Fixtures shared by the bad-input tests."""

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
