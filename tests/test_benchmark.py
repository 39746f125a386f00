"""The code behind the numbers in skills/primitive-gradient-accumulation: bench ga and bench loop."""

import json

import pytest

from curry_train.__main__ import main
from curry_train.bench.common import run_accumulated_step
from curry_train.bench.ga import bench_ga_parity
from curry_train.bench.loop import bench_loop
from curry_train.config import load_config
from curry_train.data import Batches
from curry_train.model import GPT, GPTConfig
from curry_train.primitives import GradientAccumulation

FAST = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=8"]


def test_ga_parity_bench_separates_the_two_normalisations():
    rows = {(r["batch"], r["normalization"]): r for r in bench_ga_parity(load_config(FAST))["rows"]}
    for key in [("fixed-length", "tokens"), ("fixed-length", "microbatches"), ("padded", "tokens")]:
        assert rows[key]["grad_rel_err"] < 1e-5, key
    assert rows[("padded", "microbatches")]["grad_rel_err"] > 1e-3
    assert all(r["loss_diff"] < 1e-5 for r in rows.values())


def test_loop_bench_measures_both_sides():
    result = bench_loop(load_config([*FAST, "bench.repeats=2", "bench.steps_per_repeat=1", "bench.burn_in=1"]))
    assert set(result["tokens_per_s"]) == {"curry_train", "plain"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert len(result["round_ratios"]) == 2 and result["ratio"] > 0


def test_run_accumulated_step_returns_the_mean_token_loss():
    import torch

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.arange(4000).remainder(256).to(torch.uint8)
    micro = Batches(tokens, 8, 32).microbatches(0, n_micro=4)
    loss = run_accumulated_step(model, opt, micro, GradientAccumulation(4))
    assert 4.0 < loss < 7.0  # ~ln(256) for an untrained byte model


def test_bench_cli_writes_json(tmp_path, capsys):
    rc = main(["bench", "ga", *FAST, f"bench.out_dir={tmp_path}"])
    assert rc == 0
    data = json.loads((tmp_path / "ga.json").read_text())
    assert data["k"] == 4 and len(data["rows"]) == 4
    assert "GA parity" in capsys.readouterr().out


def test_unknown_bench_is_an_error():
    with pytest.raises(SystemExit):
        main(["bench", "nope"])
