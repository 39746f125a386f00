"""``python -m curry_train bench ga``: gradient-accumulation parity, K=1 vs K=4 gradients and losses on one global
batch, fixed-length and padded (variable-length), with token and with micro-batch normalisation."""

from __future__ import annotations

from ..data import Batches
from ..loop import accumulate_gradients
from ..primitives import GradientAccumulation
from .common import build_model_and_batches, grad_vector


def ga_parity(model, x, y, k: int, normalization: str) -> tuple[float, torch.Tensor]:
    """Loss and flattened gradient of one global batch processed as ``k`` micro-batches."""
    ga = GradientAccumulation(k, normalization=normalization)
    micro = list(zip(x.chunk(k), y.chunk(k)))
    model.zero_grad(set_to_none=True)
    loss_sum, n = accumulate_gradients(model, micro, ga)
    return loss_sum.item() / n, grad_vector(model)


def bench_ga_parity(cfg, k: int = 4) -> dict:
    """Max |grad(K=k) - grad(K=1)| relative to max |grad(K=1)|, for fixed and padded batches, both normalisations."""
    model, batches = build_model_and_batches(cfg)
    rows = []
    for variable_length in (False, True):
        data = Batches(batches.tokens, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed,
                       variable_length=variable_length, min_len=cfg.data.min_len)
        x, y = data.global_batch(0)
        loss_ref, g_ref = ga_parity(model, x, y, 1, "tokens")
        for normalization in ("tokens", "microbatches"):
            loss_k, g_k = ga_parity(model, x, y, k, normalization)
            rows.append({
                "batch": "padded" if variable_length else "fixed-length",
                "normalization": normalization,
                "loss_diff": abs(loss_k - loss_ref),
                "grad_rel_err": ((g_k - g_ref).abs().max() / g_ref.abs().max()).item(),
            })
    print(f"GA parity: K=1 vs K={k} on one global batch of {cfg.train.batch_size}x{cfg.train.seq_len}")
    print(f"  {'batch':13s} {'normalization':13s} {'|loss diff|':>12s} {'max rel grad err':>17s}")
    for r in rows:
        print(f"  {r['batch']:13s} {r['normalization']:13s} {r['loss_diff']:12.2e} {r['grad_rel_err']:17.2e}")
    return {"k": k, "rows": rows}
