"""Composed layouts on one rank grid (``ParallelState``: pp x dp_replicate x dp_shard x cp x tp): each equals one
process over 3 optimizer steps, through ``train``.

The fast suite keeps one smoke at world size 4 (HSDP 2 x 2, and a 2-stage pipeline whose stages are FSDP2-sharded
over dp 2, with gradient accumulation); the 8-rank layouts and bf16 are ``slow`` (``make test-all``). One spawn
checks several layouts in turn.
"""

import pytest

from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.train import train

TOL = 1e-5  # relative loss error, fp32
SMALL = ["model.n_layer=4", "model.n_embd=32", "model.n_head=4", "train.seq_len=32", "train.batch_size=8",
         "train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.log_every=0",
         "data.max_bytes=50000", "model.dropout=0.0"]
PP = ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.n_microbatches=2"]

SMOKE = {  # world size 4
    "hsdp 2x2": ["parallel.sharding=full", "parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "pp2 x dp2, FSDP2 full, ga 2": [*PP, "parallel.sharding=full", "train.gradient_accumulation_steps=2",
                                   "data.variable_length=true"],
}


def _losses(history):
    return [h["loss"] for h in history]


def _layout(model) -> tuple:
    """What ``parallelize`` made: (FSDP2 root?, the block weights' mesh dims, placements)."""
    from torch.distributed.fsdp import FSDPModule

    weight = next(p for n, p in model.named_parameters() if n.endswith("attn.qkv.weight"))
    mesh = getattr(weight, "device_mesh", None)
    return (isinstance(model, FSDPModule), None if mesh is None else mesh.mesh_dim_names,
            tuple(str(pl) for pl in getattr(weight, "placements", ())))


def _train_each(rank, world_size, runs):
    """Each run's losses and the layouts ``parallelize`` returned (whole model, or each of this rank's stages)."""
    import curry_train.train as driver

    real, seen = driver.parallelize, []

    def spy(*args, **kwargs):
        model, dist_opt = real(*args, **kwargs)
        seen.append(_layout(model))
        return model, dist_opt

    driver.parallelize = spy
    out = {}
    for name, overrides in runs.items():
        seen.clear()
        out[name] = (_losses(train(load_config([*SMALL, *overrides]))), list(seen))
    return out


def _single(overrides):
    keep = [o for o in overrides if o.startswith(("train.", "data.", "model."))]
    return _losses(train(load_config([*SMALL, *keep])))


def _check(runs, ranks, layouts, rel=TOL):
    """Every rank's losses equal one process's; every rank's parallelized modules are laid out as ``layouts``."""
    for name, overrides in runs.items():
        single = _single(overrides)
        for rank, result in enumerate(ranks):
            losses, seen = result[name]
            assert losses == pytest.approx(single, rel=rel), f"{name}, rank {rank}"
            assert seen == [layouts[name]] * len(seen) and seen, f"{name}, rank {rank}: {seen}"


def test_composed_grid_smoke_at_world_size_4():
    """HSDP (fully_shard on the 2-D dp_replicate x dp_shard mesh) and FSDP2 pipeline stages equal one process."""
    _check(SMOKE, launch(_train_each, 4, SMOKE, timeout=400), {
        "hsdp 2x2": (True, ("dp_replicate", "dp_shard_cp"), ("R", "S(0)")),
        "pp2 x dp2, FSDP2 full, ga 2": (True, ("dp_shard_cp",), ("S(0)",)),
    })


EIGHT = {  # world size 8
    "dp2 x pp2 x tp2, FSDP2 full, ga 2": [*PP, "parallel.tp=2", "parallel.sharding=full",
                                         "train.gradient_accumulation_steps=2"],
    "hsdp 2x2 x tp2": ["parallel.tp=2", "parallel.sharding=full", "parallel.dp_replicate=2"],
}


@pytest.mark.slow
def test_eight_rank_layouts_equal_one_process():
    """Tensor parallelism inside FSDP2 pipeline stages (each block's weights dp x tp DTensors), and HSDP x tp."""
    _check(EIGHT, launch(_train_each, 8, EIGHT, timeout=900), {
        "dp2 x pp2 x tp2, FSDP2 full, ga 2": (True, ("dp_shard_cp", "tp"), ("S(0)", "S(0)")),
        "hsdp 2x2 x tp2": (True, ("dp_replicate", "dp_shard_cp", "tp"), ("R", "S(0)", "S(0)")),
    })


BF16_REL = 2e-2  # bf16 compute against the fp32 single process (the page states this bound)
BF16 = {"pp2 x dp2, FSDP2 full + bf16": [*PP, "parallel.sharding=full", "parallel.mixed_precision=bf16"]}


@pytest.mark.slow
def test_pp2_x_dp2_fsdp2_bf16_within_the_stated_bound():
    _check(BF16, launch(_train_each, 4, BF16, timeout=600), {
        "pp2 x dp2, FSDP2 full + bf16": (True, ("dp_shard_cp",), ("S(0)",))}, rel=BF16_REL)
