"""DistributedOptimizer on gloo ranks (world size 2 and 4): every sharding mode trains exactly like one
process, FSDP2 shards hold 1/N of the bytes, recompute composes with FSDP2 and DCP with clean names."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from curry_train.data import Batches
from curry_train.distributed import launch
from curry_train.loop import accumulate_gradients
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives import DistributedOptimizer, GradientAccumulation, Recompute, apply_recompute
from curry_train.primitives.distributed_optimizer import SHARDINGS, zero_bytes_per_rank

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
STEPS, BATCH, SEQ, LR = 5, 8, 32, 3e-3
CASES = [(s, k, p, False) for s in SHARDINGS for k, p in ((1, None), (2, None), (1, "bf16"))] + [("full", 2, None, True)]


def _gpt():
    torch.manual_seed(0)
    return GPT(CFG)


def _batches():
    tokens = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(3))
    return Batches(tokens, BATCH, SEQ, seed=5, variable_length=True, min_len=4)  # padding: token counts differ


class Odd(nn.Module):
    """Parameters whose dim 0 does not divide by 2 or 4 (FSDP2 pads the last shard)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(97, 1001), nn.Linear(1001, 333), nn.Linear(333, 37)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def reference_losses() -> list[float]:
    model, batches = _gpt(), _batches()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = batches.global_batch(step)
        opt.zero_grad()
        loss_sum, n = token_loss(model(x), y)
        (loss_sum / n).backward()
        opt.step()
        losses.append(loss_sum.item() / n.item())
    return losses


def _train_cases(rank, ws):
    out = {}
    batches = _batches()
    for sharding, k, precision, offload in CASES:
        d = DistributedOptimizer.wrap(_gpt(), sharding, mixed_precision=precision, cpu_offload=offload, lr=LR)
        ga = GradientAccumulation(k)
        losses = []
        for step in range(STEPS):
            loss_sum, n = accumulate_gradients(d.model, batches.microbatches(step, rank, ws, k), ga)
            d.optimizer.step()
            t = torch.tensor([loss_sum.item(), float(n)], dtype=torch.float64)
            dist.all_reduce(t)
            losses.append((t[0] / t[1]).item())
        out[(sharding, k, precision, offload)] = {"losses": losses, "memory": d.memory_report()}
    # held between forward and backward, on a fresh model
    for sharding in ("shard_grad_op", "full"):
        last = {"reshard_last": False} if sharding == "full" else {}  # the default keeps the last block gathered too
        d = DistributedOptimizer.wrap(_gpt(), sharding, lr=LR, **last)
        x, y = batches.microbatches(0, rank, ws, 1)[0]
        loss_sum, n = token_loss(d.model(x), y)
        out[("held", sharding)] = d.memory_report()["unsharded_param_bytes"]
        loss_sum.backward()
        out[("rest", sharding)] = d.memory_report()["unsharded_param_bytes"]
    for sharding in ("shard_grad_op", "full"):  # odd-sized parameters
        d = DistributedOptimizer.wrap(Odd(), sharding, lr=LR)
        d.model(torch.randn(6, 97)).square().mean().backward()
        d.optimizer.step()
        out[("odd", sharding)] = d.memory_report()
    return out


@pytest.fixture(scope="module")
def reference():
    return reference_losses()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ws: f"ws{ws}")
def ranks(request):
    return request.param, launch(_train_cases, request.param, timeout=300)


@pytest.mark.slow
def test_every_mode_matches_single_process(ranks, reference):
    ws, results = ranks
    for case in CASES:
        sharding, k, precision, offload = case
        for r in results:
            losses = r[case]["losses"]
            if precision == "bf16":
                rel = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
                assert rel <= 2e-2, (ws, case, losses, reference)
            else:
                diff = max(abs(a - b) for a, b in zip(losses, reference))
                assert diff <= 1e-5, (ws, case, losses, reference)


def test_per_rank_bytes_are_one_nth(ranks):
    ws, results = ranks
    for r in results:
        full = r[("no_shard", 1, None, False)]["memory"]
        assert full["params"] == full["full_param_bytes"] and full["grads"] == full["full_param_bytes"]
        for sharding in ("shard_grad_op", "full"):
            m = r[(sharding, 1, None, False)]["memory"]
            for part in ("params", "grads", "optimizer_state", "total"):
                assert m[part] <= full[part] / ws * 1.01, (ws, sharding, part, m, full)
            assert m["n_params"] == full["n_params"]
        z = r[("zero1", 1, None, False)]["memory"]
        assert z["params"] == full["params"] and z["grads"] == full["grads"]
        # ZeroRedundancyOptimizer gives each rank whole tensors (largest first, to the least-loaded rank), so a
        # rank can exceed 1/N by up to one tensor's state: the 1% FSDP2 bound does not hold for a small model.
        largest = 8 * max(p.numel() for p in _gpt().parameters()) + 4
        assert z["optimizer_state"] <= full["optimizer_state"] / ws + largest, (ws, z, full)
    # every rank together holds the whole optimizer state exactly once (plus Adam's per-tensor step counters)
    per_rank = [r[("zero1", 1, None, False)]["memory"]["optimizer_state"] for r in results]
    full_state = results[0][("no_shard", 1, None, False)]["memory"]["optimizer_state"]
    assert sum(per_rank) == full_state


def test_odd_sized_parameters_shard_to_one_nth(ranks):
    ws, results = ranks
    psi = sum(p.numel() for p in Odd().parameters())
    for r in results:
        for sharding in ("shard_grad_op", "full"):
            m = r[("odd", sharding)]
            assert m["n_params"] == psi
            assert m["params"] <= 4 * psi / ws * 1.01 and m["grads"] <= 4 * psi / ws * 1.01, (ws, m)
            steps = 4 * len(list(Odd().parameters()))  # Adam's step counter: one fp32 scalar per tensor
            assert m["optimizer_state"] - steps <= 8 * psi / ws * 1.01, (ws, m)


def test_reshard_after_forward_is_what_separates_zero2_from_zero3(ranks):
    ws, results = ranks
    full_bytes = results[0][("no_shard", 1, None, False)]["memory"]["full_param_bytes"]
    m = _gpt()
    root_bytes = 4 * sum(p.numel() for mod in (m.tok_emb, m.pos_emb, m.ln_f) for p in mod.parameters())
    for r in results:
        assert r[("held", "shard_grad_op")] == full_bytes  # whole model gathered from forward to backward
        assert r[("held", "full")] == root_bytes            # only the root: embeddings, tied head, final norm
        assert r[("rest", "shard_grad_op")] == r[("rest", "full")] == 0


def _fqns_and_order_errors(rank, ws):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _gpt()
    apply_recompute(model, "selective")
    d = DistributedOptimizer.wrap(model, "full", lr=LR)
    x, y = _batches().microbatches(0, rank, ws, 1)[0]
    loss_sum, n = token_loss(d.model(x), y)
    (loss_sum / n).backward()
    d.optimizer.step()
    msd, osd = get_state_dict(d.model, d.optimizer)
    plain = _gpt()
    plain_msd, _ = get_state_dict(plain, torch.optim.AdamW(plain.parameters()))
    names = sorted(n for n, _ in d.model.named_parameters())
    try:
        Recompute(d.model.blocks[0])
        order_error = None
    except ValueError as e:
        order_error = str(e)
    return sorted(msd), sorted(plain_msd), names, sorted(osd["state"]), order_error


@pytest.mark.slow
def test_recompute_fsdp2_and_dcp_names_are_clean():
    msd, plain, names, opt_keys, order_error = launch(_fqns_and_order_errors, 2, timeout=300)[0]
    assert msd == plain
    assert names == sorted(n for n, _ in _gpt().named_parameters())
    assert opt_keys == names
    assert order_error and "before fully_shard" in order_error


def test_zero_formulas():
    assert zero_bytes_per_rank(100, 4, "no_shard", "mixed")["total"] == 1600
    assert zero_bytes_per_rank(100, 4, "zero1", "mixed")["total"] == 4 * 100 + 12 * 100 / 4
    assert zero_bytes_per_rank(100, 4, "shard_grad_op", "mixed")["total"] == 2 * 100 + 14 * 100 / 4
    assert zero_bytes_per_rank(100, 4, "full", "mixed")["total"] == 16 * 100 / 4
    assert zero_bytes_per_rank(100, 4, "zero1", "fp32")["total"] == 8 * 100 + 8 * 100 / 4


def test_bad_input_before_any_process_group():
    assert not dist.is_initialized()
    m = _gpt()
    with pytest.raises(ValueError, match="no_shard.*zero1.*shard_grad_op.*full"):
        DistributedOptimizer.wrap(m, "zero4")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        DistributedOptimizer.wrap(m, "full")
    with pytest.raises(ValueError, match="gradient scaler"):
        DistributedOptimizer.wrap(m, "full", mixed_precision="fp16")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        DistributedOptimizer.wrap(m, "full", mixed_precision="int8")
    with pytest.raises(ValueError, match="cpu_offload"):
        DistributedOptimizer.wrap(m, "zero1", cpu_offload=True)
    with pytest.raises(ValueError, match="set_modules_to_backward_prefetch"):
        DistributedOptimizer.wrap(m, "full", backward_prefetch="backward_post")
    with pytest.raises(ValueError, match="use_orig_params"):
        DistributedOptimizer.wrap(m, "full", use_orig_params=False)
    with pytest.raises(ValueError, match="parallel.sharding"):
        DistributedOptimizer.from_config({"sharding": "everything"}, m)
    d = DistributedOptimizer.wrap(m, "no_shard", lr=LR)  # one process: the plain model, plain AdamW
    assert d.model is m and type(d.optimizer) is torch.optim.AdamW


@pytest.mark.slow
def test_sharding_bench_rows_match_memory_report_and_formulas(capsys):
    from curry_train.bench.sharding import SHARDING_MODES, bench_sharding
    from curry_train.config import load_config

    cfg = load_config(["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
                       "train.batch_size=4", "train.seq_len=32", "bench.burn_in=1", "bench.repeats=2",
                       "data.max_bytes=20000"])
    out = bench_sharding(cfg, world_sizes=(2,))
    psi = out["n_params"]
    rows = {r["mode"]: r for r in out["rows"]["2"]}
    assert len(rows) == len(SHARDING_MODES)
    n_tensors = len(list(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)).parameters()))
    assert rows["no_shard"]["zero_fp32"] == 16 * psi
    assert rows["no_shard"]["total"] - 16 * psi == 4 * n_tensors  # + AdamW's fp32 step counter per tensor
    for mode in ("shard_grad_op", "full", "shard_grad_op bf16", "full bf16"):
        assert rows[mode]["ratio_to_ddp_over_n"] <= 1.01
    assert rows["full"]["zero_fp32"] == 16 * psi / 2 and rows["zero1"]["zero_mixed"] == 4 * psi + 12 * psi / 2
    assert rows["shard_grad_op"]["held_fwd_bwd"] == 4 * psi and rows["shard_grad_op bf16"]["held_fwd_bwd"] == 2 * psi
    printed = capsys.readouterr().out
    assert out["target_pass"] and "ZeRO-3" in printed
    timed = {r["mode"]: r for r in out["time_rows"]["2"]}  # every mode and lever, with its profiled split
    assert {"no_shard", "full (default levers)", "full no levers", "full no levers+reshard_last",
            "full no levers+prefetch=1", "full bf16 reduce bf16"} <= set(timed)
    default = timed["full (default levers)"]
    assert default["profile_ms"]["all-gather"] > 0 and timed["no_shard"]["profile_ms"]["all-gather"] == 0
    # 2 blocks: the default keeps 1 block per unit, prefetches 1 and keeps the last gathered: one block held
    block = default["held_fwd_bwd"] - timed["full no levers"]["held_fwd_bwd"]
    assert block > 0 and default["held_fwd_bwd"] == timed["full no levers+reshard_last"]["held_fwd_bwd"]
    table = printed[printed.index("step time vs DDP"):]
    assert table.index("  no_shard ") < table.index("  full (default levers) ") < table.index("  zero1 ")
    assert "target: default full (auto levers) <= 1.15x DDP at N=2" in printed and "of 2 rounds <= 1.15x" in printed
    q1, q3 = out["time_target"]["ratio_quartiles"]
    assert q1 <= out["time_target"]["ratio"] <= q3  # the median ratio lies between its rounds' quartiles


# -- step-time levers: prefetch, reshard_last, blocks_per_unit, reduce_dtype ------------------------------------
CFG4 = GPTConfig(n_layer=4, n_head=2, n_embd=32, block_size=32)
PLAIN = {"prefetch": 0, "reshard_last": False, "blocks_per_unit": 1}  # every lever off; None (the default) = auto
LEVER_CASES = [("full", None, PLAIN), ("full", None, PLAIN | {"prefetch": 1}), ("full", None, PLAIN | {"prefetch": 2}),
               ("full", None, PLAIN | {"reshard_last": True}), ("full", None, PLAIN | {"blocks_per_unit": 2}),
               ("full", None, {"blocks_per_unit": 2, "reshard_last": True, "prefetch": 1}),
               ("shard_grad_op", None, {"prefetch": 1, "blocks_per_unit": 3}),
               ("full", "bf16", {}), ("full", "bf16", {"reduce_dtype": "bf16"}), ("full", None, {})]


def _gpt4():
    torch.manual_seed(0)
    return GPT(CFG4)


def _fsdp_structure(model) -> dict:
    """What FSDP2 (torch 2.13) stores per block: the state (shared by a grouped unit), whether it reshards after
    forward (``post_forward_mesh_info`` set), its explicit prefetch targets as block indices, async unshard, and the
    mixed-precision reduce dtype."""
    from torch.distributed.fsdp import fully_shard

    states = [fully_shard.state(b) for b in model.blocks]
    index = {id(s): i for i, s in reversed(list(enumerate(states)))}  # a unit's state -> its first block
    return {"unit_of": [index[id(s)] for s in states],
            "reshards": [s._fsdp_param_groups[0].post_forward_mesh_info is not None for s in states],
            "fwd": [[index[id(t)] for t in s._states_to_forward_prefetch] for s in states],
            "bwd": [[index[id(t)] for t in s._states_to_backward_prefetch] for s in states],
            "async": [s._fsdp_param_groups[0].unshard_async_op for s in states],
            "reduce_dtype": str(states[0]._mp_policy.reduce_dtype)}


def _lever_cases(rank, ws):
    """One launch: for every LEVER_CASES entry the FSDP structure it leaves, the unsharded bytes held from
    forward to backward, and STEPS training losses; and one profiled step of DDP and of full, split."""
    from curry_train.bench.sharding import _profiled_step

    torch.set_num_threads(1)
    out, batches = {}, _batches()
    for i, (sharding, precision, levers) in enumerate(LEVER_CASES):
        d = DistributedOptimizer.wrap(_gpt4(), sharding, mixed_precision=precision, lr=LR, **levers)
        entry = {"structure": _fsdp_structure(d.model), "losses": []}
        for step in range(STEPS):
            x, y = batches.microbatches(step, rank, ws, 1)[0]
            d.optimizer.zero_grad()
            loss_sum, n = token_loss(d.model(x), y)
            if step == 0:
                entry["held"] = d.memory_report()["unsharded_param_bytes"]
            t = torch.tensor([float(n)])
            dist.all_reduce(t)
            (loss_sum * ws / t).backward()
            d.optimizer.step()
            s = torch.tensor([loss_sum.item()], dtype=torch.float64)
            dist.all_reduce(s)
            entry["losses"].append((s / t.double()).item())
        out[i] = entry
    for sharding in ("no_shard", "full"):
        d = DistributedOptimizer.wrap(_gpt4(), sharding, lr=LR)
        x, y = batches.microbatches(0, rank, ws, 1)[0]

        def step():
            loss_sum, n = token_loss(d.model(x), y)
            loss_sum.backward()
            d.optimizer.step()
        step()
        out[("profile", sharding)] = _profiled_step(step)
    levers = {"sharding": "full", "fsdp_prefetch": 1, "fsdp_reshard_last": True, "fsdp_blocks_per_unit": 2}
    out["from_config"] = _fsdp_structure(DistributedOptimizer.from_config(levers, _gpt4(), lr=LR).model)
    plain = {"sharding": "full"} | {f"fsdp_{k}": v for k, v in PLAIN.items()}
    out["from_config_plain"] = _fsdp_structure(DistributedOptimizer.from_config(plain, _gpt4(), lr=LR).model)
    return out


@pytest.fixture(scope="module")
def lever_ranks():
    return launch(_lever_cases, 2, timeout=300)


@pytest.mark.slow
def test_levers_are_applied_to_the_blocks_they_name(lever_ranks):
    s = [lever_ranks[0][i]["structure"] for i in range(len(LEVER_CASES))]
    assert s[0] == {"unit_of": [0, 1, 2, 3], "reshards": [True] * 4, "fwd": [[]] * 4, "bwd": [[]] * 4,
                    "async": [False] * 4, "reduce_dtype": "None"}
    assert s[1]["fwd"] == [[1], [2], [3], []] and s[1]["bwd"] == [[], [0], [1], [2]] and s[1]["async"] == [True] * 4
    assert s[2]["fwd"] == [[1, 2], [2, 3], [3], []] and s[2]["bwd"] == [[], [0], [1, 0], [2, 1]]
    assert s[3]["reshards"] == [True, True, True, False] and s[3]["fwd"] == [[]] * 4
    assert s[4]["unit_of"] == [0, 0, 2, 2] and s[4]["reshards"] == [True] * 4
    assert s[5]["unit_of"] == [0, 0, 2, 2] and s[5]["reshards"] == [True, True, False, False]
    assert s[5]["fwd"] == [[2], [2], [], []] and s[5]["bwd"] == [[], [], [0], [0]]
    assert s[6]["unit_of"] == [0, 0, 0, 3] and s[6]["reshards"] == [False] * 4 and s[6]["fwd"][0] == [3]
    assert s[7]["reduce_dtype"] == "torch.float32" and s[8]["reduce_dtype"] == "torch.bfloat16"
    assert lever_ranks[0]["from_config"] == s[5]  # parallel.fsdp_* keys reach wrap (parallelize uses from_config)
    assert lever_ranks[0]["from_config_plain"] == s[0]
    assert s[9] == s[5]  # the default (auto) on 4 blocks: 2 blocks per unit, the last kept, prefetch 1


def test_levers_hold_what_they_say_between_forward_and_backward(lever_ranks):
    m = _gpt4()
    root = 4 * sum(p.numel() for mod in (m.tok_emb, m.pos_emb, m.ln_f) for p in mod.parameters())
    block = 4 * sum(p.numel() for p in m.blocks[0].parameters())
    held = [lever_ranks[0][i]["held"] for i in range(len(LEVER_CASES))]
    assert held[0] == held[1] == held[4] == root          # every block resharded after its forward
    assert held[3] == root + block and held[5] == held[9] == root + 2 * block  # the last unit kept gathered
    assert held[6] == root + 4 * block                    # shard_grad_op keeps everything


def test_levers_train_exactly_like_without(lever_ranks):
    """Levers change when and how much is gathered, never the arithmetic: fp32 losses equal the plain full run
    within 1e-6; a bf16 reduce-scatter rounds the summed gradient once more: within 2% of the fp32 reduce."""
    for r in lever_ranks:
        base, base16 = r[0]["losses"], r[7]["losses"]
        for i, (_, precision, _) in enumerate(LEVER_CASES):
            if precision is None:
                assert max(abs(a - b) for a, b in zip(r[i]["losses"], base)) <= 1e-6, (LEVER_CASES[i], r[i], base)
        assert max(abs(a - b) / b for a, b in zip(r[8]["losses"], base16)) <= 2e-2


def test_profile_split_on_a_real_step(lever_ranks):
    ddp, full = lever_ranks[0][("profile", "no_shard")], lever_ranks[0][("profile", "full")]
    assert ddp["all-reduce"] > 0 and ddp["all-gather"] == ddp["reduce-scatter"] == 0
    assert full["all-gather"] > 0 and full["reduce-scatter"] > 0  # gloo runs FSDP2's reduce-scatter as all_reduce
    for p in (ddp, full):
        assert 0 < p["compute"] <= p["step"] and p["n_collectives"] > 0
    assert ddp["copies"] == 0 < full["copies"] < full["compute"] and 0 < full["optimizer"] < full["compute"]


def test_profile_split_classifies_by_the_issuing_op():
    from curry_train.bench.sharding import collective_kind, profile_split

    events = [("c10d::_allgather_base_", 0, 1), ("gloo:all_gather", 1, 4), ("aten::mm", 4, 10),
              ("c10d::_reduce_scatter_base_", 10, 11), ("gloo:all_reduce", 11, 13),
              ("c10d::allreduce_", 13, 14), ("gloo:all_reduce", 14, 20), ("aten::mm", 14, 18),
              ("gloo:broadcast", 25, 30), ("fsdp::chunk_cat", 8, 10),  # the broadcast is outside the step
              ("Optimizer.step#AdamW.step", 20, 24)]  # clipped to the step: 2
    split = profile_split(events, (0, 22))
    assert split == {"all-gather": 3, "reduce-scatter": 2, "all-reduce": 6, "other": 0, "step": 22,
                     "compute": 22 - 3 - 2 - 6, "copies": 2, "optimizer": 2, "n_collectives": 3}
    assert collective_kind("nccl:reduce_scatter") == "reduce-scatter" and collective_kind("gloo:broadcast") == "other"


@pytest.mark.parametrize("kwargs, match", [
    ({"prefetch": -1}, r"^prefetch must be an int >= 0 or None \(auto\), got -1$"),
    ({"prefetch": True}, r"^prefetch must be an int >= 0"),
    ({"prefetch": 4, "blocks_per_unit": 1}, r"^prefetch=4 exceeds the 3 FSDP units"),
    ({"prefetch": 2}, r"^prefetch=2 exceeds the 1 FSDP units that can follow one \(4 blocks, blocks_per_unit=2 "
                      r"\(auto\)\): use 0..1$"),
    ({"prefetch": 2, "blocks_per_unit": 2}, r"^prefetch=2 exceeds the 1 FSDP units"),
    ({"blocks_per_unit": 0}, r"^blocks_per_unit must be an int >= 1"),
    ({"blocks_per_unit": 5}, r"^blocks_per_unit=5 exceeds the model's 4 blocks$"),
    ({"reshard_last": "yes"}, r"^reshard_last must be true, false or None \(auto\)"),
    ({"sharding": "shard_grad_op", "reshard_last": True}, r"^reshard_last=True .* sharding='full'"),
    ({"reshard_last": True, "reshard_after_forward": False}, r"^reshard_last=True"),
    ({"reduce_dtype": "fp16"}, r"^reduce_dtype must be one of"),
    ({"reduce_dtype": "bf16"}, r"^reduce_dtype='bf16' needs mixed_precision='bf16'"),
    ({"sharding": "no_shard", "prefetch": 1}, r"^prefetch=1 applies to FSDP2 shardings"),
    ({"sharding": "zero1", "blocks_per_unit": 2}, r"^blocks_per_unit=2 applies to FSDP2"),
    ({"sharding": "no_shard", "reduce_dtype": "fp32"}, r"^reduce_dtype applies to FSDP2"),
])
def test_bad_lever_values_fail_in_one_process(kwargs, match):
    assert not dist.is_initialized()
    kwargs = {"sharding": "full", **kwargs}
    with pytest.raises(ValueError, match=match):
        DistributedOptimizer.wrap(_gpt4(), lr=LR, **kwargs)


def test_sharding_bench_refuses_what_the_machine_cannot_run(monkeypatch):
    from curry_train.bench import machine, sharding

    monkeypatch.setattr(machine, "available_bytes", lambda backend: [80 * 2**30] * 2)
    with pytest.raises(ValueError, match=r"^bench.world_sizes: N=4 needs 4 GPUs \(one rank per GPU\), this machine "
                                         r"has 2; use N <= 2$"):
        sharding.check_limits(10**6, [2, 4], "nccl", "small")
    monkeypatch.setattr(machine, "available_bytes", lambda backend: [2**30])
    psi = 10**8
    need = sharding.state_bytes_needed(psi, 2)
    assert need >= 4 * psi + 16 * psi + 16 * psi / 2  # the source model, DDP, and at least one ZeRO-3 side
    with pytest.raises(ValueError, match=r"^model=big: bench sharding keeps 12 trained copies .* at N=2, more than "
                                         r"the 1.0 GiB available"):
        sharding.check_limits(psi, [2], "gloo", "big")
    with pytest.raises(ValueError, match=r"^model=tiny: .* for 2 CPU ranks at N=2"):  # the processes' own memory
        sharding.check_limits(10**5, [2, 4], "gloo", "tiny")
    monkeypatch.setattr(machine, "available_bytes", lambda backend: [8 * 2**30])
    sharding.check_limits(10**5, [2, 4], "gloo", "tiny")  # fits: no error
    with pytest.raises(ValueError, match=r"^bench.world_sizes: N=32 spawns 32 CPU ranks of at least 0.5 GiB each "
                                         r"\(16.0 GiB\), 8.0 GiB available; use N <= 16$"):
        machine.check_world_sizes([2, 32], "gloo")


@pytest.mark.parametrize("overrides, match", [
    (["parallel.fsdp_prefetch=-1"], r"^parallel.fsdp_prefetch must be an int >= 0 or None \(auto\), got -1$"),
    (["parallel.fsdp_prefetch=1"], r"^parallel.fsdp_prefetch=1 applies to FSDP2 shardings"),
    (["parallel.sharding=full", "parallel.fsdp_prefetch=4", "parallel.fsdp_blocks_per_unit=1"],
     r"^parallel.fsdp_prefetch=4 exceeds the 3 FSDP units"),
    (["parallel.sharding=full", "parallel.fsdp_prefetch=2"], r"^parallel.fsdp_prefetch=2 exceeds the 1 FSDP units "
                                                             r".*parallel.fsdp_blocks_per_unit=2 \(auto\)"),
    (["parallel.sharding=full", "parallel.fsdp_blocks_per_unit=5"], r"^parallel.fsdp_blocks_per_unit=5 exceeds the "
                                                                    r"model's 4 blocks$"),
    (["parallel.sharding=shard_grad_op", "parallel.fsdp_reshard_last=true"], r"^parallel.fsdp_reshard_last=True"),
])
def test_lever_config_keys_are_validated_before_launch(overrides, match):
    from curry_train.config import load_config, validate

    with pytest.raises(ValueError, match=match):
        validate(load_config(overrides), world_size=2)
    validate(load_config(["parallel.sharding=full", "parallel.fsdp_prefetch=1", "parallel.fsdp_reshard_last=true",
                          "parallel.fsdp_blocks_per_unit=2"]), world_size=2)
