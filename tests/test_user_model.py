"""The user's own model in the CLI: ``model._target_=pkg.module.factory`` (and ``train.loss._target_``) for ``train``
and ``bench``, and every bad input as one ``error:`` line before any process group.

Models: ``foreign_models`` (Hugging Face Llama / GPT-2 built from a config, a torchtitan-like model) and, here, a
nanoGPT-style model whose forward is ``(idx, targets) -> (logits, mean loss)``: it needs ``train.loss``.
"""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from curry_train.__main__ import main
from curry_train.config import load_config, validate
from curry_train.distributed import launch

TINY = ["train.batch_size=8", "train.seq_len=32", "train.progress=false", "train.log_every=0"]
BENCH = ["bench.repeats=1", "bench.burn_in=0", "bench.steps_per_repeat=1", "bench.pipeline_batch_size=8"]


class NanoGPT(nn.Module):
    """nanoGPT's interface: ``forward(idx, targets=None) -> (logits, loss)``, the loss a mean over targets != -1;
    without targets only the last position's logits (generation). ``model(x)`` alone is not enough to train it."""

    def __init__(self, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 256):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.h = nn.ModuleList(nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, 2 * n_embd), nn.GELU(),
                                             nn.Linear(2 * n_embd, n_embd)) for _ in range(n_layer))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx, targets=None):
        x = self.wte(idx)
        for block in self.h:
            x = x + block(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def nano_gpt(n_layer: int = 2, n_embd: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return NanoGPT(n_layer, n_embd)


def nano_loss(model, batch, ignore_index):
    """``train.loss`` for ``NanoGPT``: its mean loss back to a sum over the valid targets, and their count."""
    x, y = batch
    y = y.masked_fill(y == -100, ignore_index)
    _, loss = model(x, y)
    n_valid = (y != ignore_index).sum()
    return loss * n_valid, n_valid


def mean_loss(model, batch):
    """A common mistake: the mean loss alone (gradient accumulation needs the sum and the count)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def not_a_model(size: int = 2):
    return {"weights": [0.0] * size}


def _losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


def _bench_results(out_dir) -> dict:
    """Every bench's result from the run's ``report.json`` (``bench.out_dir/<timestamp>/``)."""
    (report,) = out_dir.rglob("report.json")
    return json.loads(report.read_text())["results"]


# -- the good paths ---------------------------------------------------------------------------------------------------

def test_overrides_select_the_custom_preset_and_free_keys():
    cfg = load_config(["model._target_=foreign_models.tiny_llama", "model.n_layer=3", "+model.n_embd=32",
                       "train.loss._target_=test_user_model.nano_loss", "train.loss.ignore_index=-1"])
    assert dict(cfg.model) == {"_target_": "foreign_models.tiny_llama", "n_layer": 3, "n_embd": 32}  # no GPT keys
    assert dict(cfg.train.loss) == {"_target_": "test_user_model.nano_loss", "ignore_index": -1}
    assert load_config(["model=custom", "model._target_=a.b"]).model == {"_target_": "a.b"}
    assert load_config().model.name == "tiny" and load_config().train.loss is None  # the GPT stays the default


@pytest.mark.slow
def test_train_a_hugging_face_llama_from_the_cli(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    assert main(["train", "model._target_=foreign_models.tiny_llama", "train.steps=20", "train.warmup_steps=4",
                 "train.batch_size=8", "train.seq_len=64", "train.progress=false", "train.log_every=0",
                 f"train.metrics_file={metrics}"]) == 0
    losses = _losses(metrics)
    assert len(losses) == 20 and losses[0] > 5.0  # ~ln(256) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert "model: foreign_models.tiny_llama, " in capsys.readouterr().out


@pytest.mark.slow
def test_train_with_the_users_loss(tmp_path):
    metrics = tmp_path / "m.jsonl"
    assert main(["train", "model._target_=test_user_model.nano_gpt", "train.loss._target_=test_user_model.nano_loss",
                 "train.loss.ignore_index=-1", "train.steps=20", "train.warmup_steps=2", "data.variable_length=true",
                 "train.gradient_accumulation_steps=2", *TINY, f"train.metrics_file={metrics}"]) == 0
    losses = _losses(metrics)
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_bench_ga_and_loop_on_a_torchtitan_like_model(tmp_path):
    assert main(["bench", "ga", "loop", "model._target_=foreign_models.titan_like", *TINY, *BENCH,
                 f"bench.out_dir={tmp_path}"]) == 0
    results = _bench_results(tmp_path)
    ga = {(r["batch"], r["normalization"]): r for r in results["ga"]["rows"]}
    assert ga[("padded", "tokens")]["grad_rel_err"] < 1e-5 < ga[("padded", "microbatches")]["grad_rel_err"]
    loop = results["loop"]
    assert set(loop["tokens_per_s"]) == {"curry_train", "plain"} and loop["ratio"] > 0


@pytest.mark.slow
def test_bench_with_the_users_loss_and_a_pipeline_it_cannot_run(tmp_path, capsys):
    """recompute measures through ``train.loss``; pipeline says in one line why it skips, and the run goes on."""
    assert main(["bench", "pipeline", "recompute", "model._target_=test_user_model.nano_gpt",
                 "train.loss._target_=test_user_model.nano_loss", "train.loss.ignore_index=-1", *TINY, *BENCH,
                 f"bench.out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "pipeline: skipped for test_user_model.nano_gpt: train.loss is set" in out
    results = _bench_results(tmp_path)
    assert "train.loss is set" in results["pipeline"]["skipped"]
    rows = {r["mode"]: r for r in results["recompute"]["rows"]}
    assert rows["full"]["activation_bytes"] < rows["none"]["activation_bytes"]


def _train_losses(rank, world_size, overrides):
    torch.set_num_threads(1)
    from curry_train.train import train

    return [h["loss"] for h in train(load_config(overrides))]


@pytest.mark.slow
def test_fsdp_full_on_two_ranks_trains_gpt2_as_one_process_does():
    run = ["model._target_=foreign_models.tiny_gpt2", "train.steps=3", "train.warmup_steps=1", *TINY]
    single = _train_losses(0, 1, run)
    ranks = launch(_train_losses, 2, [*run, "parallel.sharding=full"], timeout=300)
    for losses in ranks:
        assert losses == pytest.approx(single, abs=1e-5)


# -- bad input: one line, exit 2, before any process group ------------------------------------------------------------

LLAMA = "model._target_=foreign_models.tiny_llama"
BAD_INPUTS = [
    (["model._target_=no_such_pkg.build"], "model._target_=no_such_pkg.build: cannot import module 'no_such_pkg' "
                                           "(ModuleNotFoundError: No module named 'no_such_pkg')"),
    (["model._target_=foreign_models.nope"], "module 'foreign_models' has no attribute 'nope'"),
    (["model._target_=foreign_models"], "model._target_ must be a dotted path pkg.module.name, got 'foreign_models'"),
    (["model._target_=test_user_model.not_a_model"],
     "model._target_=test_user_model.not_a_model returned dict ({'weights': [0.0, 0.0]}), not a torch.nn.Module"),
    ([LLAMA, "model.n_layers=3"], "model.n_layers: not an argument of foreign_models.tiny_llama; it takes "
                                  "tiny_llama(n_layer: 'int' = 2, "),
    ([LLAMA, "model.n_head=3"], "model._target_=foreign_models.tiny_llama raised "),
    ([LLAMA, "model.vocab_size=100"], "foreign_models.tiny_llama embeds 100 token ids (model.embed_tokens."
                                      "num_embeddings); the data are bytes (token ids 0..255)"),
    (["model._target_=foreign_models.tiny_gpt2", "train.seq_len=256"],
     "train.seq_len must be an integer in [1, 128] (GPT2LMHeadModel.config.max_position_embeddings=128), got 256"),
    (["model._target_=foreign_models.TitanBlock", "model.dim=8", "model.n_heads=2"],
     "the forward cannot take the batch (the pair (x, y), x int64 of shape (1, 2) with ids 0..255, called as "
     "model(x)): TypeError: TitanBlock.forward() missing 1 required positional argument: 'freqs_cis'; forward is "
     "TitanBlock.forward(x: 'torch.Tensor', freqs_cis: 'torch.Tensor', attention_masks=None)"),
    (["model._target_=test_user_model.nano_gpt"], "model(x) on x of shape (1, 2) returned logits of shape (1, 1, 256)"),
    (["model=tiny", LLAMA], "model._target_ names your own model, which replaces the GPT presets: drop model=tiny"),
    (["model=custom"], "model._target_ has no value (???); set it, e.g. model._target_=..."),
    (["model=nope"], "model=nope is not a model preset; choose from moe, small, tiny (or your own: model._target_="),
    (["model._target_=test_user_model.nano_gpt", "train.loss._target_=test_user_model.nano_loss"],
     "train.loss._target_=test_user_model.nano_loss cannot be called with train.loss.* = {}: missing a required "
     "argument: 'ignore_index'; it takes nano_loss(model, batch, ignore_index)"),
    (["train.loss._target_=test_user_model.nano_loss", "train.loss.ignore_index=-1", "train.loss.mean=true"],
     "train.loss.mean: not an argument of test_user_model.nano_loss; it takes nano_loss(model, batch, ignore_index)"),
    (["train.loss._target_=test_user_model.mean_loss"], "train.loss._target_=test_user_model.mean_loss returned "
                                                        "tensor("),
    (["train.loss=nano_loss"], "train.loss must be null (cross-entropy on the model's logits) or name your function: "
                               "train.loss._target_=pkg.module.fn, got 'nano_loss'"),
    (["bench", "ga", "model._target_=no_such_pkg.build"], "cannot import module 'no_such_pkg'"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_model_is_one_error_line_before_any_process_group(argv, message, capsys, no_launch):
    argv = argv if argv[0] == "bench" else ["train", *argv]
    assert main([*argv, "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err
    assert not torch.distributed.is_initialized()


def test_user_loss_with_a_pipeline_is_refused_by_validate():
    cfg = load_config(["model._target_=test_user_model.nano_gpt", "train.loss._target_=test_user_model.nano_loss",
                       "train.loss.ignore_index=-1", "parallel.pp=2"])
    with pytest.raises(ValueError, match=r"^train.loss is not supported with parallel.pp=2"):
        validate(cfg, world_size=2)
