"""Context parallelism: ring attention over 2 and 4 gloo ranks equals full SDPA on the unsharded tensors (output and
q/k/v gradients, causal and not, GQA, both layouts), ``ContextParallel.wrap`` / ``apply_context_parallel`` give the
unwrapped module's outputs and gradients, the causal load balancing gives every rank the same work, the ring sends
what the formula says, and bad input is one clear ``ValueError``."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from curry_train.primitives.context_parallel import (ContextParallel, apply_context_parallel, positions,
                                                     ring_attention, ring_bytes_per_forward, shard_sequence,
                                                     track_communication, unshard_sequence)
from standalone_helpers import grads, make_batch, spawn, tiny_decoder, token_loss

TOL = 1e-5


class GQAttention(nn.Module):
    """Grouped-query self-attention: ``x [B, N, dim] -> [B, N, dim]``, causal SDPA with 4 query and 2 kv heads."""

    def __init__(self, dim: int = 32, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * self.head_dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, dropout_p=0.0, is_causal=True):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(B, T, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                           is_causal=is_causal and attn_mask is None, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _ring_case(rank, ws, causal, load_balance, kernel="auto", B=2, H=4, H_kv=2, N=None, D=8):
    """Max abs differences of ring attention's output (unsharded) and q/k/v gradients from full SDPA."""
    N = N or 8 * ws
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, N, D, generator=g).requires_grad_() for h in (H, H_kv, H_kv))
    dout = torch.randn(B, H, N, D, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != H_kv)
    (ref * dout).sum().backward()
    shard = lambda t: shard_sequence(t.detach(), rank, ws, dim=2, load_balance=load_balance)  # noqa: E731
    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, dist.group.WORLD, causal=causal, load_balance=load_balance, kernel=kernel)
    (out * shard(dout)).sum().backward()
    return {"out": _diff(unshard_sequence(out, None, dim=2, load_balance=load_balance), ref),
            "dq": _diff(ql.grad, shard(q.grad)), "dk": _diff(kl.grad, shard(k.grad)),
            "dv": _diff(vl.grad, shard(v.grad))}


def _bf16(rank, ws, kernel):
    """bf16 q/k/v (the merge runs in fp32): output and gradients within bf16 rounding of fp32 SDPA, dtypes kept."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 8 * ws, 8, generator=g).requires_grad_() for h in (4, 2, 2))
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    ql, kl, vl = (shard_sequence(t.detach(), rank, ws, dim=2).bfloat16().requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, None, kernel=kernel)
    out.float().sum().backward()
    dtypes = {t.dtype for t in (out, ql.grad, kl.grad, vl.grad)}
    ref_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return dtypes == {torch.bfloat16}, max(
        _diff(unshard_sequence(out, None, dim=2), ref_out),
        *(_diff(a.grad, shard_sequence(b.grad, rank, ws, dim=2)) for a, b in ((ql, q), (kl, k), (vl, v))))


def _forward_bytes(rank, ws, B=2, H=4, H_kv=2, D=8):
    """Bytes this rank sends in one forward, and in forward + backward."""
    N = 8 * ws
    q, k, v = (torch.randn(B, h, N // ws, D, requires_grad=True) for h in (H, H_kv, H_kv))
    with track_communication() as fwd:
        out = ring_attention(q, k, v, None)
    with track_communication() as bwd:
        out.sum().backward()
    return fwd["sent_bytes"], fwd["messages"], bwd["sent_bytes"], bwd["messages"]


class MatmulFlops(TorchFunctionMode):
    """Counts ``2 * a.numel() * b.size(-1)`` per ``torch.matmul(a, b)`` (batched matrix products)."""

    flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.matmul:
            self.flops += 2 * args[0].numel() * args[1].size(-1)
        return func(*args, **(kwargs or {}))


def _forward_flops(rank, ws, causal, load_balance, N=64):
    q, k, v = (torch.randn(1, 2, N // ws, 8) for _ in range(3))
    with MatmulFlops() as counter:
        ring_attention(q, k, v, None, causal=causal, load_balance=load_balance, kernel="math")
    return counter.flops


def _wrapped_attention(rank, ws):
    """ContextParallel.wrap(GQAttention) on token shards vs the plain module on the whole sequence."""
    N = 8 * ws
    plain, cp = GQAttention(), GQAttention()
    keys = list(cp.state_dict())
    assert ContextParallel.wrap(cp, None) is cp
    x = torch.randn(3, N, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(3, N, 32, generator=torch.Generator().manual_seed(3))
    (plain(x) * w).sum().backward()
    xl = shard_sequence(x.detach(), rank, ws).requires_grad_()
    out = cp(xl)
    (out * shard_sequence(w, rank, ws)).sum().backward()
    got = grads(cp)
    for t in got.values():
        dist.all_reduce(t)  # every rank's loss touches every parameter: the full gradient is the sum
    ref = grads(plain)
    clone = copy.deepcopy(cp)
    return {"out": _diff(unshard_sequence(out, None), plain(x)), "dx": _diff(xl.grad, shard_sequence(x.grad, rank, ws)),
            "dparams": max(_diff(got[n], ref[n]) for n in ref), "same_names": set(got) == set(ref),
            "keys_unchanged": list(cp.state_dict()) == keys, "loads_into_plain": _loads_strictly(cp),
            "isinstance": isinstance(cp, GQAttention) and isinstance(cp, ContextParallel),
            "class": type(cp).__name__, "repr": repr(cp),
            "deepcopy": _diff(unshard_sequence(clone(xl), None), plain(x))}


def _loads_strictly(cp):
    plain = GQAttention(seed=5)
    plain.load_state_dict(cp.state_dict())  # strict: no prefix added by the wrap
    return all(torch.equal(a, b) for a, b in zip(plain.parameters(), cp.parameters()))


def _decoder(rank, ws):
    """apply_context_parallel on the tiny decoder (no position encoding, so token shards need no position ids):
    unsharded logits and the mean token loss's all-reduced gradients equal the single-process model's."""
    plain, model = tiny_decoder(n_layers=2, seed=4), tiny_decoder(n_layers=2, seed=4)
    wrapped = apply_context_parallel(model, None)
    x, y = make_batch(rows=2, seq=8 * ws, padded=True)
    loss_sum, n = token_loss(plain(x), y)
    (loss_sum / n).backward()
    logits = model(shard_sequence(x, rank, ws))
    loss_sum, n_local = token_loss(logits, shard_sequence(y, rank, ws))
    n_global = n_local.clone()
    dist.all_reduce(n_global)
    (loss_sum / n_global).backward()
    got = grads(model)
    for t in got.values():
        dist.all_reduce(t)
    ref = grads(plain)
    return {"logits": _diff(unshard_sequence(logits, None), plain(x)),
            "dparams": max(_diff(got[k], ref[k]) for k in ref), "wrapped": [type(m).__name__ for m in wrapped],
            "keys_unchanged": list(model.state_dict()) == list(plain.state_dict())}


def _checkpoint_outside_is_fine(rank, ws):
    """Recompute around a CP-wrapped module re-enters its forward (the ring) in backward: same gradients."""
    N = 8 * ws
    a, b = GQAttention(), GQAttention()
    ContextParallel.wrap(a, None)
    ContextParallel.wrap(b, None)
    xl = shard_sequence(torch.randn(2, N, 32, generator=torch.Generator().manual_seed(6)), rank, ws)
    a(xl).square().sum().backward()
    torch.utils.checkpoint.checkpoint(b, xl, use_reentrant=False).square().sum().backward()
    return max(_diff(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


def _error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _errors(rank, ws):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    N = 8 * ws
    m = ContextParallel.wrap(GQAttention(), None)
    x = torch.randn(1, N // ws, 32)
    odd = torch.randn(1, 2, 3, 8)
    return {
        "mask": _error(lambda: m(x, attn_mask=torch.ones(N // ws, N // ws, dtype=torch.bool))),
        "dropout": _error(lambda: m(x, dropout_p=0.1)),
        "not_causal": _error(lambda: m(x, is_causal=False)),
        "odd_local": _error(lambda: ring_attention(odd, odd, odd, None)),
        "recompute_inside": _error(
            lambda: ContextParallel.wrap(nn.Sequential(checkpoint_wrapper(GQAttention())), None)),
        "no_blocks": _error(lambda: apply_context_parallel(GQAttention(), None)),
        "torch_on_cpu": _error(lambda: ContextParallel.wrap(GQAttention(), None, implementation="torch")),
        "ok_non_causal": ContextParallel.wrap(GQAttention(), None, causal=False)(x, is_causal=False).shape == x.shape,
    }


def _all_checks(rank, ws):
    out = {"ring": {(c, lb, kernel): _ring_case(rank, ws, c, lb, kernel)
                    for c in (True, False) for lb in (True, False) for kernel in ("flash_cpu", "math")},
           "ring_mha_b1": _ring_case(rank, ws, True, True, B=1, H=2, H_kv=2, N=4 * ws, D=4),
           "bf16": {kernel: _bf16(rank, ws, kernel) for kernel in ("flash_cpu", "math")},
           "bytes": _forward_bytes(rank, ws),
           "flops": {(c, lb): _forward_flops(rank, ws, c, lb) for c in (True, False) for lb in (True, False)},
           "wrap": _wrapped_attention(rank, ws), "decoder": _decoder(rank, ws)}
    full = torch.arange(2 * 8 * ws * 3.0).view(2, 8 * ws, 3)
    out["roundtrip"] = torch.equal(unshard_sequence(shard_sequence(full, rank, ws), None), full)
    out["roundtrip_contiguous"] = torch.equal(
        unshard_sequence(shard_sequence(full, rank, ws, load_balance=False), None, load_balance=False), full)
    out["checkpoint_outside"] = _checkpoint_outside_is_fine(rank, ws)
    out["errors"] = _errors(rank, ws)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ws: f"cp{ws}")
def ranks(request):
    return request.param, spawn(_all_checks, request.param, timeout=200)


@pytest.mark.timeout(300)
def test_ring_attention_equals_full_sdpa(ranks):
    """Output and q/k/v gradients within 1e-5 of SDPA on the whole sequence: causal and not, load-balanced and
    contiguous shards, both block kernels (fused CPU flash, fp32 math), GQA (4 query / 2 kv heads) with B=2, and
    plain MHA with B=1."""
    ws, results = ranks
    for r in results:
        for case, d in [*r["ring"].items(), ("mha_b1", r["ring_mha_b1"])]:
            assert max(d.values()) <= TOL, (ws, case, d)


@pytest.mark.timeout(300)
def test_bf16_inputs_keep_their_dtype_and_stay_close(ranks):
    """bf16 q/k/v: bf16 output and gradients within 5e-2 of fp32 SDPA (bf16 keeps 8 bits of mantissa), both kernels."""
    ws, results = ranks
    for r in results:
        for kernel, (dtypes_kept, diff) in r["bf16"].items():
            assert dtypes_kept and diff <= 5e-2, (ws, kernel, diff)


@pytest.mark.timeout(300)
def test_communication_matches_the_formula(ranks):
    """Forward: cp-1 K/V blocks of 2*B*H_kv*(N/cp)*D fp32 elements. Backward: cp-1 K/V blocks plus cp dK/dV blocks."""
    ws, results = ranks
    block = ring_bytes_per_forward(2, 2, 8, 8, 2)  # one K/V block: B=2, H_kv=2, N/cp=8, D=8, fp32
    for r in results:
        assert r["bytes"] == (ring_bytes_per_forward(2, 2, 8, 8, ws), ws - 1, (2 * ws - 1) * block, 2 * ws - 1)


@pytest.mark.timeout(300)
def test_causal_load_balancing_gives_every_rank_the_same_work(ranks):
    """Counting (N/2cp)-square blocks of scores: head + tail chunks give every rank 2cp+1 of them, (2cp+1)/(4cp) of the
    non-causal 4cp (blocks above the diagonal are skipped); contiguous shards give rank r 4r+3 (the same total)."""
    ws, results = ranks
    balanced = [r["flops"][(True, True)] for r in results]
    contiguous = [r["flops"][(True, False)] for r in results]
    dense = results[0]["flops"][(False, True)]
    assert len(set(balanced)) == 1 and balanced[0] * 4 * ws == dense * (2 * ws + 1), (balanced, dense)
    assert [c * (2 * ws + 1) for c in contiguous] == [balanced[0] * (4 * r + 3) for r in range(ws)], contiguous
    assert all(r["flops"][(False, False)] == dense for r in results)


@pytest.mark.timeout(300)
def test_wrap_equals_the_unwrapped_module(ranks):
    """ContextParallel.wrap on token shards: unsharded output, input gradients and all-reduced parameter gradients
    equal the plain module on the whole sequence; state-dict keys unchanged (loads strictly into a plain module);
    a deep copy keeps working."""
    ws, results = ranks
    for r in results:
        w = r["wrap"]
        assert max(w["out"], w["dx"], w["dparams"], w["deepcopy"]) <= TOL, w
        assert w["same_names"] and w["keys_unchanged"] and w["loads_into_plain"] and w["isinstance"], w
        assert w["class"] == "ContextParallelGQAttention" and f"cp={ws}, pattern=ring, causal=True" in w["repr"], w


@pytest.mark.timeout(300)
def test_apply_context_parallel_on_a_decoder(ranks):
    """Every block of the decoder wrapped; logits and the mean token loss's gradients equal one process's."""
    ws, results = ranks
    for r in results:
        d = r["decoder"]
        assert d["logits"] <= TOL and d["dparams"] <= TOL, d
        assert d["wrapped"] == ["ContextParallelTransformerBlock"] * 2 and d["keys_unchanged"], d
        assert r["roundtrip"] and r["roundtrip_contiguous"]


@pytest.mark.timeout(300)
def test_recompute_around_a_wrapped_module_and_errors_inside_the_group(ranks):
    """Checkpointing a CP-wrapped module gives the same gradients; attn_mask, dropout, a causal mismatch, an odd
    local length, recompute inside the wrapped module and a model without blocks are clear ValueErrors."""
    ws, results = ranks
    r = results[-1]
    assert r["checkpoint_outside"] <= TOL
    e = r["errors"]
    assert "attn_mask" in e["mask"] and "cannot be sharded" in e["mask"], e
    assert "dropout_p=0.1" in e["dropout"], e
    assert "causal=True" in e["not_causal"] and "is_causal=False" in e["not_causal"], e
    assert f"(local 3 x cp {ws}) = {3 * ws} is not divisible by 2*cp = {2 * ws}" in e["odd_local"], e
    assert "activation recompute" in e["recompute_inside"] and "before" in e["recompute_inside"], e
    assert e["no_blocks"].startswith("model has no attention module CP knows how to wrap: GQAttention"), e
    assert e["ok_non_causal"] is True
    assert e["torch_on_cpu"].startswith("ContextParallel(implementation='torch') needs the module on CUDA (its "
                                        "parameters are on cpu)"), e


def test_positions_and_shards_without_processes():
    """Rank r holds chunks r and 2cp-1-r (load-balanced) or 2r, 2r+1 (contiguous); shards cover the sequence once."""
    assert positions(0, 2, 8).tolist() == [0, 1, 6, 7] and positions(1, 2, 8).tolist() == [2, 3, 4, 5]
    assert positions(1, 4, 16).tolist() == [2, 3, 12, 13]
    assert positions(1, 2, 8, load_balance=False).tolist() == [4, 5, 6, 7]
    assert positions(0, 1, 5).tolist() == [0, 1, 2, 3, 4]
    x = torch.arange(24).view(1, 24)
    assert sorted(torch.cat([shard_sequence(x, r, 3) for r in range(3)], 1)[0].tolist()) == list(range(24))
    assert torch.equal(shard_sequence(x, 2, 3), x[:, positions(2, 3, 24)])


def test_bad_input_without_processes():
    """Sequence length not divisible by 2*cp (both numbers named), rank out of range, an unknown pattern,
    a model without blocks, no process group: one ValueError each, before any communication."""
    with pytest.raises(ValueError, match=r"sequence length 30 is not divisible by 2\*cp = 8 \(cp = 4\)"):
        shard_sequence(torch.zeros(2, 30), 0, 4)
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 2\*cp = 4"):
        positions(0, 2, 10)
    with pytest.raises(ValueError, match=r"^cp_rank must be an integer in \[0, 3\], got 4$"):
        positions(4, 4, 32)
    with pytest.raises(ValueError,
                       match=r"^pattern must be one of ring \(double_ring.*is not implemented\), got 'double_ring'$"):
        ContextParallel.wrap(GQAttention(), None, pattern="double_ring")
    with pytest.raises(ValueError, match="^model has no attention module CP knows how to wrap: Sequential"):
        apply_context_parallel(nn.Sequential(nn.Linear(2, 2)), None)
    with pytest.raises(ValueError, match="initialized process group"):
        ring_attention(*(torch.zeros(1, 1, 4, 2),) * 3, None)
    with pytest.raises(ValueError, match=r"^implementation must be one of ring, torch, got 'flash'$"):
        ContextParallel.wrap(GQAttention(), None, implementation="flash")
    with pytest.raises(ValueError, match="needs an nn.Module"):
        ContextParallel.wrap(lambda x: x, None)
    m = GQAttention()
    with pytest.raises(ValueError, match="initialized process group"):
        ContextParallel.wrap(m, None)
    assert type(m) is GQAttention, "a failed wrap changes nothing"


def _torch_implementation(rank, ws):
    """On CUDA: PyTorch's ring attention (implementation="torch") and ours against the unwrapped module, causal
    with load balancing and bidirectional."""
    out = {}
    for causal in (True, False):
        plain = GQAttention().cuda()
        x = torch.randn(2, 8 * ws, 32, generator=torch.Generator().manual_seed(2)).cuda().requires_grad_()
        plain(x, is_causal=causal).square().sum().backward()
        ref = grads(plain)
        for impl in ("torch", "ring"):
            m = ContextParallel.wrap(GQAttention().cuda(), None, causal=causal, implementation=impl)
            xl = shard_sequence(x.detach(), rank, ws).requires_grad_()
            y = m(xl, is_causal=causal)
            y.square().sum().backward()
            got = grads(m)
            for t in got.values():
                dist.all_reduce(t)
            out[(causal, impl)] = max(_diff(unshard_sequence(y, None), plain(x, is_causal=causal)),
                                      _diff(xl.grad, shard_sequence(x.grad, rank, ws)),
                                      max(_diff(got[n], ref[n]) for n in ref))
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="PyTorch's CP path needs CUDA SDPA on 2 GPUs")
@pytest.mark.timeout(300)
def test_pytorch_context_parallel_on_cuda_equals_full_attention():
    """implementation="torch" (PyTorch's DTensor ring attention) gives full attention's outputs and gradients."""
    results = spawn(_torch_implementation, 2, timeout=240, backend="nccl")
    for key, diff in results[0].items():
        assert diff <= 1e-4, (key, diff)  # fp32 on GPU kernels (TF32 off by default for SDPA in fp32)
