"""The primitives on models nobody here wrote: tiny Hugging Face Llama and GPT-2 and a torchtitan-like model.

Recompute (gradient parity, activation bytes, no KV cache written twice), gradient accumulation normalised by
``count_target_tokens`` on padded, unevenly split Hugging Face batches, FSDP2 ``full`` with one unit per decoder
layer, and block discovery (``nn.ModuleDict`` found, a model without blocks refused by name).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import foreign_models
from curry_train.distributed import launch
from curry_train.loop import accumulate_gradients
from curry_train.primitives import (DistributedOptimizer, GradientAccumulation, NoBlocksError, activation_memory,
                                    apply_recompute, count_target_tokens, find_blocks, forward_loss_sum)

LR, STEPS = 3e-3, 3


class Flat(nn.Module):
    """No block container anywhere: two Linear attributes."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


def _lm_batch(form: str, b: int = 4, t: int = 64):
    ids = torch.randint(0, foreign_models.VOCAB, (b, t + 1), generator=torch.Generator().manual_seed(1))
    if form == "dict":  # Hugging Face: labels = input ids, shifted inside the loss
        return {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}
    return ids[:, :-1], ids[:, 1:]  # (x, y): targets aligned with the logits


def _padded_batch(rows: int = 4, t: int = 32, lengths=(32, 20, 9, 25), seed: int = 4) -> dict:
    """Right-padded rows (pad id 0, labels -100 past each row's length), Hugging Face keys."""
    ids = torch.randint(1, foreign_models.VOCAB, (rows, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(t)[None, :] < torch.tensor(lengths[:rows])[:, None]
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long(),
            "labels": ids.masked_fill(~mask, -100)}


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _grads(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss_sum, n = forward_loss_sum(model, batch)
    (loss_sum / n).backward()
    return _flat_grad(model)


CASES = [("llama", "dict"), ("llama", "pair"), ("gpt2", "dict"), ("gpt2", "pair"), ("titan", "pair")]


@pytest.mark.parametrize("name,form", CASES, ids=[f"{n}-{f}" for n, f in CASES])
@pytest.mark.slow
def test_recompute_parity_and_activation_memory(name, form):
    factory, batch = foreign_models.FACTORIES[name], _lm_batch(form)
    reference = _grads(factory(n_layer=4), batch)
    saved = {None: activation_memory(factory(n_layer=4), batch, peak=False)["activation_bytes"]}
    for mode in ("full", "selective"):
        model = factory(n_layer=4)
        chosen = apply_recompute(model, mode)  # no block_types: found at model.layers / transformer.h / layers
        assert len(chosen) == 4 and chosen == find_blocks(model)
        assert (_grads(model, batch) - reference).abs().max().item() <= 1e-6, (name, form, mode)
        saved[mode] = activation_memory(model, batch, peak=False)["activation_bytes"]
    ratios = {mode: round(saved[mode] / saved[None], 3) for mode in ("full", "selective")}
    print(f"{name} {form} activation ratio vs none: {ratios}")
    assert saved["full"] < saved["selective"] < saved[None], saved


def test_titan_blocks_in_a_moduledict_are_found():
    model = foreign_models.titan_like()
    assert isinstance(model.layers, nn.ModuleDict)
    assert find_blocks(model) == list(model.layers.values())
    apply_recompute(model, "full", every_n=2)
    assert find_blocks(model) == list(model.layers.values())  # a half-recomputed stack is still one kind of block


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_recompute_writes_no_kv_cache(name):
    """HF decoders default to use_cache=True in training; the recompute in backward must not append the keys
    and values a second time (before the fix the returned cache held 2T positions)."""
    x = _lm_batch("pair", b=2, t=16)[0]
    model = foreign_models.FACTORIES[name]()
    assert model(input_ids=x, use_cache=True).past_key_values.get_seq_length() == 16
    apply_recompute(model, "full")
    out = model(input_ids=x, use_cache=True)
    out.logits.float().sum().backward()
    cache = out.past_key_values
    assert cache is None or cache.get_seq_length() == 0
    with torch.no_grad():  # nothing is checkpointed without gradients: generation keeps its cache
        assert model(input_ids=x, use_cache=True).past_key_values.get_seq_length() == 16


def test_no_blocks_is_an_error_naming_the_class_and_block_types():
    with pytest.raises(NoBlocksError, match=r"Flat.*block_types"):
        apply_recompute(Flat(), "full")
    with pytest.raises(NoBlocksError, match=r"Flat.*full.*block_types"):  # before any process group
        DistributedOptimizer.wrap(Flat(), "full")
    with pytest.raises(NoBlocksError, match=r"^found no transformer blocks in Flat"):  # no "parallel." prefix
        DistributedOptimizer.from_config({"sharding": "shard_grad_op"}, Flat())
    assert len(apply_recompute(Flat(), "full", block_types=nn.Linear)) == 2


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_grad_accum_counts_shifted_labels(name):
    """3 + 1 padded rows vs the HF full-batch loss: count_target_tokens (n - 1 targets per row) gives the
    full-batch gradient; counting labels != -100 over-counts by one per row."""
    batch = _padded_batch()
    micro = [_rows(batch, 0, 3), _rows(batch, 3, 4)]
    model = foreign_models.FACTORIES[name]()
    model.zero_grad()
    model(**batch).loss.backward()  # HF's own shifted, mean-over-valid-labels loss
    reference = _flat_grad(model)

    assert [int(count_target_tokens(m)) for m in micro] == [58, 24]
    accumulate_gradients(model, micro, GradientAccumulation(2))
    error = ((_flat_grad(model) - reference).norm() / reference.norm()).item()

    naive = [(m["labels"] != -100).sum() for m in micro]
    assert [int(c) for c in naive] == [61, 25]
    ga = GradientAccumulation(2)
    ga.plan(naive)
    model.zero_grad()
    for i, m in enumerate(micro):
        ga.backward_loss(forward_loss_sum(model, m)[0], naive[i], i).backward()
    naive_error = ((_flat_grad(model) - reference).norm() / reference.norm()).item()
    print(f"{name}: relative gradient error {error:.1e} with count_target_tokens, {naive_error:.1e} unshifted")
    assert error <= 1e-5 and naive_error > 100 * error, (error, naive_error)


def _fsdp2_on_foreign_models(rank, ws):
    import foreign_models
    from torch.distributed.fsdp import FSDPModule

    out = {}
    batch = _padded_batch(rows=8, lengths=(32, 20, 9, 25, 31, 12, 32, 5))
    mine = _rows(batch, 4 * rank, 4 * rank + 4)
    micro = [_rows(mine, 0, 3), _rows(mine, 3, 4)]  # uneven: 3 + 1 rows, different valid counts per rank
    for sharding in ("no_shard", "full"):
        d = DistributedOptimizer.wrap(foreign_models.tiny_llama(), sharding, lr=LR)
        ga, losses = GradientAccumulation(2), []
        for _ in range(STEPS):
            loss_sum, n = accumulate_gradients(d.model, micro, ga)
            d.optimizer.step()
            t = torch.tensor([loss_sum.item(), float(n)], dtype=torch.float64)
            dist.all_reduce(t)
            losses.append((t[0] / t[1]).item())
        out[sharding] = {"losses": losses, "memory": d.memory_report()}
        if sharding == "full":
            layers = d.model.model.layers
            out["units"] = [isinstance(layer, FSDPModule) and type(layer).__name__.startswith("FSDP")
                            for layer in layers] + [isinstance(d.model, FSDPModule)]
    titan = DistributedOptimizer.wrap(foreign_models.titan_like(), "full", lr=LR)  # no block_types
    x, y = _lm_batch("pair", b=2, t=16)
    loss_sum, n = forward_loss_sum(titan.model, (x, y))
    (loss_sum / n).backward()
    titan.optimizer.step()
    out["titan_units"] = [isinstance(b, FSDPModule) for b in titan.model.layers.values()]
    try:
        DistributedOptimizer.wrap(Flat(), "full", lr=LR)
        out["flat_error"] = None
    except NoBlocksError as e:  # raised before any collective, on every rank alike
        out["flat_error"] = str(e)
    return out


@pytest.mark.slow
def test_fsdp2_full_shards_each_hf_decoder_layer():
    results = launch(_fsdp2_on_foreign_models, 2, timeout=300)
    for r in results:
        assert r["units"] == [True, True, True], r["units"]  # 2 decoder layers + the root
        assert r["titan_units"] == [True, True]
        assert "Flat" in r["flat_error"] and "block_types" in r["flat_error"]
        ddp, full = r["no_shard"]["memory"], r["full"]["memory"]
        for part in ("params", "grads", "optimizer_state", "total"):
            assert abs(full[part] / (ddp[part] / 2) - 1) <= 0.01, (part, full, ddp)
        assert max(abs(a - b) for a, b in zip(r["full"]["losses"], r["no_shard"]["losses"])) <= 1e-5, r
    assert results[0]["full"]["losses"] == results[1]["full"]["losses"]
