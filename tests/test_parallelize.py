"""parallelize(): recompute -> torch.compile -> sharding, driven by the Hydra config."""

import pytest
import torch
import torch.distributed as dist

from curry_train.config import load_config
from curry_train.model import GPT, GPTConfig, StageModules, split_model, token_loss
from curry_train.parallelize import parallelize
from curry_train.primitives import Recompute

SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]


def _model(cfg):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_config(cfg.model))


def _batch(rank=0, ws=1):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)
    n = 4 // ws
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _two_steps(model, optimizer, rank=0, ws=1):
    losses = []
    x, y = _batch(rank, ws)
    for _ in range(2):
        optimizer.zero_grad()
        loss_sum, n = token_loss(model(x), y)
        (loss_sum / 4 / 32 * ws).backward()  # every target is valid: the global mean over 4x32 tokens
        optimizer.step()
        total = loss_sum.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(total.item() / (4 * 32))
    return losses


def _compiled_sharded(rank, ws):
    cfg = load_config(SMALL + ["train.recompute=selective", "train.compile=true", "parallel.sharding=full"])
    model, dist_opt = parallelize(_model(cfg), cfg)
    optimizer = dist_opt.shard_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    return _two_steps(model, optimizer, rank, ws), type(model.blocks[0]).__name__


@pytest.mark.slow
def test_compile_recompute_fsdp2_smoke():
    from curry_train.distributed import launch

    (losses, cls_name), _ = launch(_compiled_sharded, 2, timeout=300)
    cfg = load_config(SMALL)
    model = _model(cfg)
    reference = _two_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert cls_name == "FSDPRecomputeBlock"
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4, (losses, reference)


def test_single_process_recompute_every_n():
    cfg = load_config(SMALL + ["model.n_layer=4", "train.recompute=selective", "train.recompute_every_n=2"])
    model, dist_opt = parallelize(_model(cfg), cfg)
    assert [isinstance(b, Recompute) for b in model.blocks] == [False, True, False, True]
    assert model.blocks[1].recompute_mode == "selective"
    opt = torch.optim.AdamW(model.parameters())
    assert dist_opt.shard_optimizer(opt) is opt


@pytest.mark.slow
def test_pipeline_stages_get_recompute_and_compile_and_keep_the_gpt_names():
    """Each stage of a split GPT goes through parallelize like the whole model (blocks in its ModuleDict found,
    every n-th of the stage recomputed, compiled in place, no data-parallel wrapper); a stage without blocks is
    left as it is. StageModules of one rank's stages carries the GPT's own parameter names."""
    cfg = load_config(SMALL + ["model.n_layer=4", "train.recompute=selective", "train.recompute_every_n=2",
                               "train.compile=true"])
    model = _model(cfg)
    names = dict(model.named_parameters())
    stages = split_model(model, 3, [0, 2, 2])
    for stage in stages:
        module, dist_opt = parallelize(stage, cfg, pipeline_stage=True)
        assert module is stage and dist_opt is None
    assert [isinstance(b, Recompute) for b in model.blocks] == [False, True, False, True]
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    assert not [m for m in stages[0].modules() if isinstance(m, Recompute) or m._compiled_call_impl is not None]
    local = StageModules([stages[0], stages[2]])  # a V-style rank: the first and the last stage
    assert {n: id(p) for n, p in local.named_parameters()} == {
        n: id(p) for n, p in names.items() if not n.startswith(("blocks.0.", "blocks.1."))}
    with pytest.raises(RuntimeError, match="PipelineSchedule.train_step"):
        local(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.slow
def test_single_process_bad_input():
    with pytest.raises(ValueError, match="torchrun"):
        parallelize(_model(load_config(SMALL)), load_config(SMALL + ["parallel.sharding=zero1"]))
    with pytest.raises(ValueError, match="recompute must be"):
        parallelize(_model(load_config(SMALL)), load_config(SMALL + ["train.recompute=half"]))
    with pytest.raises(ValueError, match="recompute_every_n"):
        parallelize(_model(load_config(SMALL)), load_config(SMALL + ["train.recompute=full", "train.recompute_every_n=0"]))


@pytest.mark.slow
def test_check_config_finds_errors_without_a_model_or_process_group():
    from curry_train.config import check_parallelize_config as check_config

    check_config(load_config(["train.recompute=true", "parallel.sharding=full"]), world_size=2)
    for overrides, ws, match in [
        (["parallel.sharding=zero4"], 2, "parallel.sharding must be one of"),
        (["parallel.sharding=full"], 1, "torchrun --nproc-per-node"),
        (["parallel.mixed_precision=fp16"], 2, "gradient scaler"),
        (["parallel.cpu_offload=true"], 2, "FSDP2"),
        (["train.recompute=half"], 1, "train.recompute must be"),
        (["train.recompute=full", "train.recompute_every_n=0"], 1, "train.recompute_every_n"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_config(load_config(overrides), world_size=ws)


def _train_sharded(rank, ws):
    from curry_train.train import train

    out = {}
    for sharding in ("no_shard", "zero1", "full"):
        cfg = load_config(SMALL + [f"parallel.sharding={sharding}", "train.steps=3", "train.batch_size=8",
                                   "train.seq_len=32", "train.gradient_accumulation_steps=2", "train.progress=false",
                                   "train.log_every=0", "train.recompute=full", "data.max_bytes=50000"])
        out[sharding] = [m["loss"] for m in train(cfg)]
    cfg = load_config(SMALL + ["parallel.sharding=zero1"])
    model, dist_opt = parallelize(_model(cfg), cfg)
    out["zero1_optimizer"] = type(dist_opt.shard_optimizer(torch.optim.AdamW(model.parameters()))).__name__
    return out


@pytest.mark.slow
def test_train_uses_every_sharding_with_ga_and_recompute():
    """`python -m curry_train train parallel.sharding=...` path (train() under 2 ranks): same losses in every mode."""
    from curry_train.distributed import launch

    out = launch(_train_sharded, 2, timeout=300)[0]
    assert out["zero1_optimizer"] == "ZeroRedundancyOptimizer"
    for sharding in ("zero1", "full"):
        assert max(abs(a - b) for a, b in zip(out[sharding], out["no_shard"])) <= 1e-5, out
