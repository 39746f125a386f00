"""Training end to end: smoke run, Hydra overrides, bad input before any process group, DDP == one process."""

import subprocess
import sys

import pytest

from curry_train.config import load_config, validate
from curry_train.data import load_tokens, stdlib_files
from curry_train.distributed import launch
from curry_train.train import train

SMALL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "train.seq_len=64", "train.progress=false", "train.log_every=0"]


def test_embedded_corpus_is_the_stdlib_source():
    files = stdlib_files()
    names = [f.name for f in files]
    assert "os.py" in names and "functools.py" in names
    assert not any("site-packages" in f.parts for f in files)
    tokens = load_tokens(None, max_bytes=200_000)
    assert tokens.numel() == 200_000 and tokens.dtype.is_floating_point is False
    assert b"def " in bytes(tokens[:200_000].tolist())


@pytest.mark.slow
def test_30_step_training_loss_falls():
    history = train(load_config(["train.steps=30", "train.warmup_steps=5", *SMALL]))
    assert len(history) == 30
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert first > 5.0  # ~ln(256) at init
    assert last < first - 1.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(h["tokens_per_s"] > 0 and h["grad_norm"] > 0 for h in history)


def test_user_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("hello curry train\n" * 500)
    history = train(load_config([f"data.path={text}", "train.steps=6", "train.warmup_steps=1", *SMALL]))
    assert [h["step"] for h in history] == list(range(6))
    assert all({"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(h) for h in history)
    assert all(h["tokens"] == 16 * 64 for h in history)  # train.batch_size x train.seq_len, no padding
    assert history[0]["lr"] > history[-1]["lr"] > 0  # cosine decay after one warm-up step
    # 17 distinct bytes repeating: far easier than the stdlib source, so the loss falls fast from ~ln(256)
    assert history[0]["loss"] > 5.0 and history[-1]["loss"] < history[0]["loss"] - 1.0


def test_hydra_overrides_and_model_group():
    cfg = load_config(["model=small", "train.lr=1e-3", "train.gradient_accumulation_steps=4"])
    assert cfg.model.name == "small" and cfg.model.n_embd == 384
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.gradient_accumulation_steps == 4


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match=r"^model=nope is not a model preset; choose from moe, small, tiny \(or your own: model._target_="):
        load_config(["model=nope"])


@pytest.mark.parametrize("override", ["train.step=5", "+train.step=5"])
def test_unknown_key_is_one_line_naming_it(override):
    with pytest.raises(ValueError, match=r"^train.step is not a config key \(did you mean train.steps\?\); train.\* keys: steps, "):
        load_config([override])


@pytest.mark.parametrize(
    "override,world_size,message",
    [
        ("train.gradient_accumulation_steps=0", 1, r"gradient_accumulation_steps must be a positive integer"),
        ("train.gradient_accumulation_steps=-2", 1, r"gradient_accumulation_steps must be a positive integer"),
        ("train.gradient_accumulation_steps=1.5", 1, r"train.gradient_accumulation_steps must be an integer, got '1.5'"),
        ("data.path=/nonexistent/corpus.txt", 1, r"data.path='/nonexistent/corpus.txt'"),
        ("train.batch_size=15", 2, r"train.batch_size=15 is not divisible by the data-parallel world size 2"),
        ("train.gradient_accumulation_steps=3", 1, r"16 rows per rank, not divisible by train.gradient_accumulation_steps=3"),
    ],
)
def test_bad_input_is_rejected_before_any_process_group(override, world_size, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate(load_config([override]), world_size)


@pytest.mark.slow
def test_cli_help_and_bad_input_exit_nonzero():
    out = subprocess.run([sys.executable, "-m", "curry_train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "bench" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "curry_train", "train", "train.gradient_accumulation_steps=0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "gradient_accumulation_steps must be a positive integer" in bad.stderr


def test_bench_help_describes_every_bench(capsys):
    from curry_train.__main__ import main
    from curry_train.bench import BENCH_HELP, BENCHES

    assert list(BENCH_HELP) == list(BENCHES)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    for name, description in BENCH_HELP.items():
        assert f"{name} {description}" in text


DP_RUN = ["train.steps=4", "train.batch_size=8", "train.gradient_accumulation_steps=2", "data.variable_length=true", *SMALL]


def _dp_train(rank, world_size, overrides):
    return [h["loss"] for h in train(load_config(overrides))]


@pytest.mark.slow
def test_ddp_world_size_2_losses_match_single_process():
    single = [h["loss"] for h in train(load_config(DP_RUN))]
    ranks = launch(_dp_train, 2, DP_RUN, timeout=300)
    for losses in ranks:
        assert losses == pytest.approx(single, abs=1e-5)


@pytest.mark.parametrize(
    "overrides,world_size,message",
    [
        (["parallel.sharding=zero9"], 2, r"parallel.sharding must be one of"),
        (["parallel.sharding=full"], 1, r"launch with `torchrun"),
        (["train.recompute=sometimes"], 1, r"train.recompute must be false, true"),
        (["parallel.pp=2", "parallel.n_microbatches=1"], 2, r"n_microbatches=1 < 2 stages"),
        (["parallel.pp=3"], 4, r"world size 4 is not divisible by parallel.pp\*cp\*tp = 3\*1\*1"),
    ],
)
def test_parallel_config_errors_come_from_validate(overrides, world_size, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(overrides), world_size)
