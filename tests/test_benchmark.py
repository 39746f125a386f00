"""The code behind the numbers in skills/primitive-gradient-accumulation: bench ga and bench loop."""

import json
import statistics

import pytest

from curry_train.__main__ import main
from curry_train.bench.common import interleaved_rounds, median_ratio, quartiles, run_accumulated_step
from curry_train.bench.ga import bench_ga_parity
from curry_train.bench.loop import bench_loop
from curry_train.config import load_config
from curry_train.data import Batches
from curry_train.model import GPT, GPTConfig
from curry_train.primitives import GradientAccumulation

FAST = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=8"]


@pytest.mark.slow
def test_ga_parity_bench_separates_the_two_normalisations():
    result = bench_ga_parity(load_config(FAST))
    rows = {(r["batch"], r["normalization"]): r for r in result["rows"]}
    assert result["k"] == 4 and len(rows) == 4
    # token normalisation reproduces the K=1 gradient on both batches (float rounding only)
    assert rows[("fixed-length", "tokens")]["grad_rel_err"] < 1e-5
    assert rows[("padded", "tokens")]["grad_rel_err"] < 1e-5
    # mean/K matches only when every micro-batch holds as many valid tokens (fixed-length rows) ...
    assert rows[("fixed-length", "microbatches")]["grad_rel_err"] < 1e-5
    # ... and weights short micro-batches up on padded rows: an error orders of magnitude above rounding
    padded_mean_k = rows[("padded", "microbatches")]["grad_rel_err"]
    assert padded_mean_k > 1e-3 and padded_mean_k > 1000 * rows[("padded", "tokens")]["grad_rel_err"]
    assert all(r["loss_diff"] < 1e-5 for r in rows.values())  # the summed-token loss does not depend on K


@pytest.mark.slow
def test_loop_bench_ratio_is_plain_time_over_curry_train_time():
    b = {"bench.repeats": 3, "bench.steps_per_repeat": 1, "bench.burn_in": 1}
    result = bench_loop(load_config([*FAST, *(f"{k}={v}" for k, v in b.items())]))
    seconds = result["round_seconds"]
    assert set(seconds) == set(result["tokens_per_s"]) == {"curry_train", "plain"}
    assert all(len(s) == 3 and min(s) > 0 for s in seconds.values())
    tokens = 3 * 1 * 8 * 32  # repeats x steps_per_repeat x train.batch_size x train.seq_len
    for side, tps in result["tokens_per_s"].items():
        assert tps == pytest.approx(tokens / sum(seconds[side]))
    ratios = [p / c for p, c in zip(seconds["plain"], seconds["curry_train"])]
    assert result["round_ratios"] == pytest.approx(ratios)
    assert result["ratio"] == pytest.approx(statistics.median(ratios))
    # the overall tokens/s ratio is a time-weighted mean of the per-round ratios
    overall = result["tokens_per_s"]["curry_train"] / result["tokens_per_s"]["plain"]
    assert min(ratios) * (1 - 1e-9) <= overall <= max(ratios) * (1 + 1e-9)
    assert result["target"] == 0.98


def test_interleaved_rounds_alternate_the_order_and_ratios_take_the_median():
    calls = []
    seconds = interleaved_rounds(lambda name: calls.append(name) or float(len(calls)), ["a", "b", "c"], 3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert seconds == {"a": [1.0, 6.0, 7.0], "b": [2.0, 5.0, 8.0], "c": [3.0, 4.0, 9.0]}
    assert median_ratio([1.0, 10.0, 3.0], [1.0, 2.0, 1.0]) == 3.0  # median of 1, 5, 3
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0) and quartiles([7.0]) == (7.0, 7.0)


def test_run_accumulated_step_returns_the_mean_token_loss():
    import torch

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.arange(4000).remainder(256).to(torch.uint8)
    micro = Batches(tokens, 8, 32).microbatches(0, n_micro=4)
    loss = run_accumulated_step(model, opt, micro, GradientAccumulation(4))
    assert 4.0 < loss < 7.0  # ~ln(256) for an untrained byte model


@pytest.mark.slow
def test_bench_cli_writes_json(tmp_path, capsys):
    rc = main(["bench", "ga", *FAST, f"bench.out_dir={tmp_path}"])
    assert rc == 0
    (run,) = tmp_path.iterdir()  # one new folder per run: bench-results/<timestamp>/report.json
    data = json.loads((run / "report.json").read_text())["results"]["ga"]
    assert data["k"] == 4 and len(data["rows"]) == 4
    assert "GA parity" in capsys.readouterr().out


def test_unknown_bench_is_an_error(capsys):
    assert main(["bench", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown bench nope; choose from loop, ga")
