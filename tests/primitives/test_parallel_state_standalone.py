"""ParallelState: grid arithmetic and validation without any process, then real DeviceMesh groups at world size 4
whose ranks follow the documented layout (``order`` outermost first, the last dim varies fastest)."""

import pytest
import torch
import torch.distributed as dist

from curry_train.primitives.parallel_state import ParallelState
from standalone_helpers import spawn


def test_dp_minus_one_takes_what_the_other_dims_leave():
    """Sizes resolve without a process group; dp=-1 is the world size over pp*cp*tp."""
    assert ParallelState.resolve_sizes(8, dp=-1, pp=2, tp=2) == {"pp": 2, "dp": 2, "cp": 1, "tp": 2}
    assert ParallelState.resolve_sizes(1) == {"pp": 1, "dp": 1, "cp": 1, "tp": 1}
    assert ParallelState.resolve_sizes(12, dp=3, pp=2, cp=2) == {"pp": 2, "dp": 3, "cp": 2, "tp": 1}
    assert ParallelState.sizes_from_config({"pp": 2}, 4) == {"pp": 2, "dp": 2, "cp": 1, "tp": 1}


@pytest.mark.parametrize("kwargs,world,message", [
    ({"dp": 3, "pp": 2}, 4, r"parallel.dp=3 \* pp=2 \* cp=1 \* tp=1 = 6 != world size 4"),
    ({"dp": -1, "pp": 3}, 4, r"world size 4 is not divisible by parallel.pp\*cp\*tp = 3\*1\*1 = 3"),
    ({"tp": 0}, 4, r"parallel.tp must be a positive integer, got 0"),
    ({"dp": -2}, 4, r"parallel.dp must be a positive integer or -1"),
    ({"pp": 1.5}, 4, r"parallel.pp must be a positive integer, got 1.5"),
    ({"order": "pp-dp-tp"}, 4, r"parallel.order='pp-dp-tp' must name each of pp, dp, cp, tp exactly once"),
    ({}, 0, r"world size must be a positive integer, got 0"),
])
def test_bad_grids_are_one_error_naming_the_sizes(kwargs, world, message):
    """A grid that does not multiply to the world size, or a bad size or order, is one ValueError with the numbers."""
    with pytest.raises(ValueError, match=message):
        ParallelState.resolve_sizes(world, **kwargs)


def test_grid_layout_without_a_process_group():
    """order pp-dp-cp-tp: rank = ((pp * dp + dp_i) * cp + cp_i) * tp + tp_i, so tp neighbours are adjacent ranks."""
    ps = ParallelState(dp=2, pp=2, tp=2, world_size=8)
    assert ps.grid.tolist() == torch.arange(8).view(2, 2, 1, 2).tolist()
    assert ps.coordinates(5) == {"pp": 1, "dp": 0, "cp": 0, "tp": 1}
    assert ps.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ps.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert ps.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ps.ranks_in_group("dp", 5) == [5, 7]
    other = ParallelState(dp=2, pp=2, tp=2, order="dp-tp-cp-pp", world_size=8)  # pp fastest
    assert other.group_ranks("pp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert "dp groups: [[0, 2], [1, 3], [4, 6], [5, 7]]" in str(ps)
    with pytest.raises(ValueError, match="unknown parallel dim 'ep'"):
        ps.group("ep")


def test_one_process_has_no_mesh_and_no_groups():
    """Without torch.distributed: a 1-rank grid, no mesh, every group None (collectives skipped)."""
    ps = ParallelState.from_config({"dp": -1})
    assert ps.mesh is None and ps.dp_group is None and ps.pp_group is None
    assert ps.world_size == 1 and ps.rank == 0 and ps.dp_rank == 0
    assert ps.is_first_stage and ps.is_last_stage


def _groups(rank, world_size):
    out = {}
    for order in ("pp-dp-cp-tp", "dp-pp-cp-tp"):
        ps = ParallelState(dp=2, pp=2, order=order, device_type="cpu")  # gloo: a CPU mesh even next to a GPU
        for d in ("pp", "dp", "cp", "tp"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=ps.group(d))  # the group really talks: the sum of its members' ranks
            out[order, d] = (dist.get_process_group_ranks(ps.group(d)), ps.ranks_in_group(d), t.item())
        out[order, "coords"] = ps.coords
        out[order, "mesh"] = ps.mesh.mesh_dim_names
    return out


@pytest.mark.timeout(300)
def test_real_groups_at_world_size_4_follow_the_documented_order():
    """dp=2 x pp=2. Default order pp-dp-cp-tp: dp varies faster, so dp groups are {0,1}, {2,3} and pp groups
    {0,2}, {1,3}; with order dp-pp-cp-tp it is the other way round."""
    results = spawn(_groups, 4, timeout=180)
    expected = {"pp-dp-cp-tp": {"dp": [[0, 1], [2, 3]], "pp": [[0, 2], [1, 3]]},
                "dp-pp-cp-tp": {"dp": [[0, 2], [1, 3]], "pp": [[0, 1], [2, 3]]}}
    for rank, r in enumerate(results):
        for order, groups in expected.items():
            # the mesh spells dp as dp_replicate x dp_shard (HSDP; both 1 and 2 here)
            assert r[order, "mesh"] == tuple(n for d in order.split("-")
                                             for n in (("dp_replicate", "dp_shard") if d == "dp" else (d,)))
            for d in ("dp", "pp"):
                want = next(g for g in groups[d] if rank in g)
                mesh_ranks, grid_ranks, total = r[order, d]
                assert mesh_ranks == grid_ranks == want, (order, d, rank)
                assert total == float(sum(want))
            for d in ("cp", "tp"):  # size-1 dims are kept in the mesh
                assert r[order, d] == ([rank], [rank], float(rank))
        assert r["pp-dp-cp-tp", "coords"] == {"pp": rank // 2, "dp": rank % 2, "cp": 0, "tp": 0}
        assert r["dp-pp-cp-tp", "coords"] == {"dp": rank // 2, "pp": rank % 2, "cp": 0, "tp": 0}
