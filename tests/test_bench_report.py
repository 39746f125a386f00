"""``bench`` as a report: a new run folder per run with report.md, report.json and PNGs; the mfu section's FLOP count
against the reference GPT's formula; rank counts from the machine; bad input."""

import json
import struct

import pytest
import torch

from curry_train.__main__ import main
from curry_train.bench import BENCHES, QUICK, bench_kwargs, machine
from curry_train.bench.mfu import ATTENTION_OPS, attention_flops, count_flops, formula_flops
from curry_train.bench.report import new_run_dir
from curry_train.config import load_config
from curry_train.model import GPT, GPTConfig
from curry_train.primitives.model_io import forward_loss_sum

SMALL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    """A PNG matplotlib wrote: the signature, an IHDR of a real size, and not one flat colour."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and float(pixels.std()) > 0.01  # something was drawn


@pytest.mark.slow
def test_quick_bench_writes_a_new_report_folder_per_run(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["bench", "--quick", "mfu", "ga", "recompute", *SMALL, f"bench.out_dir={out}"]
    assert main(argv) == 0
    (run,) = sorted(out.iterdir())
    assert {p.name for p in run.iterdir()} == {"report.md", "report.json", "mfu.png", "recompute.png"}
    for png in ("mfu.png", "recompute.png"):
        _check_png(run / png)

    report = json.loads((run / "report.json").read_text())
    meta, results = report["meta"], report["results"]
    assert list(results) == ["mfu", "ga", "recompute"] and meta["quick"] is True
    assert meta["command"] == "python -m curry_train " + " ".join(argv)
    assert meta["machine"]["torch"] == torch.__version__ and meta["machine"]["device"] == "cpu"
    assert meta["config"]["train"]["batch_size"] == 8  # --quick's override, under the user's own
    mfu = results["mfu"]
    assert mfu["formula_check"] is True and mfu["flops_per_step"] == mfu["flops_formula_matmul_only"] > 0
    assert {r["loop"] for r in mfu["rows"]} == {"curry_train", "plain"}
    assert all(0 < r["mfu"] and r["tokens_per_s"] > 0 for r in mfu["rows"])
    assert len(mfu["round_seconds"]["plain"]) == QUICK["benches"]["mfu"]["repeats"]
    assert all(r["peak_bytes"] is None for r in results["recompute"]["rows"])  # --quick skips the slow peak

    md = (run / "report.md").read_text()
    for text in ("## Machine", "## mfu", "## ga", "## recompute", "## Config", f"torch {torch.__version__}",
                 "![mfu: mfu.png](mfu.png)", "| formula_check | yes |", "| loop | step_ms | tokens_per_s |",
                 "GA parity on", "n_layer: 2"):
        assert text in md, text

    assert main(["bench", "ga", *SMALL, "train.batch_size=8", "train.seq_len=32", f"bench.out_dir={out}"]) == 0
    first, second = sorted(out.iterdir())
    assert first == run and (first / "report.md").read_text() == md  # the earlier run is untouched
    assert list(json.loads((second / "report.json").read_text())["results"]) == ["ga"]
    assert "## ga" in (second / "report.md").read_text() and "## mfu" not in (second / "report.md").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("cfg", [GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16),
                                 GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, tie_embeddings=False)])
def test_flop_count_is_the_gpt_formula_without_its_vector_parameters(cfg):
    """FlopCounterMode counts matmuls (6 FLOPs per weight per token) and, through ATTENTION_OPS, causal SDPA as
    6·L·d·T per token: GPT.flops_per_token minus 6 per 1-D parameter (biases, LayerNorm) per token, exactly."""
    torch.manual_seed(0)
    model = GPT(cfg)
    b, t = 3, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (b, t))
    counted = count_flops(model, (x, torch.roll(x, -1, 1)), forward_loss_sum)
    tokens = b * t
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert counted["total"] == model.flops_per_token(t) * tokens - 6 * vectors * tokens
    assert formula_flops(model, t, tokens)["matmul_only"] == counted["total"]
    attention = sum(f for op, f in counted["by_op"].items() if op in ATTENTION_OPS)
    assert attention == 6 * cfg.n_layer * cfg.n_embd * t * tokens  # the formula's causal attention term
    assert all(p.grad is None for p in model.parameters())


def test_attention_flops_counts_qk_and_av_halved_when_causal():
    q, kv = (2, 8, 16, 32), (2, 2, 16, 32)  # grouped K/V heads broadcast to the query's 8
    assert attention_flops(q, kv, kv, is_causal=False, backward=False) == 2 * 2 * 8 * 16 * 16 * 64
    assert attention_flops(q, kv, kv, is_causal=True, backward=True) == 2 * 2 * 8 * 16 * 16 * 64
    assert attention_flops(q, (2, 8, 24, 32), (2, 8, 24, 16), False, False) == 2 * 2 * 8 * 16 * 24 * 48


def test_rank_counts_come_from_the_machine(monkeypatch):
    cfg = load_config([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cores, sizes in ((1, [2]), (2, [2]), (3, [2]), (4, [2, 4]), (64, [2, 4])):
        monkeypatch.setattr(machine, "cpu_cores", lambda c=cores: c)
        assert machine.world_sizes(cfg) == sizes and machine.rank_backend(cfg) == "gloo"
    assert bench_kwargs(cfg, "sharding")["world_sizes"] == (2, 4)
    assert bench_kwargs(cfg, "pipeline", quick=True)["pp_sizes"] == (2, 4) and \
        bench_kwargs(cfg, "pipeline", quick=True)["kinds"] == QUICK["benches"]["pipeline"]["kinds"]
    given = load_config(["bench.world_sizes=[2,8]"])
    assert machine.world_sizes(given, "pipeline") == [2, 8]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(machine, "bench_device", lambda cfg: torch.device("cuda", 0))
    assert machine.rank_backend(cfg) == "nccl" and machine.world_sizes(cfg) == [2, 4, 8]
    assert machine.rank_backend(cfg, "pipeline") == "gloo"  # host-timed timelines: always CPU ranks


def test_run_folders_never_collide(tmp_path, monkeypatch):
    import curry_train.bench.report as report

    monkeypatch.setattr(report.time, "strftime", lambda fmt: "20260101-000000")
    names = [new_run_dir(tmp_path).name for _ in range(3)]
    assert names == ["20260101-000000", "20260101-000000-2", "20260101-000000-3"]


@pytest.mark.parametrize("argv,message", [
    (["bench", "mfu", "nope"], f"error: unknown bench nope; choose from {', '.join(BENCHES)}"),
    (["bench", "bench.world_sizes=[1]"], "error: bench.world_sizes must be a non-empty list of integers >= 2"),
    # more CPU ranks than memory holds, a pipeline size no schedule can split the blocks over, a model too large for
    # this machine (built on the meta device for the count): refused before any rank starts
    (["bench", "sharding", "bench.world_sizes=[100000]"], "error: bench.world_sizes: N=100000 spawns 100000 CPU "
                                                          "ranks of at least 0.5 GiB each"),
    (["bench", "pipeline", "bench.world_sizes=[16]"], "error: bench.world_sizes: p=16 runs no pipeline schedule with "
                                                      "8 blocks and m=8 micro-batches (each stage needs whole blocks); "
                                                      "p that run: 2, 4, 8"),
    (["bench", "sharding", "model.n_embd=16384", "model.n_head=16", "model.n_layer=48"],
     "error: model=tiny GPT: bench sharding keeps 12 trained copies (154,635,370,496 parameters)"),
])
def test_bad_bench_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(message), err
