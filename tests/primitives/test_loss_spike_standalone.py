"""LossSpikeWatchdog in a loop it has never seen: quiet on noisy LM-like losses and on a single bad batch, fires on
a sustained spike; a loop that rolls back on it (in-memory checkpoints) restores the pre-spike parameters bit for
bit and ends near the clean run; the state survives JSON; bad arguments fail with one line naming the argument."""

import copy
import json
import math
import random

import pytest
import torch

from curry_train.primitives.loss_spike import LossSpikeWatchdog


def lm_like_losses(n, seed=0, sigma=0.08):
    rng = random.Random(seed)
    return [2.0 + 3.5 * math.exp(-i / 60) + rng.gauss(0.0, sigma) for i in range(n)]


@pytest.mark.parametrize("seed", range(3))
def test_quiet_on_noise_and_a_single_bad_batch_fires_on_a_sustained_spike(seed):
    w = LossSpikeWatchdog(threshold_ratio=5.0, sustain_steps=3, min_history=20, window=50)
    losses = lm_like_losses(600, seed)
    losses[300] *= 3.0  # one bad batch
    assert not any(w.observe(i, x) for i, x in enumerate(losses))
    fired = [w.observe(600 + i, 2.5 * w.baseline) for i in range(4)]
    assert fired == [False, False, True, True] and w.spike_start == 600


def run(corrupt=(), rollback=True, steps=60, every=5):
    """Linear regression trained by AdamW; steps in ``corrupt`` get targets x100 (a broken data shard).
    Returns the losses, the parameters right after each rollback and the checkpoint each came from."""
    torch.manual_seed(0)
    w_true = torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    watchdog = LossSpikeWatchdog(threshold_ratio=5.0, sustain_steps=2, min_history=10, window=20)
    saved, restored, losses = {}, [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)  # the data position is the step
        x = torch.randn(32, 8, generator=g)
        y = x @ w_true + 0.1 * torch.randn(32, 1, generator=g)
        if step in corrupt:
            y = y * 100
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        if rollback and watchdog.observe(step, loss.item()):
            good = max(s for s in saved if s < watchdog.spike_start)  # loss at step `good` was seen normal
            model.load_state_dict(saved[good][0])
            optimizer.load_state_dict(saved[good][1])
            restored.append(({k: v.clone() for k, v in model.state_dict().items()}, saved[good][0]))
            watchdog.reset()
            continue  # the next step reads the next step's data: the spike's window is skipped
        optimizer.step()
        if (step + 1) % every == 0 and not watchdog.in_spike:  # never keep a state taken during a spike
            saved[step + 1] = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    return losses, restored


def test_a_loop_rolls_back_bit_exactly_and_ends_near_the_clean_run():
    clean, none = run()
    assert none == []  # no false alarm
    unguarded, _ = run(corrupt=(30, 31), rollback=False)
    guarded, restored = run(corrupt=(30, 31))
    assert len(restored) == 1
    after, checkpoint = restored[0]
    assert all(torch.equal(after[k], checkpoint[k]) for k in checkpoint)
    tail = {name: sum(losses[-5:]) / 5 for name, losses in [("clean", clean), ("unguarded", unguarded),
                                                             ("guarded", guarded)]}
    assert abs(tail["guarded"] - tail["clean"]) < 0.05, tail  # MSE; clean ~0.02: 6 lost updates of 60
    assert tail["guarded"] < tail["unguarded"] / 5, tail  # AdamW's second moment kept the damage without it


def test_state_dict_is_json_and_resumes_the_same_decisions():
    a = LossSpikeWatchdog(sustain_steps=2, min_history=5, window=10)
    for i, x in enumerate(lm_like_losses(30)):
        a.observe(i, x)
    b = LossSpikeWatchdog(sustain_steps=2, min_history=5, window=10)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    tail = [20.0, 3.0, 20.0, 20.0]
    assert [a.observe(30 + i, x) for i, x in enumerate(tail)] == [b.observe(30 + i, x) for i, x in enumerate(tail)]


def test_from_config_reads_a_mapping():
    w = LossSpikeWatchdog.from_config({"threshold_ratio": 3, "sustain_steps": 4, "min_history": 8, "window": 16,
                                       "floor": 1.5, "enabled": True})
    assert (w.threshold_ratio, w.sustain_steps, w.min_history, w.window, w.floor) == (3.0, 4, 8, 16, 1.5)


@pytest.mark.parametrize("kwargs,message", [
    ({"threshold_ratio": 0.9}, r"^threshold_ratio must be a number > 1"),
    ({"sustain_steps": -1}, r"^sustain_steps must be a positive integer"),
    ({"min_history": 1.5}, r"^min_history must be an integer >= 2"),
    ({"window": 1}, r"^window must be an integer >= 2"),
    ({"floor": "low"}, r"^floor must be a finite number or None"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSpikeWatchdog(**kwargs)
