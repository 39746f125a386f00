"""Recompute (activation checkpointing) on a torchtitan-style decoder: the same gradients as no recompute in every
mode, less activation memory as measured by ``activation_memory``, parameter names unchanged, clear errors."""

import copy

import pytest
import torch
import torch.nn as nn

from curry_train.primitives.recompute import MODES, Recompute, activation_memory, apply_recompute, parse_recompute
from standalone_helpers import grads, make_batch, max_diff, tiny_decoder, token_loss


def _model(mode=None, **kw):
    model = tiny_decoder(dim=64, n_layers=4, n_heads=4, dropout=kw.pop("dropout", 0.0))
    if mode:
        apply_recompute(model, mode, **kw)
    return model


def _loss_and_grads(model, x, y, seed=0):
    torch.manual_seed(seed)  # dropout masks
    loss_sum, n = token_loss(model(x), y)
    (loss_sum / n).backward()
    return (loss_sum / n).item(), grads(model)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_no_recompute(mode):
    """Every mode recomputes the same numbers: equal loss, gradients within 1e-6."""
    x, y = make_batch(rows=4, seq=32, padded=True)
    ref_loss, ref = _loss_and_grads(_model(), x, y)
    loss, got = _loss_and_grads(_model(mode), x, y)
    assert loss == ref_loss
    assert max_diff(got, ref) <= 1e-6


def test_dropout_masks_are_replayed_in_the_recompute():
    """preserve_rng_state=True (the default): the recomputed forward draws the same dropout masks."""
    x, y = make_batch(rows=4, seq=32)
    _, ref = _loss_and_grads(_model(dropout=0.2), x, y, seed=7)
    _, got = _loss_and_grads(_model("full", dropout=0.2), x, y, seed=7)
    assert max_diff(got, ref) <= 1e-6


@pytest.fixture(scope="module")
def memory():
    x, y = make_batch(rows=4, seq=64)
    return {mode: activation_memory(_model(mode), (x, y), peak=mode != "selective") for mode in (None, *MODES)}


def test_full_keeps_far_fewer_activations_and_selective_sits_in_between(memory):
    """Bytes alive at the end of forward: full <= 1/4 of none (4 blocks keep only their inputs), selective keeps
    the matmul and attention outputs; full also lowers the peak over forward + backward."""
    none, full, sel = (memory[m]["activation_bytes"] for m in (None, "full", "selective"))
    assert 0 < full <= 0.25 * none, memory
    assert full < sel < none, memory
    assert 0 < memory["full"]["peak_bytes"] < memory[None]["peak_bytes"], memory


def test_blocks_are_reclassed_in_place_and_names_do_not_change():
    """apply_recompute finds the ``layers`` ModuleDict; state_dict keys are the plain model's both ways."""
    plain, rc = _model(), _model()
    chosen = apply_recompute(rc, "selective", every_n=2)
    assert chosen == [rc.layers["1"], rc.layers["3"]]
    assert [isinstance(b, Recompute) for b in rc.layers.values()] == [False, True, False, True]
    assert type(rc.layers["1"]).__name__ == "RecomputeTransformerBlock" and rc.layers["1"].recompute_mode == "selective"
    assert list(rc.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(rc.state_dict())  # strict: a recompute checkpoint loads into the plain model
    x, _ = make_batch(rows=2, seq=16)
    assert torch.equal(rc(x), plain(x))


def test_single_block_copy_and_no_grad():
    """Recompute(block) returns the block itself; deepcopy keeps the mode; under no_grad nothing is checkpointed."""
    model = _model()
    block = model.layers["0"]
    assert Recompute(block, mode="full") is block and isinstance(block, Recompute)
    clone = copy.deepcopy(model)
    assert clone.layers["0"].recompute_mode == "full"
    x, _ = make_batch(rows=2, seq=16)
    with torch.no_grad():
        assert torch.equal(clone(x), _model()(x))


def test_parse_recompute_accepts_booleans_and_mode_names():
    """Config values true/false/off/mode names map to a mode or None; from_config leaves the block alone when off."""
    assert parse_recompute(True) == "full" and parse_recompute(False) is None and parse_recompute("off") is None
    assert parse_recompute("Selective") == "selective"
    block = _model().layers["0"]
    assert Recompute.from_config({"recompute": False}, block) is block and not isinstance(block, Recompute)
    assert Recompute.from_config({"recompute": "full"}, block).recompute_mode == "full"


def test_bad_mode_every_n_and_blockless_model_are_clear_errors():
    """Unknown mode, every_n=0, a model without blocks, a non-module: one clear ValueError each."""
    model = _model()
    with pytest.raises(ValueError, match=r"^recompute mode must be one of full, selective, got 'everything'$"):
        apply_recompute(model, "everything")
    with pytest.raises(ValueError, match=r"^recompute mode must be one of full, selective, got 'fast'$"):
        Recompute(nn.Linear(2, 2), mode="fast")
    with pytest.raises(ValueError, match=r"^every_n must be a positive integer \(1 = every block\), got 0$"):
        apply_recompute(model, "full", every_n=0)
    with pytest.raises(ValueError, match="recompute must be false, true"):
        parse_recompute("sometimes")
    with pytest.raises(ValueError, match=r"Sequential.*block_types"):
        apply_recompute(nn.Sequential(nn.Linear(2, 2)), "full")
    with pytest.raises(ValueError, match="needs an nn.Module block"):
        Recompute(lambda x: x)
    assert not any(isinstance(b, Recompute) for b in model.layers.values()), "a failed call changes nothing"
