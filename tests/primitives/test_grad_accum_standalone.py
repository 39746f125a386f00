"""GradientAccumulation on a decoder it has never seen: K micro-batches give the full-batch gradient (token
normalisation, uneven padding), gradients sync once per optimizer step under DDP and FSDP2, bad arguments fail
with one line naming the argument."""

from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from curry_train.primitives.grad_accum import GradientAccumulation
from standalone_helpers import grads, make_batch, max_diff, spawn, tiny_decoder, token_loss

TOL = 1e-6


def full_batch_grads(x, y):
    """The reference: one backward of the batch's mean token loss."""
    model = tiny_decoder()
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n).backward()
    return grads(model)


def accumulated_grads(micro, normalization="tokens"):
    """The recipe a training loop copies: plan once, then backward_loss per micro-batch."""
    model = tiny_decoder()
    ga = GradientAccumulation(len(micro), normalization)
    ga.plan([(y != -100).sum() for _, y in micro])
    for i, (x, y) in enumerate(micro):
        with ga.sync_context(model, i):
            loss_sum, n = token_loss(model(x), y)
            ga.backward_loss(loss_sum, n, i).backward()
    return grads(model)


@pytest.mark.parametrize("sizes", [[4, 4], [6, 2], [1, 1, 6], [1] * 8])
def test_token_normalisation_equals_the_full_batch_gradient_with_uneven_padding(sizes):
    """Micro-batches with very different valid-token counts still give the gradient of the global mean."""
    x, y = make_batch(rows=8, padded=True)
    micro = list(zip(x.split(sizes), y.split(sizes)))
    assert len({int((yy != -100).sum()) for _, yy in micro}) > 1, "the split must be uneven in valid tokens"
    assert max_diff(accumulated_grads(micro), full_batch_grads(x, y)) < TOL


def test_microbatch_mean_is_right_without_padding_and_wrong_with_it():
    """The classic mean/K: exact when every micro-batch holds the same token count, biased with padding."""
    x, y = make_batch(rows=8)
    micro = list(zip(x.split(4), y.split(4)))
    assert max_diff(accumulated_grads(micro, "microbatches"), full_batch_grads(x, y)) < TOL
    x, y = make_batch(rows=8, padded=True)
    micro = list(zip(x.split([6, 2]), y.split([6, 2])))
    assert max_diff(accumulated_grads(micro, "microbatches"), full_batch_grads(x, y)) > 1e-4


def test_flags_and_divisors_per_microbatch():
    """zero_grad on the first micro-batch; sync, step and metrics on the last; the divisor is T (one process)."""
    ga = GradientAccumulation(steps=3)
    assert ga.enabled and not GradientAccumulation(1).enabled
    assert ga.plan([5, torch.tensor(7), 0]) == 12
    kws = [ga.train_step_kwargs(i) for i in range(3)]
    assert [kw["zero_grad"] for kw in kws] == [True, False, False]
    for flag in ("sync_gradients", "step_optimizer", "collect_metrics"):
        assert [kw[flag] for kw in kws] == [False, False, True]
    assert [ga.sum_divisor(i, n) for i, n in enumerate([5, 7, 0])] == [12.0, 12.0, 12.0]
    assert ga.backward_loss(torch.tensor(6.0), 5, 0).item() == 0.5
    mean_over_k = GradientAccumulation(steps=2, normalization="microbatches")
    assert [mean_over_k.sum_divisor(i, n) for i, n in ((0, 30), (1, 0))] == [60.0, 2.0]  # max(n, 1) * K


class _FakeDDP(nn.Linear):
    """Records the no_sync() calls the way DDP would see them."""

    def __init__(self):
        super().__init__(2, 2)
        self.entered = []

    @contextmanager
    def no_sync(self):
        self.entered.append(True)
        yield


class _FakeFSDP2(nn.Linear):
    """Records set_requires_gradient_sync() calls the way an FSDP2 module would see them."""

    def __init__(self):
        super().__init__(2, 2)
        self.calls = []

    def set_requires_gradient_sync(self, value):
        self.calls.append(value)


def test_sync_context_picks_no_sync_or_requires_gradient_sync():
    """DDP-style: no_sync() on every micro-batch but the last. FSDP2-style: sync off, then restored to True."""
    ga = GradientAccumulation(steps=3)
    ddp = _FakeDDP()
    for i in range(3):
        with ga.sync_context(ddp, i):
            pass
    assert ddp.entered == [True, True]
    fsdp = _FakeFSDP2()
    for i in range(3):
        with ga.sync_context(fsdp, i):
            pass
    assert fsdp.calls == [False, True, False, True, True, True]
    assert isinstance(ga.sync_context(nn.Linear(2, 2), 0), nullcontext)  # a plain module: nothing to skip


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_bad_steps_is_one_line_naming_steps(bad):
    """Zero, negative, fractional, string and boolean step counts: one line naming ``steps``."""
    with pytest.raises(ValueError, match=r"^steps must be a positive integer \(1 = no accumulation\), got") as e:
        GradientAccumulation(steps=bad)
    assert "\n" not in str(e.value)


def test_bad_normalization_and_plan_errors():
    """An unknown normalization lists the choices; plan() checks its counts; indices are range-checked."""
    with pytest.raises(ValueError, match=r"^normalization must be one of tokens, microbatches, got 'mean'$"):
        GradientAccumulation(2, normalization="mean")
    ga = GradientAccumulation(3)
    with pytest.raises(RuntimeError, match=r"plan\(valid_tokens_per_microbatch\)"):
        ga.loss_divisor()  # tokens mode needs plan() first
    with pytest.raises(ValueError, match="got 2 micro-batch token counts, expected 3"):
        ga.plan([1, 2])
    with pytest.raises(ValueError, match="no valid tokens"):
        ga.plan([0, 0, 0])
    with pytest.raises(IndexError, match="micro-batch index 3 out of range for 3"):
        ga.is_last(3)


def test_from_config_reads_any_mapping():
    """from_config reads a plain dict, defaults to 1 step, and names the config key in errors."""
    cfg = {"gradient_accumulation_steps": 4, "grad_accum_normalization": "microbatches"}
    ga = GradientAccumulation.from_config(cfg)
    assert (ga.steps, ga.normalization) == (4, "microbatches")
    assert GradientAccumulation.from_config({}).steps == 1
    with pytest.raises(ValueError, match="^gradient_accumulation_steps must be a positive integer"):
        GradientAccumulation.from_config({"gradient_accumulation_steps": 0})


# -- two ranks: DDP and FSDP2 ---------------------------------------------------------------------------------------

SPLIT = [2, 1, 1]  # each rank's 4 rows in 3 micro-batches


def _rank_microbatches(rank, world_size):
    x, y = make_batch(rows=8, padded=True)
    x, y = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    return list(zip(x.split(SPLIT), y.split(SPLIT)))


def _accumulate(model, micro, after_each):
    ga = GradientAccumulation(len(micro))
    ga.plan([(y != -100).sum() for _, y in micro])  # all-reduced: the global valid-token count
    seen = []
    for i, (x, y) in enumerate(micro):
        with ga.sync_context(model, i):
            loss_sum, n = token_loss(model(x), y)
            ga.backward_loss(loss_sum, n, i).backward()
        seen.append(after_each())
    return ga, seen


def _ddp_and_fsdp2(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    micro = _rank_microbatches(rank, world_size)
    out = {}

    model = tiny_decoder()
    ddp = DDP(model)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(bucket.index())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world_size)

    ddp.register_comm_hook(None, counting_allreduce)
    ga, seen = _accumulate(ddp, micro, lambda: len(calls))
    out["ddp"] = {"allreduces": seen, "grads": grads(model), "global_tokens": ga.global_tokens,
                  "divisor": ga.loss_divisor()}

    model = tiny_decoder()
    mesh = init_device_mesh("cpu", (world_size,))  # explicit: gloo on CPU even where CUDA is available
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _, seen = _accumulate(model, micro, lambda: sum(p.grad is not None for p in model.parameters()))
    out["fsdp2"] = {"sharded_grads": seen, "n_params": len(list(model.parameters())),
                    "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()}}
    return out


@pytest.mark.timeout(300)
def test_ddp_and_fsdp2_sync_once_and_equal_the_single_process_gradient():
    """World size 2, 3 uneven micro-batches per rank: DDP all-reduces only on the last micro-batch, FSDP2 reduces
    only on the last, and both give the single-process full-batch gradient."""
    results = spawn(_ddp_and_fsdp2, 2, timeout=180)
    x, y = make_batch(rows=8, padded=True)
    ref = full_batch_grads(x, y)
    total = int((y != -100).sum())
    for r in results:
        ddp, fsdp2 = r["ddp"], r["fsdp2"]
        assert ddp["allreduces"] == [0, 0, 1], "one bucket (a tiny model), all-reduced on the last micro-batch only"
        assert ddp["global_tokens"] == total and ddp["divisor"] == total / 2  # DDP averages: T / N
        assert max_diff(ddp["grads"], ref) < TOL
        n = fsdp2["n_params"]
        assert fsdp2["sharded_grads"] == [0, 0, n], "FSDP2 must not reduce-scatter before the last micro-batch"
        assert max_diff(fsdp2["grads"], ref) < TOL
