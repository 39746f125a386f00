"""Reference GPT and embedded data: shapes, parameter/FLOP counts, validation, deterministic batches."""

import pytest
import torch

from curry_train.data import Batches, check_batch_split, load_tokens, split
from curry_train.model import GPT, IGNORE_INDEX, GPTConfig, token_loss


def test_forward_shapes_tied_head_and_param_count():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(cfg)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    assert model.head.weight is model.tok_emb.weight
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    # per block: 2 LayerNorms (2*2d) + qkv (3d*d + 3d) + proj (d*d + d) + fc (4d*d + 4d) + proj (4d*d + d)
    d = 32
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    embeddings = 256 * d + 16 * d
    assert model.n_params() == 2 * block + embeddings + 2 * d  # + final LayerNorm
    assert model.n_params(non_embedding=True) == 2 * block + 2 * d


def test_flops_per_token_formula():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(cfg)
    n = model.n_params(non_embedding=True) + 256 * 32  # the tied head still does a matmul
    assert model.flops_per_token() == 6 * n + 6 * 2 * 32 * 16
    assert model.flops_per_token(seq_len=8) == 6 * n + 6 * 2 * 32 * 8


@pytest.mark.parametrize(
    "kwargs,message",
    [({"n_embd": 30, "n_head": 4}, "divisible by model.n_head"), ({"n_layer": 0}, "model.n_layer must be a positive"),
     ({"dropout": 1.5}, "model.dropout")],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown model key\(s\) \['n_layers'\]"):
        GPTConfig.from_config({"n_layers": 4})


def test_token_loss_ignores_padding():
    logits = torch.randn(2, 4, 256)
    y = torch.randint(0, 256, (2, 4))
    y[1, 2:] = IGNORE_INDEX
    loss_sum, n = token_loss(logits, y)
    assert n.item() == 6
    full = torch.nn.functional.cross_entropy(logits.view(-1, 256), y.view(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss_sum / n, full)


def test_batches_are_deterministic_and_ranks_slice_the_global_batch():
    tokens = load_tokens(None, max_bytes=100_000)
    train, val = split(tokens, 0.1)
    assert train.numel() == 90_000 and val.numel() == 10_000
    b = Batches(train, batch_size=8, seq_len=32, seed=3)
    x1, y1 = b.global_batch(5)
    x2, y2 = Batches(train, batch_size=8, seq_len=32, seed=3).global_batch(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(b.global_batch(6)[0], x1)
    rank1 = b.microbatches(5, rank=1, world_size=2, n_micro=2)
    assert len(rank1) == 2 and torch.equal(torch.cat([m[0] for m in rank1]), x1[4:])


def test_variable_length_rows_are_padded_with_ignored_targets():
    tokens = load_tokens(None, max_bytes=50_000)
    x, y = Batches(tokens, batch_size=16, seq_len=32, seed=0, variable_length=True, min_len=4).global_batch(0)
    valid = (y != IGNORE_INDEX).sum(dim=1)
    assert valid.min() >= 4 and valid.max() <= 32 and len(set(valid.tolist())) > 1
    for row, n in zip(y, valid.tolist()):  # padding is a suffix
        assert (row[:n] != IGNORE_INDEX).all() and (row[n:] == IGNORE_INDEX).all()


def test_batch_split_errors_name_both_numbers():
    with pytest.raises(ValueError, match="train.batch_size=10 is not divisible by the data-parallel world size 4"):
        check_batch_split(10, 4, 1)
    assert check_batch_split(16, 2, 4) == 8


def test_missing_user_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path="):
        load_tokens(str(tmp_path / "missing.txt"))
