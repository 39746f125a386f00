"""``train()`` with ``parallel.pp=2`` (and dp=2 x pp=2): the same losses as one process, through the same loop
functions; pipeline config errors are raised before any send."""

import inspect

import pytest

from curry_train import loop
from curry_train.config import load_config, pipeline_settings
from curry_train.distributed import launch
from curry_train.train import train

SMALL = ["model.n_layer=4", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=8",
         "train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.log_every=0"]
RUNS = {
    "1f1b": [*SMALL, "parallel.pp_schedule=1f1b", "parallel.n_microbatches=4"],
    # two stages per rank, gradient accumulation over padded rows, recompute: every token counted once
    "interleaved+ga+padding+recompute": [*SMALL, "parallel.pp_schedule=interleaved", "parallel.n_microbatches=2",
                                         "train.gradient_accumulation_steps=2", "data.variable_length=true",
                                         "train.recompute=true", "train.grad_clip=0.05"],
}


def _loss_and_norm(history):
    return [h["loss"] for h in history], [h["grad_norm"] for h in history]


def _train_pipelined(rank, world_size, runs):
    return {name: _loss_and_norm(train(load_config([*overrides, f"parallel.pp={world_size}"])))
            for name, overrides in runs.items()}


@pytest.mark.slow
def test_pp2_training_losses_and_grad_norms_match_single_process():
    ranks = launch(_train_pipelined, 2, RUNS, timeout=300)
    for name, overrides in RUNS.items():
        losses, norms = _loss_and_norm(train(load_config(overrides)))
        for rank_result in ranks:
            assert rank_result[name][0] == pytest.approx(losses, abs=1e-5), name
            assert rank_result[name][1] == pytest.approx(norms, rel=1e-4), f"{name}: the logged norm is the global one"


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pp_schedule=1f1b", "parallel.n_microbatches=1"], r"n_microbatches=1 < 2 stages"),
    (["parallel.pp_schedule=dualpipev", "parallel.n_microbatches=2"], r"dualpipev.*n_microbatches=2 < 4 stages"),
    (["parallel.pp_schedule=zigzag"], r"unknown pipeline schedule kind 'zigzag'; choose from gpipe, 1f1b"),
    (["parallel.pp_schedule=gpipe", "parallel.n_microbatches=3"], r"8 rows per pipeline step, not divisible by parallel.n_microbatches=3"),
    (["parallel.pp_schedule=interleaved", "model.n_layer=6"], r"model.n_layer=6 is not divisible by the number of pipeline stages 4"),
])
def test_pipeline_config_errors_name_the_numbers(overrides, message):
    cfg = load_config([*SMALL, "parallel.pp=2", *overrides])
    with pytest.raises(ValueError, match=message):
        pipeline_settings(cfg, 2)


@pytest.mark.parametrize("sharding", ["no_shard", "zero1"])
def test_plain_bf16_stages_compute_under_autocast_and_keep_fp32_weights(sharding):
    """``parallel.mixed_precision=bf16`` with plain (unwrapped) stages is DDP's bf16: the stage's forward under
    autocast (its matmuls in bf16: the last stage's logits), fp32 parameters and gradients. Parity:
    tests/test_compose.py."""
    import torch

    from curry_train.model import GPT, GPTConfig
    from curry_train.parallelize import parallelize
    from curry_train.stages import split_model

    cfg = load_config([*SMALL, "parallel.pp=2", f"parallel.sharding={sharding}", "parallel.mixed_precision=bf16"])
    pipeline_settings(cfg, 4, dp_size=2)
    first, last = split_model(GPT(GPTConfig.from_config(cfg.model)), 2)
    for stage in (first, last):
        assert parallelize(stage, cfg, pipeline_stage=True) == (stage, None)
    logits = last(first(torch.randint(0, 256, (2, 32))))
    logits.float().sum().backward()
    assert logits.dtype == torch.bfloat16
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in [*first.parameters(), *last.parameters()])


def _train_dp_pp(rank, world_size, overrides):
    return [h["loss"] for h in train(load_config([*overrides, "parallel.pp=2"]))]


@pytest.mark.slow
def test_dp2_x_pp2_training_losses_match_single_process():
    """World size 4 = 2 data-parallel replicas of a 2-stage pipeline (groups from ParallelState)."""
    overrides = [*SMALL, "parallel.pp_schedule=1f1b", "parallel.n_microbatches=2", "data.variable_length=true",
                 "train.gradient_accumulation_steps=2"]
    single = [h["loss"] for h in train(load_config(overrides))]
    for rank_losses in launch(_train_dp_pp, 4, overrides, timeout=300):
        assert rank_losses == pytest.approx(single, abs=1e-5)


def _spy_on_the_step(patch) -> list[tuple]:
    """Record every call of the loop's forward/backward and grad-norm functions: (function, pipelined?)."""
    calls = []
    for name, pp_argument in (("accumulate_gradients", "schedule"), ("clip_grad_norm", "pp_group")):
        def spy(*args, _fn=getattr(loop, name), _name=name, _arg=pp_argument, **kwargs):
            bound = inspect.signature(_fn).bind(*args, **kwargs)
            calls.append((_name, bound.arguments.get(_arg) is not None))
            return _fn(*args, **kwargs)
        patch(loop, name, spy)
    return calls


def _train_pp_with_spies(rank, world_size, overrides):
    calls = _spy_on_the_step(setattr)
    history = train(load_config([*overrides, f"parallel.pp={world_size}"]))
    return calls, [h["grad_norm"] for h in history]


@pytest.mark.slow
def test_pipeline_and_plain_runs_take_one_step_function_and_one_grad_norm(monkeypatch):
    """The pp=2 run calls the plain run's accumulate_gradients and clip_grad_norm (with its schedule and pp group),
    and logs the single process's grad norm to 1e-5."""
    overrides = RUNS["1f1b"]
    calls = _spy_on_the_step(monkeypatch.setattr)
    single = [h["grad_norm"] for h in train(load_config(overrides))]
    step = [("accumulate_gradients", False), ("clip_grad_norm", False)]
    assert calls == step * 3
    for rank_calls, norms in launch(_train_pp_with_spies, 2, overrides, timeout=300):
        assert rank_calls == [(name, True) for name, _ in step] * 3
        assert norms == pytest.approx(single, abs=1e-5)
