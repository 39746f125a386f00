"""Tensor (and sequence) parallelism on DTensor: ColumnParallelLinear / RowParallelLinear equal nn.Linear forward and
backward, a torchtitan-style decoder under apply_tensor_parallel equals the unsharded model (logits and every
gradient) at tp 2 and 4, with and without sequence parallelism and loss parallelism, and bad models are refused in
one process before any launch."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from curry_train.primitives.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, apply_tensor_parallel,
                                                    block_comm, check_tensor_parallel, local_value,
                                                    loss_parallel_context, tp_layout)
from standalone_helpers import make_batch, spawn, tiny_decoder, token_loss

TOL = 1e-5


def _full(t):
    return local_value(t).detach()


def _linear_checks(tp):
    """Column and row linears alone, and chained (an MLP), against nn.Linear with the same weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (tp,))
    rank = mesh.get_local_rank()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    out = {}

    torch.manual_seed(0)
    ref = nn.Linear(16, 8 * tp)
    torch.manual_seed(0)
    col = ColumnParallelLinear(16, 8 * tp, mesh, output_layout=Replicate())  # built from sizes, gathered output
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xa) ** 2).sum().backward()
    y = col(xb)
    (y ** 2).sum().backward()
    out["column_shapes"] = (tuple(col.weight.to_local().shape), col.weight.placements == (Shard(0),))
    out["column_forward"] = (y - ref(x)).abs().max().item()
    out["column_grads"] = max((_full(col.weight.grad) - ref.weight.grad).abs().max().item(),
                              (_full(col.bias.grad) - ref.bias.grad).abs().max().item(),
                              (xb.grad - xa.grad).abs().max().item())

    torch.manual_seed(0)
    ref = nn.Linear(8 * tp, 16)
    torch.manual_seed(0)
    row = RowParallelLinear.from_linear(nn.Linear(8 * tp, 16), mesh)  # same seed: same weights, split in place
    xr = torch.randn(2, 8, 8 * tp, generator=torch.Generator().manual_seed(2))
    xa = xr.clone().requires_grad_()
    xb = xr[..., rank * 8:(rank + 1) * 8].clone().requires_grad_()  # this rank's input features
    (ref(xa) ** 2).sum().backward()
    y = row(xb)
    (y ** 2).sum().backward()
    out["row_shapes"] = (tuple(row.weight.to_local().shape), row.weight.placements == (Shard(1),),
                         row.bias.placements == (Replicate(),))
    out["row_forward"] = (y - ref(xr)).abs().max().item()
    out["row_grads"] = max((_full(row.weight.grad) - ref.weight.grad).abs().max().item(),
                           (_full(row.bias.grad) - ref.bias.grad).abs().max().item(),
                           (xb.grad - xa.grad[..., rank * 8:(rank + 1) * 8]).abs().max().item())

    torch.manual_seed(3)  # column then row: no communication between them, one all-reduce at the end
    up, down = nn.Linear(16, 32), nn.Linear(32, 16)
    reference = down(F.gelu(up(x)))
    torch.manual_seed(3)
    up_tp = ColumnParallelLinear.from_linear(nn.Linear(16, 32), mesh)
    down_tp = RowParallelLinear.from_linear(nn.Linear(32, 16), mesh)
    out["mlp_forward"] = (down_tp(F.gelu(up_tp(x))) - reference).abs().max().item()
    out["repr"] = repr(up_tp)
    try:
        ColumnParallelLinear.from_linear(up_tp, mesh, name="up")
    except ValueError as e:
        out["twice"] = str(e)
    return out


def _logits_and_grads(model, x, y, loss_parallel=False):
    model.zero_grad(set_to_none=True)
    with loss_parallel_context(loss_parallel):
        logits = model(x)
        loss_sum, n = token_loss(logits, y)
        (loss_sum / n).backward()
    return _full(logits), {k: _full(p.grad) for k, p in model.named_parameters()}, _full(loss_sum).item()


def _decoder_checks(tp):
    """The toy decoder (heads and widths divisible by 2 and 4) under every plan variant vs. unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (tp,))
    x, y = make_batch(rows=2, seq=16, vocab=64, padded=True)
    out = {}
    for tie in (False, True):
        ref_logits, ref_grads, ref_loss = _logits_and_grads(tiny_decoder(dim=32, n_heads=4, tie=tie), x, y)
        for sp in (False, True):
            for lp in ((False, True) if not tie else (False,)):
                model = apply_tensor_parallel(tiny_decoder(dim=32, n_heads=4, tie=tie), mesh, sp, lp)
                logits, grads, loss = _logits_and_grads(model, x, y, lp)
                assert set(grads) == set(ref_grads)  # parameter names unchanged
                out[(tie, sp, lp)] = {
                    "logits": (logits - ref_logits).abs().max().item(),
                    "grads": max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
                    "loss": abs(loss - ref_loss),
                    "wq_local": tuple(model.layers["0"].attention.wq.weight.to_local().shape),
                    "w2_type": type(model.layers["0"].feed_forward.w2).__name__,
                    "dtensor_params": sum(isinstance(p, DTensor) for p in model.parameters()),
                }
    return out


def _all_checks(rank, tp):
    return {"linears": _linear_checks(tp), "decoder": _decoder_checks(tp)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 4])
def test_linears_and_decoder_equal_the_unsharded_model(tp):
    """One launch per tp size, every check inside it: all ranks agree, every difference within 1e-5."""
    ranks = spawn(_all_checks, tp, timeout=280)
    for r in ranks:
        lin = r["linears"]
        assert lin["column_shapes"] == ((8, 16), True) and lin["row_shapes"] == ((16, 8), True, True)
        for key in ("column_forward", "column_grads", "row_forward", "row_grads", "mlp_forward"):
            assert lin[key] <= TOL, (key, lin[key])
        assert f"tp={tp} split by output features" in lin["repr"] and "already a ColumnParallelLinear" in lin["twice"]
        dec = r["decoder"]
        assert len(dec) == 6  # untied: 2 SP x 2 loss-parallel; tied: 2 SP
        for key, got in dec.items():
            assert got["logits"] <= TOL and got["grads"] <= TOL and got["loss"] <= 1e-4, (key, got)
            assert got["wq_local"] == (32 // tp, 32) and got["w2_type"] == "RowParallelLinear", (key, got)
        assert dec[(False, False, False)]["dtensor_params"] == 2 * 7 + 2  # 7 linears per layer + embedding + head
        assert dec[(False, True, False)]["dtensor_params"] == 2 * 9 + 3  # + the norms (SequenceParallel)


class FusedQKV(nn.Module):
    """nanoGPT's layout: transformer.h[i].attn.c_attn fuses [q; k; v]."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.c_attn = nn.Linear(8, 24)
        self.transformer = nn.ModuleDict({"h": nn.ModuleList([block])})


def test_bad_models_are_refused_without_a_process_group():
    assert tp_layout(tiny_decoder()).name == "torchtitan"
    check_tensor_parallel(tiny_decoder(dim=32, n_heads=4), 4, sequence_parallel=True, seq_len=16)
    cases = [
        (FusedQKV(), {}, r"transformer.h.0.attn.c_attn is a fused \[q; k; v\] projection"),
        (nn.Sequential(nn.Linear(4, 4)), {}, "does not know the layout of Sequential"),
        (tiny_decoder(dim=32, n_heads=2), {}, r"tp=4 must divide the attention heads: Decoder has 2"),
        (tiny_decoder(dim=32, n_heads=4, tie=True), {"loss_parallel": True}, "loss_parallel=true needs an untied"),
        (tiny_decoder(dim=32, n_heads=4), {"sequence_parallel": True, "seq_len": 18}, "seq_len=18 must be divisible"),
        (tiny_decoder(dim=32, n_heads=4, dropout=0.1), {}, r"tp=4 with dropout > 0 \(layers.0.dropout \(p=0.1\)"),
        (tiny_decoder(vocab=66, dim=32, n_heads=4), {}, "tp=4 must divide the vocabulary: tok_embeddings has 66"),
    ]
    for model, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_tensor_parallel(model, 4, **kwargs)
    with pytest.raises(ValueError, match="ColumnParallelLinear splits an nn.Linear; qkv is a Conv1d"):
        ColumnParallelLinear.from_linear(nn.Conv1d(4, 4, 1), None, name="qkv")


def test_block_comm_formula():
    """2 all-reduces of B N d per block forward and 2 backward; with SP 2 all-gathers + 2 reduce-scatters each way."""
    tp_only = {"all_reduce": (6, 1024)}
    assert block_comm(2, 16, 32, 3, tp=2) == {"forward": tp_only, "backward": tp_only}
    sp = block_comm(2, 16, 32, 3, tp=2, sequence_parallel=True)["backward"]
    assert sp == {"all_gather": (6, 1024), "reduce_scatter": (6, 1024)}
    assert block_comm(2, 16, 32, 3, tp=1) == {"forward": {}, "backward": {}}
    with loss_parallel_context(False):  # a no-op without tp
        assert local_value(torch.ones(2)).sum() == 2
