"""`python -m curry_train plan`: its numbers against the ZeRO paper, the pipeline simulator, `memory_report()` on
gloo ranks (every sharding mode, N = 2 and 4), the real `model=moe` GPT and our own activation measurements."""

import json

import pytest
import torch
import torch.distributed as dist

from curry_train.__main__ import main
from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.plan import (Hardware, Layout, Shape, activation_bytes, command, estimate, in_flight_stages,
                              model_state_bytes, plan)
from curry_train.primitives import DistributedOptimizer
from curry_train.primitives.distributed_optimizer import SHARDINGS
from curry_train.primitives.moe import MoEMLP
from curry_train.primitives.pipeline.sim import KINDS, default_stages_per_rank, simulate
from curry_train.primitives.recompute import activation_memory, apply_recompute

RANKS_CFG = GPTConfig(n_layer=8, n_head=4, n_embd=64, block_size=32)  # ZeRO-1 splits whole tensors: 0.04% apart here


def test_the_zero_paper_example_is_reproduced(capsys):
    """7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12): 120, 31.4, 16.6 and 1.9 GB per GPU."""
    assert main(["plan", "--params", "7.5e9", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    for row in ("| DDP | 15.0 GB | 15.0 GB | 90.0 GB | 120.0 GB |", "| ZeRO-1 | 15.0 GB | 15.0 GB | 1.4 GB | 31.4 GB |",
                "| ZeRO-2 | 15.0 GB | 0.2 GB | 1.4 GB | 16.6 GB |", "| ZeRO-3 / FSDP | 0.2 GB | 0.2 GB | 1.4 GB | 1.9 GB |"):
        assert row in out
    assert "Recommended: #1" in out and "torchrun --nnodes 8 --nproc-per-node 8 -m curry_train train" in out
    line = out.split("torchrun", 1)[1].splitlines()[0]
    cfg = load_config(line.split(" train ", 1)[1].split())  # the planned model's sizes, every key a real one
    shape = Shape.from_params(7.5e9)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (shape.n_layer, shape.d_model, 4096)


@pytest.mark.slow
def test_json_and_every_estimate_consistent(capsys):
    assert main(["plan", "--layers", "32", "--hidden", "4096", "--heads", "32", "--gpus", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for e in data["estimates"]:
        L = e["layout"]
        assert L["dp"] * L["tp"] * L["pp"] * L["cp"] == 16
        assert e["total_bytes"] == pytest.approx(e["states_bytes"]["peak"] + e["activation_bytes"])
        assert f"parallel.tp={L['tp']}" in e["command"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (2, 12)])  # m > 2p: the idle time carried over from 2p
def test_the_bubble_is_the_simulators_for_every_schedule(kind, p, m):
    v = default_stages_per_rank(kind)
    shape = Shape(1e9, 16, 2048, 16, seq=2048)
    layout = Layout(dp=2, tp=1, pp=p, cp=1, sharding="no_shard", recompute="none", micro_batch=1, schedule=kind, v=v)
    hw = Hardware(gpus=2 * p)
    e = estimate(shape, hw, layout, global_batch_tokens=2 * m * 2048)
    assert e.excluded is None and e.microbatches == m
    assert e.bubble == pytest.approx(simulate(kind, p, m, v, f=1 / v, b=2 / v).bubble_fraction, rel=1e-12, abs=1e-15)
    if kind in ("gpipe", "1f1b"):
        assert e.bubble == pytest.approx((p - 1) / (m + p - 1))
    assert f"parallel.pp_schedule={kind} parallel.pp_stages_per_rank={v} parallel.n_microbatches={m}" in \
        command(e, hw, shape)
    # activations in flight: GPipe all m, 1F1B min(p, m), interleaved 1F1B (v-1)p + 2(p-1) + 1 stages of L/(pv)
    expected = {"gpipe": m, "1f1b": min(p, m), "interleaved": (v - 1) * p + 2 * (p - 1) + 1}.get(kind)
    if expected is not None:
        assert e.in_flight == expected
    assert e.activation_bytes == pytest.approx(activation_bytes(shape, 1, 16 / (p * v), e.in_flight))


def test_schedule_constraints_exclude_with_the_reason():
    shape = Shape(1e9, 16, 2048, 16, seq=2048)
    e = estimate(shape, Hardware(gpus=8), Layout(2, 1, 4, 1, "no_shard", "none", 1, "dualpipev", 2), 2 * 4 * 2048)
    assert "dualpipev" in e.excluded and "n_microbatches" in e.excluded
    e = estimate(shape, Hardware(gpus=8), Layout(1, 1, 8, 1, "no_shard", "none", 1, "interleaved", 4), 64 * 2048)
    assert e.excluded == "16 layers not divisible by pp x stages per rank = 32"
    assert in_flight_stages(4, 64, "1f1b") == 4 and in_flight_stages(4, 64, "gpipe") == 64


def _ranks_memory(rank, ws):
    """One launch of 4 ranks for N = 2 (two pairs of ranks) and N = 4: every sharding mode on the reference GPT, one
    step (forward, backward, AdamW), then memory_report()."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    out = {}
    for n, group in ((2, pairs[rank // 2]), (4, None)):
        for sharding in SHARDINGS:
            torch.manual_seed(0)
            d = DistributedOptimizer.wrap(GPT(RANKS_CFG), sharding, process_group=group, lr=1e-3)
            x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
            loss_sum, n_tokens = token_loss(d.model(x), x)
            (loss_sum / n_tokens).backward()
            d.optimizer.step()
            out[n, sharding] = d.memory_report()
            dist.barrier()
    return out


@pytest.fixture(scope="module")
def rank_memory():
    return launch(_ranks_memory, 4, timeout=240)


@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.slow
def test_predicted_model_states_equal_memory_report_on_every_rank(rank_memory, ws):
    """plan's per-rank parameter, gradient and optimizer bytes (fp32 Adam: 4 + 4 + 8, what curry_train holds) for the
    model's real Shape, against what every rank holds after a step: within 1%, every sharding mode."""
    ranks = rank_memory
    shape = Shape.from_model_config(RANKS_CFG)
    assert shape.params == GPT(RANKS_CFG).n_params()
    for sharding in SHARDINGS:
        predicted = model_state_bytes(shape.params, ws, sharding, "fp32", n_layer=shape.n_layer)
        layout = Layout(ws, 1, 1, 1, sharding, "none", 1)
        assert estimate(shape, Hardware(gpus=ws), layout, ws * 32 * 2, "fp32").states_bytes == predicted
        for rank, report in enumerate(ranks):
            measured = report[ws, sharding]
            assert measured["world_size"] == ws
            for part in ("params", "grads", "optimizer_state", "total"):
                assert measured[part] == pytest.approx(predicted[part], rel=0.01), (ws, rank, sharding, part)
            assert measured["unsharded_param_bytes"] == 0  # at rest
        if sharding == "shard_grad_op":  # held from forward to backward: the whole fp32 parameter set
            assert predicted["held_unsharded"] == 4 * shape.params
        if sharding == "full":  # the default levers keep the last unit (2 blocks from 4 up, else 1) gathered
            per_unit = 2 if shape.n_layer >= 4 else 1
            assert predicted["held_unsharded"] == pytest.approx(4 * shape.params * per_unit / shape.n_layer)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.slow
def test_predicted_activations_are_within_15_percent_of_the_measured(mode):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=128))
    if mode != "none":
        apply_recompute(model, mode)
    x, y = torch.randint(0, 256, (8, 128)), torch.randint(0, 256, (8, 128))
    measured = activation_memory(model, (x, y), peak=False)["activation_bytes"]
    predicted = activation_bytes(Shape(model.n_params(), 4, 128, 4, vocab=256, seq=128), 8, layers=4,
                                 recompute=mode, bytes_per_value=4)
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / measured)


def test_infeasible_input_says_what_to_change(capsys):
    assert main(["plan", "--layers", "3", "--hidden", "512", "--heads", "7", "--gpus", "4", "--seq", "1000",
                 "--global-batch-tokens", "1000"]) == 0  # runs at dp=1 x tp=1 ...: the reasons only exclude layouts
    assert main(["plan", "--params", "1e9", "--gpus", "0"]) == 2
    assert "--gpus must be a positive integer" in capsys.readouterr().err
    assert main(["plan", "--gpus", "8"]) == 2
    assert "give --params, or --layers, --hidden and --heads" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no layout can run"):
        plan(Shape(1e9, 15, 1920, 15, seq=2050), Hardware(gpus=4), global_batch_tokens=3 * 2050)


def test_nothing_fits_is_said_with_the_numbers(capsys):
    assert main(["plan", "--params", "7e10", "--gpus", "8", "--memory-gb", "24"]) == 0
    assert "Nothing fits: the smallest layout needs" in capsys.readouterr().out


def test_moe_parameter_counts_are_the_real_model_eq():
    cfg = load_config(["model=moe"]).model
    shape = Shape.from_model_config(cfg, seq=128)
    model = GPT(GPTConfig.from_config(cfg))
    assert shape.params == model.n_params()
    moe_layers = [b.mlp for b in model.blocks if isinstance(b.mlp, MoEMLP)]
    bank = sum(sum(p.numel() for p in m.experts.parameters()) for m in moe_layers)
    assert (shape.experts, shape.top_k, shape.moe_layers, shape.expert_params) == (8, 2, len(moe_layers), bank)
    assert shape.active_params == model.n_params() - bank + bank * 2 // 8  # top-2 of 8 experts
    dense = load_config(["model=tiny"]).model
    assert Shape.from_model_config(dense).params == GPT(GPTConfig.from_config(dense)).n_params()


def test_experts_shard_over_ep_and_cost_all_to_all():
    shape = Shape.from_model_config(load_config(["model=moe"]).model, seq=128)
    hw, tokens = Hardware(gpus=4), 4 * 2 * 128
    one, four = (estimate(shape, hw, Layout(4, 1, 1, 1, "no_shard", "none", 1, ep=ep), tokens) for ep in (1, 4))
    dense = shape.params - shape.expert_params
    assert one.states_bytes["total"] == pytest.approx(16 * shape.params)
    assert four.states_bytes["total"] == pytest.approx(16 * (dense + shape.expert_params / 4))
    # EP: 2 T top_k d values per MoE layer forward, again backward, (ep-1)/ep leaving the rank, 2-byte values
    T = 2 * 128  # the rank's tokens: 1 row x 128, 2 micro-batches
    assert four.comm_bytes["ep"] == pytest.approx(2 * 2 * T * 2 * 128 * 2 * 3 / 4 * shape.moe_layers)
    assert one.comm_bytes["ep"] == 0
    assert estimate(shape, hw, Layout(4, 1, 1, 1, "no_shard", "none", 1, ep=3), tokens).excluded == \
        "ep=3 must divide the experts (8) and dp=4"
    assert {e.layout.ep for e in plan(shape, hw, tokens)} == {1, 2, 4}  # the candidates shard experts over ep | dp
    # compute uses the active parameters: the MoE model's step is cheaper than a dense model of the same total
    dense_twin = Shape(shape.params, shape.n_layer, shape.d_model, shape.n_head, shape.vocab, shape.seq)
    assert one.step_s < estimate(dense_twin, hw, Layout(4, 1, 1, 1, "no_shard", "none", 1), tokens).step_s


def test_moe_and_nodes_from_the_cli(capsys):
    argv = ["plan", "--layers", "8", "--hidden", "1024", "--heads", "8", "--experts", "8", "--top-k", "2",
            "--nodes", "2", "--gpus-per-node", "4", "--seq", "2048", "--global-batch-tokens", str(64 * 2048), "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    s = data["shape"]
    assert data["hardware"]["gpus"] == 8 and s["experts"] == 8 and s["moe_layers"] == 8
    assert s["expert_params"] == 8 * 8 * 3 * 1024 * round(8 * 1024 / 3)
    assert s["active_params"] == pytest.approx(s["params"] - s["expert_params"] * 6 / 8)
    for e in data["estimates"]:
        assert e["layout"]["tp"] <= 4
        L = e["layout"]
        assert ("dp" in e["inter_node"]) == (L["dp"] > 1 and L["dp"] * L["tp"] * L["cp"] > 4)
    assert main(["plan", "model=moe", "model.n_layer=8", "--gpus", "4", "--global-batch-tokens", "65536"]) == 0
    out = capsys.readouterr().out
    assert "MoE: 8 experts top-2 in 4 layers" in out and "train model=moe model.n_layer=8 " in out
    shape = Shape.from_model_config(load_config(["model=moe"]).model, seq=128)
    e = estimate(shape, Hardware(gpus=4), Layout(2, 1, 2, 1, "no_shard", "none", 1, "zbv", 2, ep=2), 2 * 8 * 128)
    assert e.excluded is None
    line = command(e, Hardware(gpus=4), shape, ["model=moe"])
    cfg = load_config(line.split(" train ", 1)[1].split())  # every key of the torchrun line is a real config key
    assert (cfg.parallel.pp_schedule, cfg.parallel.pp_stages_per_rank, cfg.parallel.n_microbatches, cfg.parallel.ep) \
        == ("zbv", 2, 8, 2)


def test_tp_beyond_a_node_is_excluded_with_the_reason():
    shape = Shape(1e9, 16, 2048, 16, seq=2048)
    e = estimate(shape, Hardware(gpus=16, gpus_per_node=4), Layout(2, 8, 1, 1, "no_shard", "none", 1), 2 * 2048)
    assert e.excluded == "tp=8 spans nodes of 4 GPUs (tp needs NVLink: tp <= --gpus-per-node)"
    assert all(x.layout.tp <= 4 for x in plan(shape, Hardware(gpus=16, gpus_per_node=4), 64 * 2048))
    e = estimate(shape, Hardware(gpus=16, gpus_per_node=4), Layout(4, 4, 1, 1, "no_shard", "none", 1), 4 * 2048)
    assert e.inter_node == ["dp"]  # tp=4 fills a node; the dp group crosses nodes and pays the inter-node link


@pytest.mark.parametrize("argv,message", [
    (["--layers", "2", "--hidden", "64", "--heads", "2", "--experts", "1"], "--experts must be"),
    (["--layers", "2", "--hidden", "64", "--heads", "2", "--experts", "4", "--top-k", "5"], "--top-k must be"),
    (["--params", "1e9", "--top-k", "2"], "--top-k needs --experts"),
    (["--params", "1e9", "--experts", "8"], "--experts needs the exact sizes"),
    (["--params", "1e9", "--nodes", "0"], "--nodes must be a positive integer"),
    (["--params", "1e9", "--nodes", "2", "--gpus", "12"], "--gpus 12 != --nodes 2 x --gpus-per-node 8"),
    (["--params", "1e9", "--gpus", "12"], "--gpus 12 spans nodes but is not a multiple of --gpus-per-node 8"),
    (["--params", "1e9", "--gpus", "8", "--schedules", "1f1b,foo"], "unknown pipeline schedule kind 'foo'"),
    (["model=moe", "--layers", "4", "--gpus", "8"], "give the model either as overrides"),
    (["model.n_layer=x", "--gpus", "8"], "model.n_layer"),
    (["model=moe", "--vocab", "100", "--gpus", "8"], "give the model either as overrides"),
    (["--params", "1e9", "--layers", "4", "--gpus", "8"], "--layers, --hidden and --heads go together"),
    (["--params", "-1", "--gpus", "8"], "--params must be"),
    (["--params", "1e9", "--gpus", "8", "--top", "0"], "--top must be a positive integer"),
])
def test_bad_new_input_is_one_line(capsys, argv, message):
    assert main(["plan", *argv] if "--gpus" in argv or "--nodes" in argv else ["plan", *argv, "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:") and err.count("\n") == 1, err


@pytest.mark.slow
def test_recompute_bench_prediction_for_every_other_block():
    """`bench recompute`'s predicted column: plan's formula for `full` on every 2nd block, against the measurement."""
    from curry_train.bench.recompute import predicted_activation_bytes

    cfg = load_config(["model=tiny", "model.n_layer=4", "train.batch_size=4", "train.seq_len=64"])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_config(cfg.model))
    apply_recompute(model, "full", every_n=2)
    x = torch.randint(0, 256, (4, 64))
    measured = activation_memory(model, (x, x), peak=False)["activation_bytes"]
    assert predicted_activation_bytes(cfg, "full every 2nd") == pytest.approx(measured, rel=0.15)
    assert predicted_activation_bytes(load_config(["model._target_=torch.nn.Linear"]), "none") is None


@pytest.mark.parametrize("model", [[], ["model=moe"]], ids=["tiny", "moe"])
@pytest.mark.slow
def test_layouts_marked_runnable_are_exactly_those_train_accepts(model):
    """Every layout /plan marks runnable by `curry_train train` passes `config.validate` with its own torchrun
    overrides at world size 4, and every one it marks unsupported is refused there (the reason in both)."""
    from curry_train.config import validate

    cfg = load_config(model)
    shape = Shape.from_model_config(cfg.model, seq=64)
    hw = Hardware(gpus=4)
    checked, seen = {True: 0, False: 0}, set()
    for e in plan(shape, hw, global_batch_tokens=16 * 64, precision="fp32"):
        L = e.layout  # recompute and micro-batch size do not decide what train runs: one layout of each grid
        key = (L.dp, L.tp, L.pp, L.cp, L.ep, L.sharding, L.schedule)
        if key in seen:
            continue
        seen.add(key)
        overrides = command(e, hw, shape, model).split(" train ", 1)[1].split()
        try:
            validate(load_config(overrides), 4)
            refused = None
        except ValueError as error:
            refused = str(error)
        assert (refused is None) == (e.unsupported is None), (e.layout, e.unsupported, refused)
        checked[refused is None] += 1
    assert checked[True] and (checked[False] or not model), checked  # dense: every layout runs


@pytest.mark.parametrize("gpus,params", [(8, 1e9), (64, 7e9)])
def test_train_runs_every_dense_layout_the_plan_ranks(gpus, params):
    """The plan's full candidate list (every grid, sharding, schedule, recompute) for a dense model: the "curry_train
    train" column reads yes for all, and ``config.validate`` accepts each one's own torchrun overrides."""
    from curry_train.config import validate

    shape = Shape.from_params(params, seq=2048)
    hw = Hardware(gpus=gpus)
    estimates = plan(shape, hw, global_batch_tokens=512 * 2048)
    assert len(estimates) > 50 and all(e.unsupported is None for e in estimates)
    seen = set()
    for e in estimates:
        L = e.layout
        key = (L.dp, L.tp, L.pp, L.cp, L.sharding, L.schedule, e.microbatches)  # recompute: checked alone
        if key in seen:
            continue
        seen.add(key)
        overrides = command(e, hw, shape).split(" train ", 1)[1].split()
        validate(load_config(overrides), gpus)
