"""ParallelState: grid arithmetic and validation without a process group; real DeviceMesh groups at ws 4."""

import pytest
import torch
import torch.distributed as dist

from curry_train.config import load_config, validate
from curry_train.distributed import launch
from curry_train.primitives import ParallelState


def test_dp_minus_one_takes_what_is_left():
    assert ParallelState.resolve_sizes(8, dp=-1, pp=2, tp=2) == {"pp": 2, "dp": 2, "cp": 1, "tp": 2}
    assert ParallelState.resolve_sizes(1) == {"pp": 1, "dp": 1, "cp": 1, "tp": 1}
    assert ParallelState.resolve_sizes(6, dp=3, pp=2) == {"pp": 2, "dp": 3, "cp": 1, "tp": 1}


@pytest.mark.parametrize("kwargs,world,message", [
    ({"dp": 3, "pp": 2}, 4, r"parallel.dp=3 \* pp=2 \* cp=1 \* tp=1 = 6 != world size 4"),
    ({"dp": -1, "pp": 3}, 4, r"world size 4 is not divisible by parallel.pp\*cp\*tp = 3\*1\*1 = 3"),
    ({"dp": 1, "pp": 2, "tp": 2, "cp": 2}, 4, r"dp=1 \* pp=2 \* cp=2 \* tp=2 = 8 != world size 4"),
    ({"tp": 0}, 4, r"parallel.tp must be a positive integer, got 0"),
    ({"dp": -2}, 4, r"parallel.dp must be a positive integer or -1"),
    ({"pp": 1.5}, 4, r"parallel.pp must be a positive integer, got 1.5"),
    ({"order": "pp-dp-tp"}, 4, r"parallel.order='pp-dp-tp' must name each of pp, dp, cp, tp exactly once"),
    ({"order": "pp-dp-dp-tp"}, 4, r"exactly once"),
])
def test_bad_grids_name_every_size(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelState.resolve_sizes(world, **kwargs)


def test_config_validation_checks_the_grid_before_any_process_group():
    validate(load_config(["parallel.pp=2", "parallel.dp=2", "train.batch_size=8"]), 4)
    with pytest.raises(ValueError, match=r"parallel.dp=2 \* pp=2 \* cp=1 \* tp=1 = 4 != world size 8"):
        validate(load_config(["parallel.pp=2", "parallel.dp=2"]), 8)
    with pytest.raises(Exception, match="parallel.nope"):  # unknown keys: Hydra's struct-mode error
        load_config(["parallel.nope=1"])


def test_one_process_has_no_groups_and_prints_its_grid():
    ps = ParallelState.from_config({"dp": -1, "pp": 1, "tp": 1, "cp": 1, "order": "pp-dp-cp-tp"})
    assert ps.mesh is None and ps.dp_group is None and ps.dp == 1 and ps.dp_rank == 0
    assert ps.is_first_stage and ps.is_last_stage
    assert "rank grid pp1 x dp1 x cp1 x tp1 = 1 rank(s)" in str(ps)


def test_grid_layout_outermost_first_without_a_process_group():
    ps = ParallelState(dp=2, pp=2, tp=2, world_size=8)  # order pp-dp-cp-tp: tp fastest
    assert ps.grid.tolist() == torch.arange(8).view(2, 2, 1, 2).tolist()
    assert ps.coordinates(5) == {"pp": 1, "dp": 0, "cp": 0, "tp": 1}
    assert ps.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ps.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ps.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ps.group_ranks("cp") == [[r] for r in range(8)]
    # another order: dp outermost, pp innermost
    other = ParallelState(dp=2, pp=2, tp=2, order="dp-tp-cp-pp", world_size=8)
    assert other.group_ranks("pp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert other.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    text = str(ps)
    assert "rank grid pp2 x dp2 x cp1 x tp2 = 8 rank(s), order pp-dp-cp-tp" in text
    assert "   5    1   0   0   1" in text and "dp groups: [[0, 2], [1, 3], [4, 6], [5, 7]]" in text
    with pytest.raises(ValueError, match="unknown parallel dim 'ep'"):
        ps.group_ranks("ep")


def _mesh_groups(rank, world, kwargs):
    ps = ParallelState(**kwargs)
    out = {}
    for d in ("pp", "dp", "cp", "tp"):
        group = ps.group(d)
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)  # the group really talks: sum of its ranks
        out[d] = (dist.get_process_group_ranks(group), ps.ranks_in_group(d), t.item())
    out["coords"] = ps.coords
    out["props"] = (ps.dp_rank, ps.pp_rank, ps.dp, ps.pp, ps.is_first_stage, ps.is_last_stage)
    out["mesh_dims"] = ps.mesh.mesh_dim_names
    hsdp = ParallelState(dp_replicate=2)  # dp 4 = 2 replicas x 2 shards
    out["hsdp"] = {d: dist.get_process_group_ranks(hsdp.group(d)) for d in ("dp_replicate", "dp_shard", "dp", "dp_cp")}
    out["hsdp_fsdp_mesh"] = (hsdp.fsdp_mesh.mesh_dim_names, hsdp.fsdp_mesh.mesh.tolist())
    return out


@pytest.mark.slow
def test_device_mesh_groups_match_the_grid_at_world_size_4():
    results = launch(_mesh_groups, 4, {"dp": 2, "pp": 2}, timeout=300)
    grid = ParallelState(dp=2, pp=2, world_size=4)
    for rank, r in enumerate(results):
        assert r["mesh_dims"] == ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # dp = dp_replicate x dp_shard
        assert r["coords"] == grid.coordinates(rank)
        for d in ("pp", "dp", "cp", "tp"):
            mesh_ranks, grid_ranks, total = r[d]
            assert mesh_ranks == grid_ranks == grid.ranks_in_group(d, rank)
            assert total == float(sum(grid_ranks))
        c = grid.coordinates(rank)
        assert r["props"] == (c["dp"], c["pp"], 2, 2, c["pp"] == 0, c["pp"] == 1)
        # HSDP: replicate outer, shard inner (dp_rank = replicate_rank * dp_shard + shard_rank)
        assert r["hsdp"] == {"dp_replicate": [rank % 2, rank % 2 + 2], "dp_shard": [rank // 2 * 2, rank // 2 * 2 + 1],
                             "dp": [0, 1, 2, 3], "dp_cp": [0, 1, 2, 3]}
        assert r["hsdp_fsdp_mesh"] == (("dp_replicate", "dp_shard_cp"), [[0, 1], [2, 3]])


def test_hsdp_sizes_and_errors_without_a_process_group():
    assert ParallelState.resolve_data_parallel(8, 2) == (2, 4)
    assert ParallelState.resolve_data_parallel(8, 2, 4) == (2, 4)
    ps = ParallelState(dp_replicate=2, pp=2, world_size=8)
    assert (ps.dp, ps.dp_replicate, ps.dp_shard) == (4, 2, 2)
    assert ps.mesh_dim_names() == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
    assert "(dp = dp_replicate2 x dp_shard2: HSDP)" in str(ps)
    for kwargs, message in (({"dp_replicate": 3}, r"parallel.dp_replicate=3 must divide the data-parallel size 8"),
                            ({"dp_replicate": 2, "dp_shard": 2}, r"dp_replicate=2 \* dp_shard=2 = 4 != the data"),
                            ({"dp_shard": 0}, r"parallel.dp_shard must be a positive integer or -1")):
        with pytest.raises(ValueError, match=message):
            ParallelState.resolve_data_parallel(8, **kwargs)
    validate(load_config(["parallel.dp_replicate=2", "parallel.sharding=full", "train.batch_size=8"]), 4)
    with pytest.raises(ValueError, match=r"parallel.dp_replicate=2 replicates FSDP2 shards \(HSDP\) and needs "):
        validate(load_config(["parallel.dp_replicate=2", "train.batch_size=8"]), 4)
    with pytest.raises(ValueError, match=r"parallel.dp_replicate=3 must divide the data-parallel size 4"):
        validate(load_config(["parallel.dp_replicate=3", "parallel.sharding=full", "train.batch_size=8"]), 4)
