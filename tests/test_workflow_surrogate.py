"""Surrogate tasks (``curry_train.workflow.surrogate``): right targets, only answers scored, deterministic batches,
plugs into ``run_training_steps``, a tiny GPT learns the copy task, and bad arguments fail in one line."""

import pytest
import torch

from curry_train.data import Batches
from curry_train.loop import build_optimizer, build_scheduler, run_training_steps
from curry_train.model import GPT, GPTConfig
from curry_train.primitives import GradientAccumulation
from curry_train.workflow.surrogate import (
    EVAL_SEED, QUERY, SEP, SYMBOL, VALUE, SurrogateBatches, accuracy, chance, make_batch, seq_len,
)

IGNORE = -100


def _full(x, y):
    """The whole sequence: x plus the last target."""
    return torch.cat([x, y[:, -1:]], dim=1)


def test_copy_targets_and_scoring():
    x, y = make_batch("copy", 8, 5, n_symbols=10, seed=3, step=7)
    assert x.shape == y.shape == (8, seq_len("copy", 5)) == (8, 10)
    seq = _full(x, y)
    assert (seq[:, 5] == SEP).all()
    assert torch.equal(seq[:, :5], seq[:, 6:])
    assert ((seq[:, :5] >= SYMBOL) & (seq[:, :5] < SYMBOL + 10)).all()
    assert (y[:, :5] == IGNORE).all() and torch.equal(y[:, 5:], seq[:, 6:])
    assert torch.equal(x[:, 1:], y[:, :-1].where(y[:, :-1] != IGNORE, x[:, 1:]))  # y is x shifted by one


def test_sort_targets():
    x, y = make_batch("sort", 16, 6, seed=1, step=0)
    seq = _full(x, y)
    assert torch.equal(seq[:, 7:], seq[:, :6].sort(dim=1).values)
    assert (y[:, :6] == IGNORE).all() and (y[:, 6:] != IGNORE).all()


def test_recall_targets_and_scoring():
    n = 5
    x, y = make_batch("recall", 32, n, n_symbols=8, seed=2, step=4)
    assert x.shape == (32, 2 * n + 2)
    seq = _full(x, y)
    for row in seq.tolist():
        keys, values = row[0:2 * n:2], row[1:2 * n:2]
        assert len(set(keys)) == n and all(SYMBOL <= k < SYMBOL + 8 for k in keys)
        assert all(VALUE <= v < VALUE + 8 for v in values)
        assert row[2 * n] == QUERY and row[2 * n + 2] == values[keys.index(row[2 * n + 1])]
    assert (y[:, :-1] == IGNORE).all() and (y[:, -1] != IGNORE).all()


def test_deterministic_per_seed_and_step():
    a = make_batch("recall", 4, 3, seed=5, step=9)
    assert all(torch.equal(u, v) for u, v in zip(a, make_batch("recall", 4, 3, seed=5, step=9)))
    assert not torch.equal(a[0], make_batch("recall", 4, 3, seed=5, step=10)[0])
    assert not torch.equal(a[0], make_batch("recall", 4, 3, seed=6, step=9)[0])


def test_batches_interface_matches_data_batches():
    sb = SurrogateBatches("copy", 8, 4, seed=1)
    assert sb.seq_len == 8
    whole = sb.global_batch(3)
    parts = sb.microbatches(3, rank=1, world_size=2, n_micro=2)
    assert len(parts) == 2 and all(p[0].shape == (2, 8) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0][4:])
    text = Batches(torch.arange(1000) % 256, 8, 8)
    assert [m[0].shape for m in text.microbatches(0, 1, 2, 2)] == [m[0].shape for m in parts]
    with pytest.raises(ValueError):
        sb.microbatches(0, 0, 3, 1)


def test_loop_loss_counts_only_answer_tokens():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=12))
    opt = build_optimizer(model, 1e-3)
    hist = run_training_steps(model, opt, build_scheduler(opt, 1, 2), SurrogateBatches("recall", 8, 5),
                              GradientAccumulation(2), 2, progress=False, log_every=0)
    assert [h["tokens"] for h in hist] == [8, 8]  # one scored answer per recall sequence
    hist = run_training_steps(model, opt, build_scheduler(opt, 1, 1), SurrogateBatches("copy", 4, 3),
                              GradientAccumulation(1), 1, progress=False, log_every=0)
    assert hist[0]["tokens"] == 4 * 3


def test_chance():
    assert chance("copy", 8, 16) == 1 / 16
    assert chance("copy", 3, 4, per="sequence") == pytest.approx(1 / 64)
    assert chance("recall", 6, 16, per="sequence") == 1 / 16


class Oracle(torch.nn.Module):
    """Reads the answer off its input: predicts next token = the token at t+1 of the full sequence (cheats)."""

    def __init__(self, task, length, n_symbols):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.task, self.length, self.n_symbols = task, length, n_symbols

    def forward(self, x):
        _, y = make_batch(self.task, x.size(0), self.length, self.n_symbols, EVAL_SEED, 0)
        return torch.nn.functional.one_hot(y.clamp(min=0), 256).float() + self.w


def test_accuracy_exact_match():
    assert accuracy(Oracle("sort", 4, 16), "sort", 4, batch_size=64) == 1.0
    assert accuracy(Oracle("sort", 4, 16), "sort", 4, batch_size=64, per="token") == 1.0
    untrained = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8)).train()
    acc = accuracy(untrained, "copy", 4, batch_size=64, per="token")
    assert 0 <= acc < 0.5 and untrained.training


@pytest.mark.slow
def test_tiny_gpt_learns_copy_well_above_chance():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    length, steps = 8, 300
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=2 * length))
    before = accuracy(model, "copy", length, per="token")
    opt = build_optimizer(model, 3e-3, weight_decay=0.0)
    run_training_steps(model, opt, build_scheduler(opt, 20, steps), SurrogateBatches("copy", 32, length),
                       GradientAccumulation(1), steps, progress=False, log_every=0)
    after = accuracy(model, "copy", length, per="token")
    assert before < 3 * chance("copy", length)
    assert after > 0.9, (before, after)
    assert accuracy(model, "copy", length) > 0.5  # whole sequences, chance 16**-8


@pytest.mark.parametrize("call,match", [
    (lambda: make_batch("reverse", 4, 4), "task must be one of copy, sort, recall"),
    (lambda: make_batch("copy", 0, 4), "batch_size"),
    (lambda: make_batch("copy", 4, 0), "length"),
    (lambda: make_batch("copy", 4, 4, n_symbols=27), "n_symbols"),
    (lambda: make_batch("recall", 4, 10, n_symbols=8), "distinct keys"),
    (lambda: SurrogateBatches("copy", 4, 4, seed=-1), "seed"),
    (lambda: chance("copy", 4, per="row"), "per must be"),
    (lambda: accuracy("not a model", "copy", 4), "torch.nn.Module"),
])
def test_bad_arguments_are_one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
