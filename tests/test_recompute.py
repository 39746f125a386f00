"""Recompute: same gradients as no recompute, measured activation savings, clean parameter names, bad input."""

import copy

import pytest
import torch
import torch.nn as nn

from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives import Recompute, activation_memory, apply_recompute
from curry_train.primitives.recompute import MODES, apply_recompute_from_config, parse_recompute

CFG = GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=64)


def _model(cfg=CFG, mode=None, **kw):
    torch.manual_seed(0)
    m = GPT(cfg)
    if mode:
        apply_recompute(m, mode, **kw)
    return m


def _batch(b=4, t=64):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (b, t), generator=g), torch.randint(0, 256, (b, t), generator=g)


def _grads(model, x, y, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), loss_sum.item() / n


@pytest.fixture(scope="module")
def memory():
    x, y = _batch()
    return {mode: activation_memory(_model(mode=mode), (x, y)) for mode in (None, "full", "selective")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_gradients_equal_no_recompute(mode):
    x, y = _batch()
    g_ref, l_ref = _grads(_model(), x, y)
    g, loss = _grads(_model(mode=mode), x, y)
    assert loss == l_ref
    assert (g - g_ref).abs().max().item() <= 1e-6


def test_dropout_masks_replayed_with_preserve_rng_state():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.2)
    x, y = _batch(4, 32)
    g_ref, _ = _grads(_model(cfg), x, y, seed=7)
    g, _ = _grads(_model(cfg, "full"), x, y, seed=7)
    assert (g - g_ref).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_saved_activations_full_le_quarter_and_selective_in_between(memory):
    none, full, sel = (memory[m]["activation_bytes"] for m in (None, "full", "selective"))
    assert full <= 0.25 * none, memory
    assert full < sel < none, memory
    assert memory["full"]["peak_bytes"] < memory[None]["peak_bytes"], memory


def test_parameter_names_and_state_dict_unchanged():
    plain, rc = _model(), _model(mode="selective")
    assert [n for n, _ in rc.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(rc.state_dict()) == list(plain.state_dict())
    assert isinstance(rc.blocks[0], Recompute) and type(rc.blocks[0]).__name__ == "RecomputeBlock"
    other = GPT(CFG)
    other.load_state_dict(rc.state_dict())  # strict: a checkpoint of the recompute model loads into a plain one
    rc.load_state_dict(plain.state_dict())
    x, _ = _batch()
    torch.testing.assert_close(rc(x), plain(x), rtol=0, atol=0)


def test_every_n_and_copy_and_no_grad():
    m = _model()
    chosen = apply_recompute(m, "full", every_n=2)
    assert chosen == [m.blocks[1], m.blocks[3]]
    assert [isinstance(b, Recompute) for b in m.blocks] == [False, True, False, True]
    c = copy.deepcopy(m)
    assert isinstance(c.blocks[1], Recompute) and c.blocks[1].recompute_mode == "full"
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(c(x), _model()(x), rtol=0, atol=0)


def test_hooks_inside_a_recomputed_block_run_twice():
    """The documented pitfall: hooks on modules inside the block fire again during the recompute (forward
    hooks of the block's last module may not: non-reentrant checkpoint stops recomputing early, once every
    tensor backward needs exists)."""
    x, y = _batch()
    counts = {}
    for mode in (None, "full"):
        m = _model(mode=mode)
        calls = {"ln1": 0, "mlp_pre": 0, "mlp": 0, "block": 0}

        def bump(key):
            return lambda *a: calls.__setitem__(key, calls[key] + 1)

        m.blocks[0].ln1.register_forward_hook(bump("ln1"))
        m.blocks[0].mlp.register_forward_pre_hook(bump("mlp_pre"))
        m.blocks[0].mlp.register_forward_hook(bump("mlp"))
        m.blocks[0].register_forward_hook(bump("block"))
        _grads(m, x, y)
        counts[mode] = calls
    assert counts[None] == {"ln1": 1, "mlp_pre": 1, "mlp": 1, "block": 1}
    assert counts["full"] == {"ln1": 2, "mlp_pre": 2, "mlp": 1, "block": 1}


def test_from_config_accepts_seed_boolean_and_mode_names():
    assert parse_recompute(True) == "full" and parse_recompute(False) is None
    assert parse_recompute("selective") == "selective" and parse_recompute(None) is None
    m = _model()
    assert Recompute.from_config({"recompute": False}, m.blocks[0]) is m.blocks[0]
    assert not isinstance(m.blocks[0], Recompute)
    assert Recompute.from_config({"recompute": True}, m.blocks[0]).recompute_mode == "full"
    assert apply_recompute_from_config(m, {"recompute": "selective", "recompute_every_n": 1}) == "selective"
    assert all(b.recompute_mode == "selective" for b in m.blocks)


def test_bad_input_is_one_clear_error():
    m = _model()
    with pytest.raises(ValueError, match="full.*selective"):
        apply_recompute(m, "everything")
    with pytest.raises(ValueError, match="every_n"):
        apply_recompute(m, "full", every_n=0)
    with pytest.raises(ValueError, match="recompute_every_n"):
        apply_recompute_from_config(m, {"recompute": "full", "recompute_every_n": -1})
    with pytest.raises(ValueError, match="recompute must be"):
        parse_recompute("sometimes")
    with pytest.raises(ValueError, match="block_types"):
        apply_recompute(nn.Sequential(nn.Linear(2, 2)), "full")
    assert not any(isinstance(b, Recompute) for b in m.blocks)


@pytest.mark.slow
def test_recompute_bench_reports_what_activation_memory_measures(capsys):
    from curry_train.bench.recompute import bench_recompute
    from curry_train.config import load_config

    cfg = load_config(["model.n_layer=4", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                       "train.batch_size=4", "train.seq_len=32", "bench.burn_in=1", "bench.repeats=2",
                       "bench.steps_per_repeat=1", "data.max_bytes=20000"])
    out = bench_recompute(cfg)
    rows = {r["mode"]: r for r in out["rows"]}
    assert list(rows) == ["none", "full", "selective", "full every 2nd"]
    assert rows["none"]["activation_ratio"] == rows["none"]["time_ratio"] == 1.0
    assert rows["full"]["activation_ratio"] <= 0.25
    assert rows["full"]["activation_bytes"] < rows["full every 2nd"]["activation_bytes"] < rows["none"]["activation_bytes"]
    assert rows["full"]["activation_bytes"] < rows["selective"]["activation_bytes"] < rows["none"]["activation_bytes"]
    assert all(r["step_ms"] > 0 and r["peak_bytes"] > 0 for r in rows.values())
    assert "target: full keeps" in capsys.readouterr().out


def test_a_bad_mode_leaves_the_block_untouched():
    block = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).blocks[0]
    before = type(block)
    with pytest.raises(ValueError, match="mode"):
        Recompute(block, mode="bad")
    assert type(block) is before  # not left half-converted (class changed, no recompute_mode)
    block(torch.randn(1, 4, 32))
