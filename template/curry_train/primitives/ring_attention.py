"""Ring attention, the algorithm under context parallelism (CP): ``cp`` ranks share every sequence, each holding ``N/cp`` of its tokens; attention
over the whole sequence is computed by ring attention (Liu et al. 2023, "Ring Attention with Blockwise
Transformers"). Everything outside attention (projections, norms, MLPs, the loss) is per token and runs on the
local tokens unchanged.

Ring attention. Rank ``r`` keeps its queries; the key/value blocks travel round the ring ``r -> r+1``. At step
``s = 0 .. cp-1`` rank ``r`` holds the K/V block of rank ``(r - s) mod cp``; the transfer of that block to the
next rank is posted (``dist.batch_isend_irecv`` of ``P2POp(isend)``/``P2POp(irecv)``) before the partial
attention of the local queries against it is computed, so communication overlaps compute. Each partial result
``part`` comes with its log-sum-exp ``lse_part = log sum_j exp(q.k_j * scale)`` and is merged into the running
output in fp32 by the LSE rule::

    lse_new = log(exp(lse) + exp(lse_part))
    out     = out * exp(lse - lse_new) + part * exp(lse_part - lse_new)

which gives exactly ``softmax(QK^T*scale) V`` over all keys once every block has visited.

Backward (exact, the standard ring-attention backward, nothing of the forward's probabilities is kept): with the
saved global ``LSE`` and ``D = rowsum(dO * O)``, per visiting block ``P = exp(QK^T*scale - LSE)``,
``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D)``, ``dQ += dS K * scale``, ``dK += dS^T Q * scale``.
K/V go round the ring again together with their dK/dV accumulators; after ``cp`` steps each rank's dK/dV
arrive back at their owner.

Memory and communication per rank and layer (B batch, H query heads, H_kv key/value heads, D head dim):

* attention memory ``O(B*H*(N/cp)^2)`` per rank instead of ``O(B*H*N^2)``: a rank never holds more than one
  ``N/cp x N/cp`` block of scores (the ``"math"`` block kernel materialises it in fp32; the default fused CPU
  flash kernel tiles even that), and the bytes saved for backward (q, k, v, out, lse: ``O(B*H*(N/cp)*D)``) are
  ``1/cp`` of full attention's;
* forward: ``cp - 1`` K/V block transfers of ``2*B*H_kv*(N/cp)*D`` elements each (GQA blocks travel
  un-repeated); backward: ``cp - 1`` more K/V transfers plus ``cp`` dK/dV transfers of the same size in fp32.

Causal load balancing. Under a causal mask, contiguous shards would give the last rank ``2*cp - 1`` times the
work of the first. The sequence is cut into ``2*cp`` chunks and rank ``r`` holds chunks ``r`` and
``2*cp - 1 - r`` (a head and a tail), so every rank does the same work: ``shard_sequence``/``unshard_sequence``
apply and undo that layout, ``positions`` gives each rank the global token positions it holds (for position
embeddings / RoPE). Between a local query chunk and a visiting key chunk the mask follows from their global
positions: full (key chunk earlier), the diagonal triangle (same chunk) or nothing (key chunk later: its compute
is skipped). ``load_balance=False`` everywhere selects plain contiguous shards (rank ``r`` holds chunks ``2r`` and
``2r+1``); non-causal attention works with either layout. The sequence length must be divisible by ``2*cp``.

Kernels. Each block is computed by PyTorch's fused CPU flash-attention kernel and its backward
(``kernel="flash_cpu"``, the default for CPU tensors) or by plain matmul + logsumexp in fp32 (``kernel="math"``, any
device); both are tested on CPU with gloo against full ``scaled_dot_product_attention``. ``context_parallel`` wraps
attention modules so that their SDPA calls run this.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._checks import boolean, choice, integer, positive_int

_KV_TAG, _DKV_TAG = 7301, 7302  # distinct gloo tags: K/V and dK/dV transfers between the same two ranks

# bytes this process sent / received in ring transfers while ``track_communication()`` is active
_traffic: list[dict] = []


# -- layout ---------------------------------------------------------------------------------------------------------

def chunk_ids(cp_rank: int, cp_size: int, load_balance: bool = True) -> tuple[int, int]:
    """The two of the ``2*cp_size`` sequence chunks rank ``cp_rank`` holds, in local order: ``(r, 2*cp-1-r)``
    (load-balanced) or ``(2r, 2r+1)`` (contiguous)."""
    cp_size = positive_int("cp_size", cp_size)
    cp_rank = integer("cp_rank", cp_rank, 0, cp_size - 1)
    if boolean("load_balance", load_balance):
        return cp_rank, 2 * cp_size - 1 - cp_rank
    return 2 * cp_rank, 2 * cp_rank + 1


def _check_divisible(seq_len: int, cp_size: int, what: str = "sequence length") -> None:
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"{what} {seq_len} is not divisible by 2*cp = {2 * cp_size} (cp = {cp_size}): context parallelism cuts "
            f"every sequence into 2*cp chunks (rank r holds chunks r and 2*cp-1-r); pad or crop it to a multiple "
            f"of {2 * cp_size}"
        )


def shard_sequence(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1,
                   load_balance: bool = True) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (the sequence dimension: 1 for ``[B, N, ...]``
    tokens or hidden states, 2 for ``[B, H, N, D]`` q/k/v): chunks ``chunk_ids(cp_rank, cp_size)`` of ``2*cp``
    equal chunks, concatenated (``N/cp`` tokens). ``N`` must be divisible by ``2*cp``; ``cp_size=1`` returns ``x``."""
    a, b = chunk_ids(cp_rank, cp_size, load_balance)
    if cp_size == 1:
        return x
    _check_divisible(x.size(dim), cp_size)
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat([chunks[a], chunks[b]], dim)


def positions(cp_rank: int, cp_size: int, seq_len: int, load_balance: bool = True) -> torch.Tensor:
    """The global positions (int64, in local order) of the ``seq_len/cp`` tokens rank ``cp_rank`` holds: what
    position embeddings and RoPE must use instead of ``arange(N/cp)``. ``shard_sequence(arange(seq_len))``."""
    seq_len = positive_int("seq_len", seq_len)
    return shard_sequence(torch.arange(seq_len), cp_rank, cp_size, dim=0, load_balance=load_balance)


def _group_size_rank(cp_group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context parallelism needs an initialized process group: call "
                         f"torch.distributed.init_process_group() first (cp_group={cp_group!r})")
    return dist.get_world_size(cp_group), dist.get_rank(cp_group)


def unshard_sequence(local: torch.Tensor, cp_group, dim: int = 1, load_balance: bool = True) -> torch.Tensor:
    """The full tensor from every rank's shard (all-gather over ``cp_group``, chunks put back in sequence order):
    the inverse of ``shard_sequence``. Values only (no autograd): for evaluation, logging and tests."""
    size, _ = _group_size_rank(cp_group)
    if size == 1:
        return local.detach()
    if local.size(dim) % 2:
        _check_divisible(local.size(dim) * size, size)
    local = local.detach().contiguous()
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local, group=cp_group)
    chunks = [None] * (2 * size)
    for r, t in enumerate(gathered):
        a, b = chunk_ids(r, size, load_balance)
        chunks[a], chunks[b] = t.chunk(2, dim)
    return torch.cat(chunks, dim)


# -- ring attention -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def track_communication():
    """Count the ring transfers this process makes inside the block: yields a dict whose ``sent_bytes``,
    ``recv_bytes`` and ``messages`` (sends) grow as ``ring_attention`` forwards and backwards run."""
    stats = {"sent_bytes": 0, "recv_bytes": 0, "messages": 0}
    _traffic.append(stats)
    try:
        yield stats
    finally:
        _traffic.remove(stats)


def ring_bytes_per_forward(batch: int, kv_heads: int, local_len: int, head_dim: int, cp_size: int,
                           element_size: int = 4) -> int:
    """Bytes one rank sends in one ``ring_attention`` forward: ``(cp - 1) * 2 * B * H_kv * (N/cp) * D`` elements."""
    return (cp_size - 1) * 2 * batch * kv_heads * local_len * head_dim * element_size


def _exchange(send: torch.Tensor, group, size: int, rank: int, tag: int):
    """Post ``send`` to the next rank of the ring and a receive from the previous one; ``(recv, works)``."""
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % size, tag=tag),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % size, tag=tag),
    ])
    nbytes = send.numel() * send.element_size()
    for stats in _traffic:
        stats["sent_bytes"] += nbytes
        stats["recv_bytes"] += nbytes
        stats["messages"] += 1
    return recv, works


def _wait(works) -> None:
    for w in works:
        w.wait()


def _plan(q_chunks, k_chunks, n_q: int, n_k: int, causal: bool) -> list[tuple[int, int, int, int, bool]]:
    """The blocks of local queries x visiting keys to compute: ``(q_start, q_end, k_start, k_end, diagonal)``.

    Non-causal: everything. Causal: for each local query chunk, the visiting key chunks before it in the sequence
    (full) and the same chunk (the lower triangle); later chunks are skipped. Both layouts list a rank's chunks in
    increasing order, so the full key chunks are a prefix; query chunks needing the same full key range are merged."""
    if not causal:
        return [(0, n_q, 0, n_k, False)]
    c = n_q // 2
    blocks = []
    for a, qc in enumerate(q_chunks):
        earlier = sum(1 for kc in k_chunks if kc < qc)
        if earlier:
            prev = blocks[-1] if blocks else None
            if prev and not prev[4] and prev[1] == a * c and prev[3] == earlier * c:  # same keys: one taller block
                blocks[-1] = (prev[0], (a + 1) * c, 0, earlier * c, False)
            else:
                blocks.append((a * c, (a + 1) * c, 0, earlier * c, False))
        if qc in k_chunks:
            b = k_chunks.index(qc)
            blocks.append((a * c, (a + 1) * c, b * c, (b + 1) * c, True))
    return blocks


def _repeat_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: key/value head ``h`` serves query heads ``h*groups .. (h+1)*groups-1`` (SDPA's ``enable_gqa``)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


# -- per-block kernels: partial attention with its log-sum-exp, and the block backward from the global O and LSE ----

def _masked_scores(q, k, scale: float, diagonal: bool) -> torch.Tensor:
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if diagonal:  # a query chunk against itself: key j > query i is in the future
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _math_forward(q, k, v, scale: float, diagonal: bool):
    """``(softmax(q k^T * scale) v, logsumexp(q k^T * scale))`` in fp32; on a diagonal block the upper triangle is
    masked."""
    s = _masked_scores(q.float(), k.float(), scale, diagonal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()), lse


def _math_backward(do, q, k, v, out, lse, scale: float, diagonal: bool):
    """``P = exp(QK^T*scale - LSE)``, ``D = rowsum(dO*O)``, ``dV = P^T dO``, ``dS = P*(dO V^T - D)``,
    ``dQ = dS K * scale``, ``dK = dS^T Q * scale``; fp32, ``out``/``lse`` the global (merged) ones."""
    q, k, v, do = q.float(), k.float(), v.float(), do.float()
    p = torch.exp(_masked_scores(q, k, scale, diagonal) - lse.unsqueeze(-1))
    delta = (do * out.float()).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - delta)
    return (torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale,
            torch.matmul(p.transpose(-1, -2), do))


def _flash_cpu_forward(q, k, v, scale: float, diagonal: bool):
    """PyTorch's fused CPU flash kernel (what ``F.scaled_dot_product_attention`` runs on CPU): ``_math_forward``'s
    contract with the scores tiled instead of materialised; output in the input dtype, LSE in fp32."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, diagonal, scale=scale)


def _flash_cpu_backward(do, q, k, v, out, lse, scale: float, diagonal: bool):
    """The fused CPU flash backward given the *global* ``out`` and ``lse``: ``_math_backward``'s formulas."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, diagonal, scale=scale)


KERNELS = {"flash_cpu": (_flash_cpu_forward, _flash_cpu_backward), "math": (_math_forward, _math_backward)}


def _kernel_for(kernel: str, q: torch.Tensor) -> str:
    kernel = choice("kernel", kernel, ("auto", *KERNELS))
    flash = q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    if kernel == "flash_cpu" and not flash:
        raise ValueError(f"kernel='flash_cpu' needs CPU tensors, got {q.device}; use kernel='auto' or 'math'")
    return kernel if kernel != "auto" else ("flash_cpu" if flash else "math")


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, size, rank, causal, scale, load_balance, kernel):
        block_forward = KERNELS[kernel][0]
        groups = q.size(1) // k.size(1)
        n_q, n_k = q.size(2), k.size(2)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()  # one message per step, in the input dtype, un-repeated heads
        my_chunks = chunk_ids(rank, size, load_balance)
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:  # the next block is on its way while this one is computed
                kv_next, works = _exchange(kv, group, size, rank, _KV_TAG)
            kb, vb = (_repeat_kv(t, groups) for t in kv.unbind(0))
            for q0, q1, k0, k1, diagonal in _plan(my_chunks, chunk_ids(src, size, load_balance), n_q, n_k, causal):
                part, lse_part = block_forward(q[:, :, q0:q1], kb[:, :, k0:k1], vb[:, :, k0:k1], scale, diagonal)
                old = lse[:, :, q0:q1]
                new = torch.logaddexp(old, lse_part)  # every row of a block has >= 1 unmasked key: finite
                out[:, :, q0:q1] = (out[:, :, q0:q1] * torch.exp(old - new).unsqueeze(-1)
                                    + part.float() * torch.exp(lse_part - new).unsqueeze(-1))
                lse[:, :, q0:q1] = new
            if step < size - 1:
                _wait(works)
                kv = kv_next
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.ring = (group, size, rank, causal, scale, load_balance, kernel)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, size, rank, causal, scale, load_balance, kernel = ctx.ring
        block_backward = KERNELS[kernel][1]
        groups = q.size(1) // k.size(1)
        n_q, n_k = q.size(2), k.size(2)
        dout = dout.to(q.dtype)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        my_chunks = chunk_ids(rank, size, load_balance)
        dkv_in, dkv_works = None, None
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:
                kv_next, kv_works = _exchange(kv, group, size, rank, _KV_TAG)
            kb, vb = (_repeat_kv(t, groups) for t in kv.unbind(0))
            dk = torch.zeros(kb.shape, dtype=torch.float32, device=q.device)
            dv = torch.zeros_like(dk)
            for q0, q1, k0, k1, diagonal in _plan(my_chunks, chunk_ids(src, size, load_balance), n_q, n_k, causal):
                dq_b, dk_b, dv_b = block_backward(dout[:, :, q0:q1], q[:, :, q0:q1], kb[:, :, k0:k1], vb[:, :, k0:k1],
                                                  out[:, :, q0:q1], lse[:, :, q0:q1], scale, diagonal)
                dq[:, :, q0:q1] += dq_b
                dk[:, :, k0:k1] += dk_b
                dv[:, :, k0:k1] += dv_b
            if groups > 1:  # sum the repeated heads' gradients back onto their key/value head
                dk, dv = (t.unflatten(1, (k.size(1), groups)).sum(2) for t in (dk, dv))
            dkv = torch.stack([dk, dv])
            if dkv_works is not None:  # the partial dK/dV of this block from the ranks it visited before
                _wait(dkv_works)
                dkv = dkv + dkv_in
            dkv_in, dkv_works = _exchange(dkv, group, size, rank, _DKV_TAG)  # the last one goes home to its owner
            if step < size - 1:
                _wait(kv_works)
                kv = kv_next
        _wait(dkv_works)
        dk, dv = dkv_in.unbind(0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _check_qkv(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"ring_attention needs q, k, v shaped (B, H, N_local, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"ring_attention: k and v must have the same shape and q the same batch and head dim, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.size(1) % k.size(1):
        raise ValueError(f"ring_attention: {q.size(1)} query heads are not a multiple of {k.size(1)} key/value heads")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group, causal: bool = True,
                   scale: float | None = None, load_balance: bool = True, kernel: str = "auto") -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence, every rank of ``cp_group`` holding a shard.

    ``q`` ``(B, H, N/cp, D)``, ``k``/``v`` ``(B, H_kv, N/cp, D)`` with ``H`` a multiple of ``H_kv`` (GQA: kv head
    ``h`` serves query heads ``h*H/H_kv ..``), each the ``shard_sequence(..., dim=2)`` of the full tensors.
    Returns this rank's shard of ``F.scaled_dot_product_attention(Q, K, V, is_causal=causal, scale=scale)``;
    differentiable (exact ring backward; dK/dV of the local K/V include every rank's queries). ``scale``
    defaults to ``1/sqrt(D)``. Causal attention needs equal q and k lengths and ``N`` divisible by ``2*cp``.
    Every rank of ``cp_group`` must call it (it communicates), forward and backward. A group of size 1 is
    plain SDPA.

    ``kernel`` computes each block: ``"flash_cpu"`` (PyTorch's fused CPU flash-attention kernel and its backward,
    given the global output and LSE: no score matrix held), ``"math"`` (matmul + logsumexp in fp32, any device,
    one block's scores materialised), ``"auto"``: flash_cpu for CPU tensors, else math."""
    causal, load_balance = boolean("causal", causal), boolean("load_balance", load_balance)
    size, rank = _group_size_rank(cp_group)
    _check_qkv(q, k, v)
    kernel = _kernel_for(kernel, q)
    if size == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.size(1) != k.size(1))
    if causal and q.size(2) != k.size(2):
        raise ValueError(f"causal ring attention needs as many local queries as keys, got {q.size(2)} and {k.size(2)}")
    if causal and q.size(2) % 2:
        _check_divisible(q.size(2) * size, size, what=f"sequence length (local {q.size(2)} x cp {size}) =")
    scale = q.size(-1) ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, cp_group, size, rank, causal, scale, load_balance, kernel)
