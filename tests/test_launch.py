import pytest
import torch
import torch.distributed as dist

from curry_train.distributed import LaunchError, launch


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def test_launch_returns_every_rank_result():
    assert launch(_allreduce_rank, 2, timeout=60) == [1.0, 1.0]


@pytest.mark.slow
def test_launch_reports_the_failing_rank_traceback():
    with pytest.raises(LaunchError, match="boom on rank 1"):
        launch(_fail_on_rank1, 2, timeout=60)
