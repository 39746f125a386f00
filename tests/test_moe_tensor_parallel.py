"""A mixture of experts with tensor parallelism: attention is tensor-parallel, each ``MoEMLP`` (router + expert
bank) stays whole on every tp rank. Its input is the same on every tp rank (after the attention's all-reduce; with
sequence parallelism, all-gathered), so the tp ranks route alike and, the gradient reaching its output being the
whole one, get the same MoE gradients: checked directly against the unsharded model, then ``train`` at tp 2 (with
and without sequence parallelism, a capacity limit and the balancing loss) and at dp 2 x tp 2 (FSDP2 full, gradient
accumulation 2) equals one process over 3 optimizer steps, and holds the bytes ``/plan`` predicts. One spawn per
world size."""

import pytest
import torch

from curry_train.distributed import launch
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives.moe import moe_aux_loss
from curry_train.primitives.tensor_parallel import apply_tensor_parallel
from curry_train.bench.compose import predicted_bytes
from test_compose import GA2, MOE, SMALL, _check, _train_each

CAPPED = ["model=moe", "model.moe_experts=4", "model.moe_capacity_factor=1.25", "model.moe_aux_loss_weight=0.05"]
TP2 = {  # world size 2
    "moe tp2": [*MOE, "parallel.tp=2"],
    # every tp rank routes the same tokens, so a capacity limit and the balancing loss keep the parity too
    "moe tp2, capacity 1.25 + balancing loss": [*CAPPED, "parallel.tp=2"],
    "moe tp2 + sp": [*MOE, "parallel.tp=2", "parallel.sequence_parallel=true"],
    "moe tp2 + sp, capacity 1.25 + balancing loss": [*CAPPED, "parallel.tp=2", "parallel.sequence_parallel=true"],
}
DP2_TP2 = {  # world size 4
    "moe dp2 x tp2, FSDP2 full, ga 2": [*MOE, "parallel.tp=2", "parallel.sharding=full", *GA2],
}


def _moe_model():
    torch.manual_seed(0)  # blocks 0 and 2 MoE, block 1 dense; capacity 1.25 drops tokens
    return GPT(GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=32, moe_experts=4, moe_every=2,
                         moe_aux_loss_weight=0.05))


def _moe_grads(model) -> dict:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n + moe_aux_loss(model)).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()
            if ".mlp.router." in k or ".mlp.experts." in k}


def _tp2(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    return {"reference": _moe_grads(_moe_model()), "runs": _train_each(rank, world_size, TP2),
            "grads": {sp: _moe_grads(apply_tensor_parallel(_moe_model(), mesh, sp)) for sp in (False, True)}}


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_moe_with_tensor_parallelism_equals_one_process():
    rank0, rank1 = launch(_tp2, 2, timeout=850)
    reference = rank0["reference"]
    assert len(reference) == 2 * 4 and all(g.abs().sum() > 0 for g in reference.values())  # 2 x router, w1 w3 w2
    for sp, grads in rank0["grads"].items():
        assert grads.keys() == reference.keys()
        for k in grads:  # the same on every tp rank, bit for bit, and the unsharded model's
            assert torch.equal(grads[k], rank1["grads"][sp][k]), (sp, k)
            torch.testing.assert_close(grads[k], reference[k], rtol=1e-5, atol=1e-6, msg=f"sp={sp} {k}")
    _check(TP2, [rank0["runs"], rank1["runs"]], {name: (False, ("tp",), ("S(0)",)) for name in TP2})
    ranks = launch(_train_each, 4, DP2_TP2, timeout=850)
    _check(DP2_TP2, ranks, {name: (True, ("dp_shard_cp", "tp"), ("_S(0, 2)", "S(0)"), 2, ("S(0)",))
                            for name in DP2_TP2})  # the banks: plain tensors FSDP2 shards over dp 2
    # per-rank bytes against /plan's (fp32): the experts whole on every tp rank, sharded over dp
    predicted = predicted_bytes(DP2_TP2["moe dp2 x tp2, FSDP2 full, ga 2"], 4, SMALL)
    fullest = max((r["moe dp2 x tp2, FSDP2 full, ga 2"]["bytes"] for r in ranks), key=lambda h: sum(h.values()))
    for part in ("params", "grads"):
        assert fullest[part] == pytest.approx(predicted[part], rel=0.01), (part, fullest, predicted)
