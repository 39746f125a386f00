"""``python -m curry_train bench ga``: gradient-accumulation parity, K=1 against K=4 on one global batch.

The configured model (``user_model``: the GPT, or ``model._target_``; its ``train.loss`` if named) and one global
batch of ``train.batch_size x train.seq_len``, fixed-length and padded
(``Batches(variable_length=True)``: rows of random length, padded targets ignored). The batch runs as one
micro-batch (K=1, the reference) and as K=4 micro-batches, normalised by tokens (``GradientAccumulation``'s
default: divide by the step's valid-token count) and by micro-batches (the classic mean of K per-micro-batch
means). Per case: ``|loss diff|`` and max |grad(K=4) - grad(K=1)| / max |grad(K=1)|.

No pass/fail line: token normalisation should match K=1 to float rounding on both batches; the mean of means
matches only when every micro-batch holds as many valid tokens (fixed length) and differs on padded batches.
"""

from __future__ import annotations

import torch

from ..data import Batches
from ..loop import accumulate_gradients
from ..primitives import GradientAccumulation
from ..user_model import model_name
from .common import build_model_and_batches, grad_vector, user_loss


def ga_parity(model, x, y, k: int, normalization: str, loss_fn=None) -> tuple[float, torch.Tensor]:
    """Loss and flattened gradient of one global batch processed as ``k`` micro-batches (``loss_fn``: the user's
    ``train.loss``, None = the loop's token loss)."""
    ga = GradientAccumulation(k, normalization=normalization)
    micro = list(zip(x.chunk(k), y.chunk(k)))
    model.zero_grad(set_to_none=True)
    loss_sum, n = accumulate_gradients(model, micro, ga, loss_fn=loss_fn)
    return loss_sum.item() / n, grad_vector(model)


def bench_ga_parity(cfg, k: int = 4) -> dict:
    """Max |grad(K=k) - grad(K=1)| relative to max |grad(K=1)|, for fixed and padded batches, both normalisations."""
    model, batches = build_model_and_batches(cfg)
    loss_fn = user_loss(cfg)
    rows = []
    for variable_length in (False, True):
        data = Batches(batches.tokens, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.seed,
                       variable_length=variable_length, min_len=cfg.data.min_len)
        x, y = data.global_batch(0)
        loss_ref, g_ref = ga_parity(model, x, y, 1, "tokens", loss_fn)
        for normalization in ("tokens", "microbatches"):
            loss_k, g_k = ga_parity(model, x, y, k, normalization, loss_fn)
            rows.append({
                "batch": "padded" if variable_length else "fixed-length",
                "normalization": normalization,
                "loss_diff": abs(loss_k - loss_ref),
                "grad_rel_err": ((g_k - g_ref).abs().max() / g_ref.abs().max()).item(),
            })
    print(f"GA parity on {model_name(cfg)}: K=1 vs K={k} on one global batch of {cfg.train.batch_size}x"
          f"{cfg.train.seq_len}")
    print(f"  {'batch':13s} {'normalization':13s} {'|loss diff|':>12s} {'max rel grad err':>17s}")
    for r in rows:
        print(f"  {r['batch']:13s} {r['normalization']:13s} {r['loss_diff']:12.2e} {r['grad_rel_err']:17.2e}")
    return {"k": k, "rows": rows}
