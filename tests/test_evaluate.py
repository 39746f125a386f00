"""``train.eval_every``: the validation loss on fixed held-out batches in the metrics, the log line and the
TensorBoard events; the same number in one process, under DDP (reduced over the data-parallel ranks) and under a
2-stage pipeline (computed by the last stage)."""

import json

import pytest

from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.evaluate import Evaluator
from curry_train.data import token_streams
from curry_train.model import GPT, GPTConfig
from curry_train.train import train

SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=8",
         "train.steps=6", "train.warmup_steps=1", "train.progress=false", "train.log_every=0", "train.eval_every=3",
         "train.eval_batches=2", "data.max_bytes=200000"]


@pytest.mark.slow
def test_eval_every_logs_val_loss_in_metrics_log_and_tensorboard(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    history = train(load_config([*SMALL, "train.log_every=100", f"train.metrics_file={metrics}",
                                 f"train.tensorboard_dir={tmp_path / 'tb'}"]))
    evaluated = [h["step"] for h in history if "val_loss" in h]
    assert evaluated == [2, 5]  # every 3 steps, and the last
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == evaluated
    out = capsys.readouterr().out
    assert "val loss" in out.splitlines()[-1] and out.count("| val loss ") == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"loss/train", "loss/val", "lr", "grad_norm", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/val")] == [3, 6]
    assert events.Scalars("loss/val")[-1].value == pytest.approx(history[-1]["val_loss"], rel=1e-6)


def test_val_batches_are_fixed_held_out_and_the_mean_token_loss():
    cfg = load_config(SMALL)
    train_tokens, val_tokens = token_streams(cfg)
    assert len(val_tokens) == 200_000 - len(train_tokens)  # the tail, never trained on
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=128))
    ev = Evaluator(cfg, val_tokens)
    first, again = ev.loss(model), ev.loss(model)
    assert first == again  # the same batches each time
    from curry_train.model import token_loss

    total = n = 0
    for i in range(2):
        x, y = ev.batches.global_batch(i)
        s, c = token_loss(model(x), y)
        total, n = total + s.item(), n + c.item()
    assert first == pytest.approx(total / n, rel=1e-6)
    assert ev(model, 0) is None and ev(model, 2) == first and ev(model, 5) == first


def _val_losses(rank, world_size, overrides):
    return [h.get("val_loss") for h in train(load_config(overrides))]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.dp=2"],
    ["parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.n_microbatches=2"],
    ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.n_microbatches=2"],  # 2 stages per rank
], ids=["dp2", "pp2", "pp2-interleaved"])
def test_val_loss_is_the_same_at_dp2_and_pp2(layout):
    overrides = [*SMALL, "model.n_layer=4"]
    expected = _val_losses(0, 1, overrides)
    for rank_losses in launch(_val_losses, 2, [*overrides, *layout], timeout=240):
        got = [v for v in rank_losses if v is not None]
        assert got == pytest.approx([v for v in expected if v is not None], abs=1e-5)
