"""`python -m curry_train plan`: its numbers against the ZeRO paper, the pipeline simulator and our own measurements."""

import json

import pytest
import torch

from curry_train.__main__ import main
from curry_train.model import GPT, GPTConfig
from curry_train.plan import Hardware, Layout, Shape, activation_bytes, estimate, plan
from curry_train.primitives.pipeline.sim import simulate
from curry_train.primitives.recompute import activation_memory, apply_recompute


def test_the_zero_paper_example_is_reproduced(capsys):
    """7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12): 120, 31.4, 16.6 and 1.9 GB per GPU."""
    assert main(["plan", "--params", "7.5e9", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    for row in ("| DDP | 15.0 GB | 15.0 GB | 90.0 GB | 120.0 GB |", "| ZeRO-1 | 15.0 GB | 15.0 GB | 1.4 GB | 31.4 GB |",
                "| ZeRO-2 | 15.0 GB | 0.2 GB | 1.4 GB | 16.6 GB |", "| ZeRO-3 / FSDP | 0.2 GB | 0.2 GB | 1.4 GB | 1.9 GB |"):
        assert row in out
    assert "Recommended: #1" in out and "torchrun --nnodes 8 --nproc-per-node 8 -m curry_train train" in out


def test_json_and_every_estimate_consistent(capsys):
    assert main(["plan", "--layers", "32", "--hidden", "4096", "--heads", "32", "--gpus", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for e in data["estimates"]:
        L = e["layout"]
        assert L["dp"] * L["tp"] * L["pp"] * L["cp"] == 16
        assert e["total_bytes"] == pytest.approx(e["states_bytes"]["total"] + e["activation_bytes"])
        assert f"parallel.tp={L['tp']}" in e["command"]


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4)])
def test_the_bubble_is_the_simulators(p, m):
    shape = Shape(1e9, 16, 2048, 16, seq=2048)
    layout = Layout(dp=2, tp=1, pp=p, cp=1, sharding="no_shard", recompute="none", micro_batch=1)
    e = estimate(shape, Hardware(gpus=2 * p), layout, global_batch_tokens=2 * m * 2048)
    assert e.microbatches == m and e.bubble == simulate("1f1b", p, m).bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
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
