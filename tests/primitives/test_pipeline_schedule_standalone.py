"""Pipeline schedules. Without processes: the simulator's bubbles equal the closed forms, its action lists are
complete, bad schedules fail with the numbers. On 2 gloo ranks: ``PipelineSchedule`` over a torchtitan-style
decoder split by hand gives the single-process loss and every gradient, for every schedule kind."""

import pytest

from curry_train.primitives.pipeline.gpipe_early_recv import missing_torch_internals
from curry_train.primitives.pipeline.schedule import PipelineSchedule, layer_split
from curry_train.primitives.pipeline.sim import (
    KINDS, ZERO_BUBBLE_KINDS, action_lists, analytic_bubble, check_schedule, simulate, stage_placement,
)
from standalone_helpers import grads, make_batch, spawn, split_stages, tiny_decoder, token_loss

# -- the simulator (no processes) ------------------------------------------------------------------------------------


def test_kinds_name_real_pytorch_schedules():
    """Every kind maps to a schedule class this torch ships."""
    from torch.distributed import pipelining

    assert list(KINDS) == ["gpipe", "1f1b", "interleaved", "looped_bfs", "zb", "zbv", "dualpipev"]
    assert all(hasattr(pipelining, cls_name) for cls_name, _, _ in KINDS.values())


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (3, 5), (4, 8), (8, 32)])
def test_gpipe_and_1f1b_bubble_is_the_closed_form(kind, p, m):
    """(p - 1) / (m + p - 1) on every rank, whatever the backward/forward cost ratio; makespan (m + p - 1)(f + b)."""
    for f, b in ((1.0, 2.0), (2.5, 1.0)):
        t = simulate(kind, p, m, f=f, b=b)
        assert t.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
        assert t.bubble_fraction == pytest.approx(analytic_bubble(kind, p, m), abs=1e-12)
        assert t.bubble_per_rank() == pytest.approx([(p - 1) / (m + p - 1)] * p, abs=1e-12)
        assert t.makespan == pytest.approx((m + p - 1) * (f + b))


def test_interleaving_divides_the_bubble_and_zero_bubble_goes_lower():
    """Interleaved 1F1B with v=2 stages per rank, each holding half the layers: (p - 1) / (v m + p - 1)."""
    p, m, v = 2, 4, 2
    inter = simulate("interleaved", p, m, v, f=1 / v, b=2 / v)
    assert inter.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
    assert inter.bubble_fraction < simulate("1f1b", p, m).bubble_fraction
    for kind in ZERO_BUBBLE_KINDS:
        assert simulate(kind, p, m).bubble_fraction < simulate("interleaved", p, m).bubble_fraction
        assert analytic_bubble(kind, p, m) is None  # cost-dependent: only simulate() knows


@pytest.mark.parametrize("kind", list(KINDS))
def test_action_lists_run_every_forward_and_backward_once_on_its_rank(kind):
    """Each rank's action list holds only its own stages, and every (stage, micro-batch) is run forward once and
    backward once (B, or I + W)."""
    p, m = 2, 4
    _, v = check_schedule(kind, p, m)
    placement = stage_placement(kind, p, v)
    seen = {}
    for rank, actions in enumerate(action_lists(kind, p, m, v)):
        for a in actions:
            assert a.stage in placement[rank], (kind, rank, a)
            seen[a.stage, a.kind, a.mb] = seen.get((a.stage, a.kind, a.mb), 0) + 1
    for s in range(p * v):
        for mb in range(m):
            assert seen.get((s, "F", mb)) == 1
            assert seen.get((s, "B", mb)) == 1 or (seen.get((s, "I", mb)), seen.get((s, "W", mb))) == (1, 1)


def test_placement_and_communication_latency():
    """Loop and V stage placement; a point-to-point latency delays only dependencies that cross ranks."""
    assert stage_placement("1f1b", 3) == [[0], [1], [2]]
    assert stage_placement("interleaved", 2, 2) == [[0, 2], [1, 3]]
    assert stage_placement("zbv", 2) == [[0, 3], [1, 2]]  # V: the first and last stage on rank 0
    # GPipe p=2: the critical path crosses ranks twice (forward to rank 1, gradient back to rank 0)
    assert simulate("gpipe", 2, 4, comm=0.5).makespan == pytest.approx(simulate("gpipe", 2, 4).makespan + 1.0)


@pytest.mark.parametrize("args,message", [
    (("1f1b", 4, 3), r"'1f1b' needs n_microbatches >= number of stages: got n_microbatches=3 < 4 stages"),
    (("dualpipev", 2, 3), r"'dualpipev' needs n_microbatches >= number of stages \(2 x pp\): got n_microbatches=3"),
    (("interleaved", 4, 9), r"n_microbatches divisible by its rounds .* = 2: got n_microbatches=9 with pp=4"),
    (("zbv", 2, 4, 3), r"'zbv' needs exactly 2 stage\(s\) per rank, got 3"),
    (("gpipe", 2, 4, 2), r"'gpipe' needs exactly 1 stage\(s\) per rank, got 2"),
    (("zigzag", 2, 4), r"unknown pipeline schedule kind 'zigzag'; choose from gpipe, 1f1b, interleaved"),
    (("gpipe", 2, 0), r"n_microbatches must be a positive integer, got 0"),
])
def test_bad_schedules_fail_with_the_numbers(args, message):
    """Too few micro-batches, wrong stages per rank, unknown kind: a ValueError naming the schedule and the numbers."""
    with pytest.raises(ValueError, match=message):
        check_schedule(*args)


def test_layer_split_is_even_or_explicit():
    """Layers split evenly or as given; never a silent uneven split."""
    assert layer_split(8, 4) == [2, 2, 2, 2]
    assert layer_split(4, 3, [2, 1, 1]) == [2, 1, 1]
    with pytest.raises(ValueError, match="model.n_layer=6 is not divisible by the number of pipeline stages 4"):
        layer_split(6, 4)
    with pytest.raises(ValueError, match="a middle stage needs at least one block"):
        layer_split(4, 3, [2, 0, 2])


def test_schedule_needs_a_process_group_and_this_torch_has_the_early_receive_internals():
    """PipelineSchedule refuses to run without a process group; GPipe's early-receive override finds every torch
    internal it needs."""
    with pytest.raises(RuntimeError, match="initialised process group"):
        PipelineSchedule("gpipe", 2, split_stages(tiny_decoder(), 2), None, lambda out, tgt: out.sum())
    assert missing_torch_internals() == []


# -- two ranks -------------------------------------------------------------------------------------------------------

N_LAYERS, ROWS, M = 4, 8, 4
RUNS = ([(kind, {}, False) for kind in KINDS]  # receives posted early (the default)
        + [(kind, {"early_recv": False}, False) for kind in KINDS]  # PyTorch's own receive order
        + [("1f1b", {}, True), ("zbv", {}, True)])  # tied embedding/head


def _loss_fn(output, target):
    return token_loss(output, target)[0]  # summed: train_step divides by the global valid-token count


def reference(tie=False):
    """One process, no pipeline: the mean token loss and every gradient."""
    model = tiny_decoder(n_layers=N_LAYERS, tie=tie)
    x, y = make_batch(rows=ROWS, padded=True)
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n).backward()
    return (loss_sum / n).item(), grads(model)


def _pipelined(kind, options, tie, world_size, **schedule_kw):
    model = tiny_decoder(n_layers=N_LAYERS, tie=tie)  # every rank builds the same model, then keeps its stages
    x, y = make_batch(rows=ROWS, padded=True)
    n_valid = (y != -100).sum().item()
    _, v = check_schedule(kind, world_size, M)
    stages = split_stages(model, world_size * v)
    sched = PipelineSchedule(kind, M, stages, None, _loss_fn, device="cpu", **options, **schedule_kw)
    loss = sched.train_step(x, y, loss_divisor=n_valid, broadcast_loss=True)  # the undivided sum, on every rank
    return loss.item() / n_valid, grads(model), sched


def _errors(rank, world_size):
    """Bad input raises ValueError on every rank before any send/recv (no rank is left waiting)."""
    stages = split_stages(tiny_decoder(n_layers=N_LAYERS), 2)
    errors = {}
    for name, build in {
        "too_few_microbatches": lambda: PipelineSchedule("1f1b", 1, stages, None, _loss_fn, device="cpu"),
        "stages_vs_group": lambda: PipelineSchedule("gpipe", M, stages[:1] * 3, None, _loss_fn, device="cpu"),
        "no_loss": lambda: PipelineSchedule("gpipe", M, stages, None, None, device="cpu"),
    }.items():
        try:
            build()
        except ValueError as e:
            errors[name] = str(e)
    sched = PipelineSchedule("gpipe", M, stages, None, _loss_fn, device="cpu")
    x, y = make_batch(rows=ROWS)
    try:  # rank 0 (stage 0) gets 7 rows, rank 1 a good target: both must raise
        sched.train_step(x[:7] if rank == 0 else x, y)
    except ValueError as e:
        errors["batch_not_divisible"] = str(e)
    return errors


def _every_kind(rank, world_size):
    out, out["runs_early_order"] = {}, {}
    for kind, options, tie in RUNS:
        loss, got, sched = _pipelined(kind, options, tie, world_size)
        out[kind, str(options), tie] = loss, got
        runtime_order = getattr(sched.schedule, "pipeline_order_with_comms", None)
        out["runs_early_order"][kind, str(options)] = sched.recv_order is not None and runtime_order == sched.recv_order
    _, _, sched = _pipelined("1f1b", {}, False, world_size, record=True)
    out["timeline"] = sched.measured_timeline().to_dict()
    out["errors"] = _errors(rank, world_size)
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_every_kind, 2, timeout=240)


@pytest.mark.timeout(300)
def test_every_kind_gives_the_single_process_loss_and_gradients(ranks):
    """Each rank holds part of the gradients; together they are every gradient of the unpipelined model (within
    1e-6), and every rank reports the same mean token loss. Tied weights: both uses summed across ranks."""
    for kind, options, tie in RUNS:
        ref_loss, ref_grads = reference(tie)
        covered = set()
        for rank_result in ranks:
            loss, got = rank_result[kind, str(options), tie]
            assert loss == pytest.approx(ref_loss, abs=1e-6), (kind, options, tie)
            for name, g in got.items():
                assert (g - ref_grads[name]).abs().max().item() < 1e-6, (kind, options, tie, name)
            covered |= set(got)
        assert covered == set(ref_grads), (kind, options, tie, set(ref_grads) - covered)


@pytest.mark.timeout(300)
def test_early_receive_orders_equal_pytorchs_order(ranks):
    """Every kind with its receives posted early gives PyTorch's own schedule's loss and gradients (within 1e-6);
    the runtime kinds (1f1b and the multi-stage ones) really run the reordered action list."""
    for kind in KINDS:
        for rank_result in ranks:
            early_loss, early = rank_result[kind, "{}", False]
            torch_loss, torch_grads = rank_result[kind, str({"early_recv": False}), False]
            assert early_loss == pytest.approx(torch_loss, abs=1e-6), kind
            assert set(early) == set(torch_grads)
            for name, g in early.items():
                assert (g - torch_grads[name]).abs().max().item() < 1e-6, (kind, name)
            assert rank_result["runs_early_order"][kind, "{}"] is (kind != "gpipe"), kind  # gpipe: its own class
            assert rank_result["runs_early_order"][kind, str({"early_recv": False})] is False, kind


@pytest.mark.timeout(300)
def test_bad_input_fails_on_every_rank_and_the_timeline_is_recorded(ranks):
    """Bad input raises on every rank (the peer of a rank with a bad batch too, instead of hanging); record=True
    measures an F and a B per micro-batch on each rank."""
    for rank, r in enumerate(ranks):
        e = r["errors"]
        assert "n_microbatches=1 < 2 stages" in e["too_few_microbatches"]
        assert "pp_group has 2 ranks but 3 stage modules" in e["stages_vs_group"]
        assert "loss_fn is required" in e["no_loss"]
        expected = "batch of 7 rows is not divisible by n_microbatches=4" if rank == 0 else "peer rank"
        assert expected in e["batch_not_divisible"]
    t = ranks[0]["timeline"]
    assert t["n_ranks"] == 2 and len(t["events"]) == 2 * 2 * M  # F and B of every micro-batch on both ranks
    assert {(e[0], e[1], e[2]) for e in t["events"]} == {(r, r, k) for r in (0, 1) for k in "FB"}
    assert 0.0 < t["bubble_fraction"] < 1.0
