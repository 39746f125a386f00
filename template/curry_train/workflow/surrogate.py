"""Surrogate tasks (stage 3): tiny synthetic sequence tasks over byte tokens that a model solves only when a mechanism
works, as a data option for the training loop.

Every sequence is readable bytes. Symbols are the letters ``a, b, c, ...`` (``n_symbols`` of them, at most 26);
associative recall takes its values from ``A, B, C, ...``. ``|`` separates, ``?`` asks.

* ``copy``: ``s_1 .. s_n | s_1 .. s_n``: reproduce the first half (needs attention back ``n + 1`` tokens).
* ``sort``: ``s_1 .. s_n | sorted(s)``: the first half in ascending order (needs attention over the whole prefix).
* ``recall`` (associative recall): ``k_1 v_1 .. k_n v_n ? k_j v_j``: distinct keys, each with a value; answer the
  value of the queried key (needs content-based lookup, the induction-head pattern).

A batch is ``(x, y)`` with ``x = seq[:-1]`` and ``y = seq[1:]`` where every position that is not an answer holds
``-100`` (``model.IGNORE_INDEX``), so the loop's token loss (cross-entropy over targets != -100) scores only the
answer: ``n`` positions for copy and sort, one for recall. Batches are deterministic per ``(seed, step)``.

``SurrogateBatches(task, batch_size, length)`` has the ``microbatches(step, rank, world_size, n_micro)`` of
``data.Batches`` and plugs into ``loop.run_training_steps``. ``accuracy(model, task, length)`` is the exact-match rate
on held-out batches (seed ``EVAL_SEED``): per sequence (every answer position right) or per answer token.
``chance(task, length, n_symbols)`` is what guessing scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import check_batch_split
from ..primitives._checks import integer
from ..primitives.model_io import IGNORE_INDEX, forward, logits_of
from .common import check_model, model_device

TASKS = ("copy", "sort", "recall")
SYMBOL = ord("a")
VALUE = ord("A")
SEP = ord("|")
QUERY = ord("?")
EVAL_SEED = 1_000_003


def check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def seq_len(task: str, length: int) -> int:
    """Length of ``x`` (and ``y``) for ``task`` with ``length`` symbols or key-value pairs."""
    check_task(task)
    return 2 * length if task in ("copy", "sort") else 2 * length + 2


def _check(task, length, n_symbols):
    check_task(task)
    integer("length", length, 1, None, "(symbols to copy or sort, or key-value pairs to recall)")
    integer("n_symbols", n_symbols, 2, 26, "(letters a..z)")
    if task == "recall" and length > n_symbols:
        raise ValueError(f"recall needs distinct keys: length ({length}) must be at most n_symbols ({n_symbols})")


def make_batch(task: str, batch_size: int, length: int, n_symbols: int = 16, seed: int = 0,
               step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch ``(x, y)`` of ``task``: shape ``(batch_size, seq_len(task, length))``, ``y = -100`` off the answer."""
    _check(task, length, n_symbols)
    integer("batch_size", batch_size, 1)
    integer("seed", seed, 0)
    integer("step", step, 0)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    b, n = batch_size, length
    if task in ("copy", "sort"):
        s = torch.randint(0, n_symbols, (b, n), generator=g)
        answer = s if task == "copy" else s.sort(dim=1).values
        seq = torch.cat([s + SYMBOL, torch.full((b, 1), SEP), answer + SYMBOL], dim=1)
        scored_from = n  # y[:, n:] predicts the answer tokens seq[:, n+1:]
    else:
        keys = torch.rand(b, n_symbols, generator=g).argsort(dim=1)[:, :n]
        values = torch.randint(0, n_symbols, (b, n), generator=g)
        j = torch.randint(0, n, (b, 1), generator=g)
        pairs = torch.stack([keys + SYMBOL, values + VALUE], dim=2).reshape(b, 2 * n)
        seq = torch.cat([pairs, torch.full((b, 1), QUERY), keys.gather(1, j) + SYMBOL,
                         values.gather(1, j) + VALUE], dim=1)
        scored_from = 2 * n + 1
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    y[:, :scored_from] = IGNORE_INDEX
    return x, y


def chance(task: str, length: int, n_symbols: int = 16, per: str = "token") -> float:
    """Accuracy of guessing uniformly among the symbols (``per="sequence"``: every answer token at once)."""
    _check(task, length, n_symbols)
    if per not in ("token", "sequence"):
        raise ValueError(f"per must be 'token' or 'sequence', got {per!r}")
    answers = 1 if task == "recall" else length
    return (1 / n_symbols) ** (answers if per == "sequence" else 1)


@dataclass
class SurrogateBatches:
    """Deterministic batches of a surrogate task with the interface of ``data.Batches``."""

    task: str
    batch_size: int
    length: int
    n_symbols: int = 16
    seed: int = 0

    def __post_init__(self):
        _check(self.task, self.length, self.n_symbols)
        integer("batch_size", self.batch_size, 1)
        integer("seed", self.seed, 0)

    @property
    def seq_len(self) -> int:
        return seq_len(self.task, self.length)

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(self.task, self.batch_size, self.length, self.n_symbols, self.seed, step)

    def microbatches(self, step: int, rank: int = 0, world_size: int = 1, n_micro: int = 1):
        """This rank's share of step ``step``'s global batch as a list of ``n_micro`` (x, y) pairs."""
        per_rank = check_batch_split(self.batch_size, world_size, n_micro)
        x, y = self.global_batch(step)
        x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
        return list(zip(x.chunk(n_micro), y.chunk(n_micro)))


@torch.no_grad()
def accuracy(model, task: str, length: int, n_symbols: int = 16, *, batch_size: int = 256, batches: int = 1,
             seed: int = EVAL_SEED, per: str = "sequence") -> float:
    """Exact-match rate of ``model``'s greedy (argmax) predictions on the scored positions of held-out batches.

    ``per="sequence"``: the fraction of sequences whose every answer token is right; ``per="token"``: the fraction of
    answer tokens that are right. Teacher-forced (one forward per batch). The model's train/eval mode is restored."""
    check_model(model)
    chance(task, length, n_symbols, per)  # validates task, length, n_symbols, per
    integer("batches", batches, 1)
    device, was_training = model_device(model), model.training
    model.eval()
    right = total = 0
    try:
        for step in range(batches):
            x, y = make_batch(task, batch_size, length, n_symbols, seed, step)
            x, y = x.to(device), y.to(device)
            pred = logits_of(forward(model, (x, y))).argmax(dim=-1)
            scored = y != IGNORE_INDEX
            hit = (pred == y) | ~scored
            if per == "sequence":
                right += int(hit.all(dim=1).sum())
                total += x.size(0)
            else:
                right += int((hit & scored).sum())
                total += int(scored.sum())
    finally:
        model.train(was_training)
    return right / total
