"""PipelineSchedule on torch.distributed.pipelining: every kind matches the unpipelined GPT (loss and every
gradient, tied embedding included), bad input fails on every rank before any send/recv, split_model rules.

Each launch runs many checks in one set of spawned gloo ranks (process start-up dominates the cost)."""

import pytest
import torch

from curry_train.bench.pipeline import row_schedule
from curry_train.distributed import launch
from curry_train.model import GPT, GPTConfig, IGNORE_INDEX, token_loss
from curry_train.model import split_model
from curry_train.primitives import PipelineSchedule
from curry_train.primitives.pipeline import layer_split
from curry_train.primitives.pipeline.sim import KINDS, default_stages_per_rank

TOL = 1e-6


def _gpt(n_layer: int, tie: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, tie_embeddings=tie))


def _batch(rows: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (rows, 16), generator=g)
    y = torch.randint(0, 256, (rows, 16), generator=g)
    y[rows // 2 :, 5:] = IGNORE_INDEX  # uneven valid tokens across micro-batches
    return x, y


def _reference(n_layer: int, tie: bool, rows: int):
    model = _gpt(n_layer, tie)
    x, y = _batch(rows)
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters(remove_duplicate=False)}
    return (loss_sum / n).item(), grads


def _pipelined(kind, m, n_layer, rows, tie=True, record=False):
    """One train_step of ``kind``; returns (loss on every rank, {param name: grad} of this rank's stages).
    ``kind`` may also be a bench reference row: ``gpipe-torch`` is PyTorch's ScheduleGPipe (``early_recv=False``)."""
    ws = torch.distributed.get_world_size()
    kind, options = row_schedule(kind)
    model = _gpt(n_layer, tie)
    x, y = _batch(rows)
    n_valid = (y != IGNORE_INDEX).sum()
    stages = split_model(model, ws * default_stages_per_rank(kind))
    sched = PipelineSchedule(kind, m, stages, None, lambda out, tgt: token_loss(out, tgt)[0], record=record, **options)
    loss = sched.train_step(x, y, loss_divisor=n_valid.item(), broadcast_loss=True)  # returns the undivided sum
    grads = {name: p.grad.clone() for s in sched.stage_ids for name, p in stages[s].named_parameters(remove_duplicate=False)}
    return loss.item() / n_valid.item(), grads, sched


def _parity_ranks(rank, world_size, kinds, m, n_layer, rows):
    out = {}
    for kind in kinds:
        loss, grads, _ = _pipelined(kind, m, n_layer, rows)
        out[kind] = (loss, grads)
    return out


def _check_parity(results, kinds, n_layer, rows, tie=True):
    ref_loss, ref_grads = _reference(n_layer, tie, rows)
    for kind in kinds:
        seen = set()
        for rank_result in results:
            loss, grads = rank_result[kind]
            assert loss == pytest.approx(ref_loss, abs=TOL), kind
            for name, g in grads.items():
                err = (g - ref_grads[name]).abs().max().item()
                assert err < TOL, f"{kind}: {name} grad differs by {err:.2e}"
                seen.add(name)
        assert seen == set(ref_grads), f"{kind}: gradients missing for {sorted(set(ref_grads) - seen)}"


@pytest.mark.slow
def test_every_kind_matches_unpipelined_gpt_world_size_2():
    kinds = [*KINDS, "gpipe-torch"]
    results = launch(_parity_ranks, 2, kinds, 4, 4, 8, timeout=300)
    _check_parity(results, kinds, 4, 8)


@pytest.mark.slow
def test_gpipe_1f1b_interleaved_match_unpipelined_gpt_world_size_4():
    kinds = ["gpipe", "gpipe-torch", "1f1b", "interleaved"]
    results = launch(_parity_ranks, 4, kinds, 8, 8, 16, timeout=300)
    _check_parity(results, kinds, 8, 16)


def _errors_and_extras(rank, world_size):
    """Bad input on every rank (no hang), then: a good step still works, untied model parity, measured timeline."""
    model = _gpt(2)
    stages = split_model(model, 2)
    loss_fn = lambda out, tgt: token_loss(out, tgt)[0]  # noqa: E731
    errors = {}
    for name, build in {
        "unknown_kind": lambda: PipelineSchedule("pipedream", 4, stages, None, loss_fn),
        "group_vs_stages": lambda: PipelineSchedule("gpipe", 4, split_model(_gpt(3), 3), None, loss_fn),
        "too_few_microbatches": lambda: PipelineSchedule("1f1b", 1, stages, None, loss_fn),
        "dualpipev_too_few": lambda: PipelineSchedule("dualpipev", 3, split_model(_gpt(4), 4), None, loss_fn),
    }.items():
        try:
            build()
        except ValueError as e:
            errors[name] = str(e)
    sched = PipelineSchedule("gpipe", 4, stages, None, loss_fn)
    x, y = _batch(8)
    try:  # rank 0 (stage 0) gets a batch of 7 rows, rank 1 a good target: both must raise, neither may hang
        sched.train_step(x[:7] if rank == 0 else x, y)
    except ValueError as e:
        errors["batch_not_divisible"] = str(e)
    good = sched.train_step(x, y, broadcast_loss=True).item()
    untied_loss, untied_grads, _ = _pipelined("1f1b", 4, 2, 8, tie=False)
    _, _, rec = _pipelined("1f1b", 4, 2, 8, record=True)
    timeline = rec.measured_timeline()
    return {"errors": errors, "good": good, "untied": (untied_loss, untied_grads), "timeline": timeline.to_dict(),
            "gpipe_order": _gpipe_call_order()}


def _gpipe_call_order() -> list[str]:
    """This rank's calls during one GPipe step: ``rF3`` = receive for forward 3 posted, ``F3`` = forward 3 ran."""
    sched = PipelineSchedule("gpipe", 4, split_model(_gpt(2), 2), None, lambda out, tgt: token_loss(out, tgt)[0])
    stage, calls = sched.schedule._stage, []
    for name, tag in [("get_fwd_recv_ops", "rF"), ("forward_one_chunk", "F"), ("get_bwd_recv_ops", "rB"),
                      ("backward_one_chunk", "B")]:
        def logged(i, *a, _fn=getattr(stage, name), _tag=tag, **k):
            calls.append(f"{_tag}{i}")
            return _fn(i, *a, **k)
        setattr(stage, name, logged)
    sched.train_step(*_batch(8))
    return calls


@pytest.mark.slow
def test_bad_input_raises_on_every_rank_before_any_send_and_extras():
    results = launch(_errors_and_extras, 2, timeout=300)
    for rank, r in enumerate(results):
        e = r["errors"]
        assert "gpipe, 1f1b, interleaved, looped_bfs, zb, zbv, dualpipev" in e["unknown_kind"]
        assert "pp_group has 2 ranks but 3 stage modules" in e["group_vs_stages"]
        assert "n_microbatches=1 < 2 stages" in e["too_few_microbatches"] and "1f1b" in e["too_few_microbatches"]
        assert "n_microbatches=3 < 4 stages" in e["dualpipev_too_few"] and "dualpipev" in e["dualpipev_too_few"]
        if rank == 0:
            assert "batch of 7 rows is not divisible by n_microbatches=4" in e["batch_not_divisible"]
        else:
            assert "peer rank" in e["batch_not_divisible"]
    model = _gpt(2)
    x, y = _batch(8)
    assert results[0]["good"] == pytest.approx(token_loss(model(x), y)[0].item(), rel=1e-6)
    _check_parity([{"1f1b": r["untied"]} for r in results], ["1f1b"], 2, 8, tie=False)
    t = results[0]["timeline"]
    assert t["n_ranks"] == 2 and len(t["events"]) == 2 * 2 * 4  # F and B of 4 micro-batches on 2 ranks
    assert {tuple(e[:3]) for e in t["events"]} == {(r, r, k) for r in (0, 1) for k in "FB"}
    assert all(0.0 <= e[4] < e[5] <= t["makespan"] + 1e-9 for e in t["events"])
    assert 0.0 < t["bubble_fraction"] < 1.0
    # GPipe posts the receive for micro-batch i + 1 before it computes i (gpipe_early_recv), forward and backward
    early = ["rF0", "rF1", "F0", "rF2", "F1", "rF3", "F2", "F3", "rB0", "rB1", "B0", "rB2", "B1", "rB3", "B2", "B3"]
    assert results[0]["gpipe_order"] == results[1]["gpipe_order"] == early


def test_split_model_is_the_gpt():
    model = _gpt(4)
    x, _ = _batch(4)
    for n_stages, layers in [(2, None), (4, None), (3, [2, 1, 1]), (3, [0, 4, 0])]:
        h = x
        for stage in split_model(model, n_stages, layers):
            h = stage(h)
        assert torch.equal(h, model(x))
    stages = split_model(model, 2)
    assert stages[1].head.weight is stages[0].tok_emb.weight  # tied weight shared, not copied
    names = {n for s in stages for n, _ in s.named_parameters(remove_duplicate=False)}
    assert names == {n for n, _ in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("n_layer,n_stages,layers,message", [
    (6, 4, None, r"model.n_layer=6 is not divisible by the number of pipeline stages 4"),
    (4, 2, [3, 2], r"layers_per_stage=\[3, 2\] must be 2 non-negative integers summing to model.n_layer=4"),
    (4, 3, [2, 0, 2], r"a middle stage needs at least one block"),
])
def test_split_model_rejects_uneven_splits(n_layer, n_stages, layers, message):
    with pytest.raises(ValueError, match=message):
        layer_split(n_layer, n_stages, layers)


def test_schedule_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised process group"):
        PipelineSchedule("gpipe", 2, split_model(_gpt(2), 2), None, lambda o, t: o.sum())


def test_early_receive_gpipe_runs_on_this_torch():
    """On the torch we ship against, nothing ScheduleGPipeEarlyRecv overrides or calls is missing (else it would
    fall back to PyTorch's ScheduleGPipe with a warning)."""
    from curry_train.primitives.pipeline.gpipe_early_recv import missing_torch_internals

    assert missing_torch_internals() == []
