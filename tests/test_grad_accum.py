"""GradientAccumulation: flags, config, token normalisation, and DDP (one all-reduce per optimizer step)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from curry_train.bench.common import grad_vector
from curry_train.data import Batches
from curry_train.distributed import launch
from curry_train.loop import accumulate_gradients
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives import GradientAccumulation

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_flags_for_k(k):
    ga = GradientAccumulation(steps=k, normalization="microbatches")
    assert ga.steps == k and ga.enabled == (k > 1)
    kws = [ga.train_step_kwargs(i) for i in range(k)]
    assert [kw["zero_grad"] for kw in kws] == [i == 0 for i in range(k)]
    for flag in ("sync_gradients", "step_optimizer", "collect_metrics"):
        assert [kw[flag] for kw in kws] == [i == k - 1 for i in range(k)]
    assert all(kw["loss_divisor"] == k for kw in kws)
    assert [ga.is_first(i) for i in range(k)] == [i == 0 for i in range(k)]
    assert [ga.is_last(i) for i in range(k)] == [i == k - 1 for i in range(k)]
    with pytest.raises(IndexError):
        ga.is_last(k)


def test_token_divisor_is_the_planned_global_count():
    ga = GradientAccumulation(steps=3)
    with pytest.raises(RuntimeError, match="plan"):
        ga.train_step_kwargs(0)
    assert ga.plan([5, torch.tensor(7), 0]) == 12
    assert all(ga.train_step_kwargs(i)["loss_divisor"] == 12 for i in range(3))
    with pytest.raises(ValueError, match="expected 3"):
        ga.plan([1, 2])


def test_sum_divisor_is_what_backward_loss_divides_by():
    """One divisor for the plain and the pipeline step: T / N (tokens) or n_valid * K (microbatches: mean / K)."""
    ga = GradientAccumulation(steps=2)
    ga.plan([30, 10])
    assert [ga.sum_divisor(i, n) for i, n in ((0, 30), (1, 10))] == [40.0, 40.0]
    mean_over_k = GradientAccumulation(steps=2, normalization="microbatches")
    assert [mean_over_k.sum_divisor(i, n) for i, n in ((0, 30), (1, 0))] == [60.0, 2.0]
    loss_sum = torch.tensor(12.0)
    assert mean_over_k.backward_loss(loss_sum, 30, 0).item() == pytest.approx(12.0 / 30 / 2)
    assert ga.backward_loss(loss_sum, 10, 1).item() == pytest.approx(12.0 / 40)
    with pytest.raises(IndexError):
        ga.sum_divisor(2, 5)


def test_from_config_reads_the_key_and_normalization():
    ga = GradientAccumulation.from_config({"gradient_accumulation_steps": 4, "grad_accum_normalization": "microbatches"})
    assert (ga.steps, ga.normalization) == (4, "microbatches")
    assert GradientAccumulation.from_config({}).steps == 1
    assert GradientAccumulation.from_config({"ga": 2}, key="ga").steps == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_bad_steps_name_the_key(bad):
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps must be a positive integer.*got"):
        GradientAccumulation.from_config({"gradient_accumulation_steps": bad})


def test_bad_normalization_lists_choices():
    with pytest.raises(ValueError, match=r"grad_accum_normalization must be one of tokens, microbatches, got 'mean'"):
        GradientAccumulation.from_config({"gradient_accumulation_steps": 2, "grad_accum_normalization": "mean"})


def _padded_batch(rows=8, seq=32, seed=0):
    tokens = torch.randint(0, 256, (10_000,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.uint8)
    return Batches(tokens, rows, seq, seed=seed, variable_length=True, min_len=2).global_batch(0)


def _full_batch_grad(model, x, y):
    model.zero_grad(set_to_none=True)
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n).backward()
    return grad_vector(model)


@pytest.mark.slow
def test_token_normalisation_is_invariant_to_an_uneven_split():
    """A padded global batch split 3+1 rows (and 1+1+6) gives the full-batch mean-token-loss gradient."""
    torch.manual_seed(0)
    model = GPT(TINY)
    x, y = _padded_batch()
    y[6:, 4:] = -100  # make the short micro-batch much emptier than the rest
    ref = _full_batch_grad(model, x, y)
    for sizes in ([6, 2], [1, 1, 6]):
        micro = list(zip(x.split(sizes), y.split(sizes)))
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, micro, GradientAccumulation(len(sizes)))
        assert (grad_vector(model) - ref).abs().max().item() < 1e-6
    # The classic mean/K normalisation gets this wrong: that is the bug tokens mode exists for.
    micro = list(zip(x.split([6, 2]), y.split([6, 2])))
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, micro, GradientAccumulation(2, normalization="microbatches"))
    assert (grad_vector(model) - ref).abs().max().item() > 1e-4


def _ddp_worker(rank, world_size, k):
    """DDP with K micro-batches: count all-reduces per optimizer step and return the synced gradient."""
    torch.manual_seed(0)
    model = GPT(TINY)
    ddp = DDP(model)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world_size)

    ddp.register_comm_hook(None, counting_allreduce)
    x, y = _padded_batch()
    rows = x.shape[0] // world_size
    x, y = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
    micro = list(zip(x.chunk(k), y.chunk(k)))
    ga = GradientAccumulation(k)
    ga.plan([(yy != -100).sum() for _, yy in micro])
    per_microbatch = []
    for i, (xx, yy) in enumerate(micro):
        before = len(calls)
        with ga.sync_context(ddp, i):
            loss_sum, n = token_loss(ddp(xx), yy)
            ga.backward_loss(loss_sum, n, i).backward()
        per_microbatch.append(len(calls) - before)
    return {"allreduces": per_microbatch, "grad": grad_vector(model)}


@pytest.mark.slow
def test_ddp_world_size_2_k4_syncs_once_and_matches_single_process():
    results = launch(_ddp_worker, 2, 4, timeout=300)
    torch.manual_seed(0)
    model = GPT(TINY)
    x, y = _padded_batch()
    ref = _full_batch_grad(model, x, y)
    for r in results:
        assert r["allreduces"] == [0, 0, 0, 1], "exactly one gradient all-reduce, on the last micro-batch"
        assert (r["grad"] - ref).abs().max().item() < 1e-6
