"""Loss-spike rollback: the watchdog's rule (fires on a sustained spike, not on noise or a single outlier), the
rollback's choice of checkpoint and its errors, config errors, and one run end to end: a corrupted data window
makes the loss spike, the run rolls back to the checkpoint before it (parameters bit-exact) and finishes near the
clean run's loss."""

import json
import math
import random

import pytest
import torch

from curry_train import train_state
from curry_train.config import load_config, validate
from curry_train.loop import LossSpikeError, SpikeRollback, build_optimizer, build_scheduler
from curry_train.primitives.checkpoint import Checkpointer
from curry_train.primitives.loss_spike import LossSpikeWatchdog
from curry_train.train import train
from curry_train.user_model import build_model


def noisy_curve(n: int, seed: int = 0, sigma: float = 0.05):
    """An LM-like loss curve: 5.5 decaying towards 2.0, with Gaussian batch noise."""
    rng = random.Random(seed)
    return [2.0 + 3.5 * math.exp(-i / 60) + rng.gauss(0.0, sigma) for i in range(n)]


def feed(w: LossSpikeWatchdog, losses, start: int = 0) -> list[int]:
    """The steps at which ``w`` fired."""
    return [start + i for i, loss in enumerate(losses) if w.observe(start + i, loss)]


# -- the watchdog -------------------------------------------------------------------------------------------------

def test_fires_on_a_sustained_spike_at_the_sustain_th_step():
    w = LossSpikeWatchdog(threshold_ratio=5.0, sustain_steps=3, min_history=20, window=50)
    assert feed(w, noisy_curve(200)) == []
    baseline = w.baseline
    assert [w.observe(200 + i, 2 * baseline) for i in range(3)] == [False, False, True]
    assert w.in_spike and w.spike_start == 200 and w.spike_steps == 3
    assert w.baseline == baseline  # spike losses never enter the baseline
    w.reset()
    assert not w.in_spike and w.baseline == baseline  # the accepted history is kept


@pytest.mark.parametrize("seed", range(5))
def test_ordinary_noise_and_single_outliers_never_fire(seed):
    losses = noisy_curve(1000, seed, sigma=0.08)
    for i in range(100, 1000, 37):
        losses[i] *= 3.0  # a bad batch, alone: the next loss is normal again
    w = LossSpikeWatchdog(threshold_ratio=5.0, sustain_steps=2, min_history=20, window=50)
    assert feed(w, losses) == []
    assert w.seen == 1000 - len(range(100, 1000, 37))  # every outlier was seen as one and left out


def test_min_history_first_then_spikes_count():
    w = LossSpikeWatchdog(threshold_ratio=2.0, sustain_steps=1, min_history=5, window=10)
    assert feed(w, [3.0, 3.1, 50.0, 2.9]) == []  # the baseline is still forming: 50 is accepted
    assert w.seen == 4 and not w.in_spike and w.threshold() == math.inf
    assert not w.observe(4, 3.0) and w.threshold() == pytest.approx(2.9 + 2 * (3.0 - 2.9))  # median 3.0, min 2.9
    w = LossSpikeWatchdog(threshold_ratio=2.0, sustain_steps=1, min_history=5, window=3)
    assert feed(w, [3.0, 3.1, 3.0, 2.9, 3.0, 9.0]) == [5]  # min_history counts losses seen, beyond the window


def test_floor_zero_is_the_plain_ratio_and_non_finite_losses_are_ignored():
    w = LossSpikeWatchdog(threshold_ratio=1.5, sustain_steps=1, min_history=3, window=5, floor=0.0)
    feed(w, [2.0, 2.0, 2.0])
    assert w.threshold() == pytest.approx(3.0)
    assert not w.observe(3, math.nan) and not w.observe(4, math.inf) and w.seen == 3 and not w.in_spike
    assert not w.observe(5, 2.99) and w.observe(6, 3.01)


def test_state_dict_round_trips_through_json():
    a = LossSpikeWatchdog(sustain_steps=3, min_history=10, window=20)
    feed(a, noisy_curve(60))
    a.observe(60, 10.0)  # a spike in progress is part of the state
    b = LossSpikeWatchdog(sustain_steps=3, min_history=10, window=20)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.state_dict() == a.state_dict() and b.in_spike and b.spike_start == 60
    tail = [10.0, 10.0, 3.0, 2.9]
    assert [b.observe(61 + i, x) for i, x in enumerate(tail)] == [a.observe(61 + i, x) for i, x in enumerate(tail)]
    with pytest.raises(ValueError, match=r"^not a LossSpikeWatchdog state_dict"):
        b.load_state_dict({"history": []})


@pytest.mark.parametrize("kwargs,message", [
    ({"threshold_ratio": 1.0}, r"^threshold_ratio must be a number > 1 .*got 1.0$"),
    ({"threshold_ratio": "5"}, r"^threshold_ratio must be a number > 1"),
    ({"sustain_steps": 0}, r"^sustain_steps must be a positive integer \(consecutive spike steps that fire\), got 0$"),
    ({"min_history": 1}, r"^min_history must be an integer >= 2 "),
    ({"window": True}, r"^window must be an integer >= 2 "),
    ({"floor": float("nan")}, r"^floor must be a finite number or None"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSpikeWatchdog(**kwargs)


# -- the rollback: which checkpoint, the schedule, the errors ------------------------------------------------------

def _setup(tmp_path, max_rollbacks=3, saves=(4, 8)):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, 2, 20)
    ckpt = Checkpointer(tmp_path, keep_last=0)
    states = {}
    for step in range(max(saves, default=0)):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step + 1 in saves:
            ckpt.save(step + 1, model, optimizer, scheduler)
            states[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    w = LossSpikeWatchdog(threshold_ratio=2.0, sustain_steps=2, min_history=3, window=5)
    return model, scheduler, w, SpikeRollback(w, ckpt, model, optimizer, scheduler, max_rollbacks), states


def test_rollback_loads_the_newest_checkpoint_before_the_spike_began(tmp_path, capsys):
    model, scheduler, w, spike, states = _setup(tmp_path)
    with torch.no_grad():
        model.weight.add_(1.0)  # the spike's damage
    assert [spike.check(s, x) for s, x in [(5, 1.0), (6, 1.0), (7, 1.1)]] == [None] * 3
    assert spike.check(8, 9.0) is None and spike.in_spike  # the spike begins at step 8: checkpoint 8 is out
    record = spike.check(9, 9.0)
    assert record == {"at_step": 9, "loss": 9.0, "baseline": 1.0, "spike_steps": 2, "to_step": 4,
                      "skipped_data": [8, 9], "rollbacks": 1}
    assert all(torch.equal(v, states[4][k]) for k, v in model.state_dict().items())  # bit-exact
    assert scheduler.last_epoch == 9  # the loop's scheduler.step() makes it 10: the schedule stays on the step
    assert not w.in_spike and w.seen == 3
    assert "step 9: loss spike (9.0000 vs baseline 1.0000 for 2 steps): rolled back to step 4, skipping data " \
           "steps 8..9" in capsys.readouterr().out


def test_no_rollback_left_or_no_checkpoint_is_a_clear_error(tmp_path):
    _, _, _, spike, _ = _setup(tmp_path / "a", max_rollbacks=0)
    for s in range(3):
        spike.check(s, 1.0)
    spike.check(3, 5.0)
    with pytest.raises(LossSpikeError, match=r"^step 4: loss spike \(5.0000 vs baseline 1.0000 for 2 steps.*"
                                             r"train.spike.max_rollbacks=0 rollbacks already done"):
        spike.check(4, 5.0)
    _, _, _, spike, _ = _setup(tmp_path / "b", saves=())
    for s in range(3):
        spike.check(s, 1.0)
    spike.check(3, 5.0)
    with pytest.raises(LossSpikeError, match=r"no intact checkpoint before step 3 in .* to roll back to"):
        spike.check(4, 5.0)


# -- config and the test hook --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["train.spike.enabled=true"], r"^train.spike.enabled=true rolls back to a checkpoint: it needs checkpoint.dir "
                                   r"and checkpoint.every > 0, got checkpoint.dir=None, checkpoint.every=0$"),
    (["train.spike.threshold_ratio=0.5"], r"^train.spike.threshold_ratio must be a number > 1"),
    (["train.spike.sustain_steps=0"], r"^train.spike.sustain_steps must be a positive integer"),
    (["train.spike.min_history=1"], r"^train.spike.min_history must be an integer >= 2"),
    (["train.spike.window=1"], r"^train.spike.window must be an integer >= 2"),
    (["train.spike.max_rollbacks=-1"], r"^train.spike.max_rollbacks must be an integer >= 0 \(0 = stop at the first"),
    (["train.spike.floor=inf"], r"^train.spike.floor must be a finite number or None"),
])
def test_bad_spike_config_is_one_line_before_anything_runs(overrides, message, no_launch):
    with pytest.raises(ValueError, match=message):
        train(load_config(overrides))


def test_bad_config_types_and_the_corruption_hook(monkeypatch):
    with pytest.raises(ValueError, match=r"^train.spike.window must be an integer, got 'many'$"):
        load_config(["train.spike.window=many"])
    validate(load_config(["train.spike.enabled=true", "checkpoint.dir=x", "checkpoint.every=5"]))
    monkeypatch.setenv(train_state.CORRUPT_ENV, "7-3")
    with pytest.raises(ValueError, match=r"^CURRY_TRAIN_CORRUPT_STEPS='7-3' must be a step a or a range a-b"):
        train_state.corrupt_steps_from_env()
    monkeypatch.setenv(train_state.CORRUPT_ENV, "5")
    assert train_state.corrupt_steps_from_env() == (5, 5)


# -- end to end ----------------------------------------------------------------------------------------------------

RUN = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "train.seq_len=32", "train.batch_size=8",
       "train.steps=18", "train.warmup_steps=3", "train.progress=false", "train.log_every=0",
       "checkpoint.every=6", "checkpoint.keep_last=0", "train.spike.enabled=true", "train.spike.min_history=8",
       "train.spike.window=8", "train.spike.sustain_steps=2"]
TOLERANCE = 0.35  # nats: the rolled-back run has 3 fewer updates (12, 13, 14), made up at lower LR


def _run(tmp_path, name, monkeypatch, corrupt=None):
    """One run; returns its history and the model state after each step (captured in the checkpoint hook)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello curry train\n" * 500)
    states, hook = {}, train_state.step_hook

    def capturing(cfg, ckpt, model, *args, **kwargs):
        on_step = hook(cfg, ckpt, model, *args, **kwargs)

        def wrapped(step, metrics):
            states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            on_step(step, metrics)
        return wrapped

    monkeypatch.setattr(train_state, "step_hook", capturing)
    if corrupt:
        monkeypatch.setenv(train_state.CORRUPT_ENV, corrupt)
    else:
        monkeypatch.delenv(train_state.CORRUPT_ENV, raising=False)
    history = train(load_config([*RUN, f"data.path={corpus}", f"checkpoint.dir={tmp_path / name}"]))
    return history, states


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_corrupted_window_spikes_rolls_back_bit_exactly_and_finishes_near_the_clean_run(tmp_path, monkeypatch,
                                                                                          capsys):
    clean, clean_states = _run(tmp_path, "clean", monkeypatch)
    assert not any("rollback" in m or m["spike"] for m in clean)  # ordinary training: the watchdog stays quiet
    spiky, states = _run(tmp_path, "spiky", monkeypatch, corrupt="13-14")
    out = capsys.readouterr().out
    assert [m["step"] for m in spiky] == list(range(18))
    assert spiky[13]["loss"] > 1.5 * clean[13]["loss"] and spiky[13]["spike"]  # the corrupted data spikes
    record = spiky[14]["rollback"]
    assert record["to_step"] == 12 and record["skipped_data"] == [13, 14] and record["rollbacks"] == 1
    assert "step 14: loss spike (" in out and "rolled back to step 12, skipping data steps 13..14" in out
    assert [m["step"] for m in spiky if "rollback" in m] == [14]
    # right after the rollback the model is checkpoint 12's, bit for bit: the clean run's after 12 updates
    model = build_model(load_config(RUN))
    Checkpointer(tmp_path / "spiky").load(model, path=tmp_path / "spiky" / "step-00000012")
    assert all(torch.equal(states[14][k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(states[14][k], v) for k, v in clean_states[11].items())
    assert spiky[15]["loss"] == pytest.approx(clean[12]["loss"], abs=0.05)  # params of 12, data of step 15
    final, final_clean = spiky[-1]["loss"], clean[-1]["loss"]
    assert abs(final - final_clean) < TOLERANCE, (final, final_clean)
    assert spiky[-1]["lr"] == clean[-1]["lr"]  # the LR schedule stayed on the step counter
    # the watchdog's state rides in each checkpoint and comes back on resume
    cfg = load_config([*RUN, f"checkpoint.dir={tmp_path / 'spiky'}"])
    optimizer = build_optimizer(model, 1e-3)
    watchdog = LossSpikeWatchdog.from_config(cfg.train.spike)
    start = train_state.resume(Checkpointer(tmp_path / "spiky"), model, optimizer,
                               build_scheduler(optimizer, 3, 18), cfg, watchdog)
    assert start == 18 and watchdog.seen == 16 and not watchdog.in_spike  # 18 losses seen, the 2 spiking ones not
