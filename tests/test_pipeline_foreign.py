"""Pipeline stages of models nobody here wrote (``curry_train.stages.split_model``): Hugging Face Llama (also
Mistral with a sliding window, eager attention), GPT-2 (tied head), torchtitan's layout, nanoGPT's and the reference
GPT. Chained stages equal the model's logits; names are the model's; a 2-rank ``PipelineSchedule`` trains them with
the losses and weights of single-process training, and so does ``train()`` with ``model._target_`` and
``parallel.pp=2``. One spawned launch runs every distributed check."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import foreign_models
from curry_train.config import load_config
from curry_train.distributed import launch
from curry_train.model import GPT, IGNORE_INDEX, Block, GPTConfig, StageModules, token_loss
from curry_train.primitives.model_io import logits_of
from curry_train.stages import layout_of, split_model
from curry_train.train import train

TOL = 1e-5
SEQ = 16


class NanoGPT(nn.Module):
    """nanoGPT's layout: ``transformer`` an ``nn.ModuleDict`` (wte, wpe, drop, h, ln_f), ``lm_head`` tied to wte."""

    def __init__(self, n_layer: int = 4, vocab_size: int = foreign_models.VOCAB, block_size: int = SEQ):
        super().__init__()
        torch.manual_seed(0)
        c = GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size)
        self.config = SimpleNamespace(block_size=block_size)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, 32), wpe=nn.Embedding(block_size, 32), drop=nn.Dropout(0.0),
            h=nn.ModuleList(Block(c) for _ in range(n_layer)), ln_f=nn.LayerNorm(32)))
        self.lm_head = nn.Linear(32, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1])))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def _mistral(n_layer: int = 4):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)  # sliding_window < SEQ: the stages must build the sliding-window mask, not the causal one
    return MistralForCausalLM(MistralConfig(
        vocab_size=foreign_models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layer,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=SEQ // 2,
        attn_implementation="sdpa"))


def _eager_llama(n_layer: int = 4):
    model = foreign_models.tiny_llama(n_layer=n_layer)
    model.config._attn_implementation = "eager"  # no is_causal shortcut: the stages must pass the causal mask
    return model


def _gpt(n_layer: int = 4):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=SEQ))


MODELS = {"llama": foreign_models.tiny_llama, "gpt2": foreign_models.tiny_gpt2, "titan": foreign_models.titan_like,
          "mistral": _mistral, "llama-eager": _eager_llama, "nanogpt": NanoGPT, "gpt": _gpt}
LAYOUTS = {"llama": "hf-llama", "gpt2": "hf-gpt2", "titan": "torchtitan", "mistral": "hf-llama",
           "llama-eager": "hf-llama", "nanogpt": "nanogpt", "gpt": "gpt"}


def _batches(steps: int, rows: int = 8):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randint(0, foreign_models.VOCAB, (rows, SEQ), generator=g)
        y = torch.randint(0, foreign_models.VOCAB, (rows, SEQ), generator=g)
        y[rows // 2:, SEQ // 3:] = IGNORE_INDEX  # padding falls unevenly over the micro-batches
        out.append((x, y))
    return out


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.slow
def test_chained_stages_are_the_model_and_keep_its_names(name):
    model = MODELS[name](n_layer=4)
    assert layout_of(model) == LAYOUTS[name]
    x = _batches(1, rows=2)[0][0]
    with torch.no_grad():
        ref = logits_of(model(x))
        for n_stages, layers in [(2, None), (4, None), (3, [0, 3, 1])]:
            stages = split_model(model, n_stages, layers)
            h = x
            for stage in stages:
                h = stage(h)
            err = (h - ref).abs().max().item()
            assert err <= TOL, f"{name} split {n_stages} {layers}: logits differ by {err:.2e}"
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters(remove_duplicate=False))  # tied once per stage
    assert list(StageModules(stages).state_dict()) == list(model.state_dict())
    own = dict(model.named_parameters(remove_duplicate=False))
    assert all(p is own[n] for s in stages for n, p in s.named_parameters())  # shared, not copied


def test_tied_head_is_one_parameter_in_first_and_last_stage():
    model = foreign_models.tiny_gpt2(n_layer=2)
    first, last = split_model(model, 2)
    assert last.lm_head.weight is first.transformer.wte.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_every_stage_places_tokens_at_the_position_ids_it_is_given(name):
    """Context parallelism hands every stage the global positions of its tokens (``position_ids``, split by rows
    like the batch): the chained stages equal the model's forward with the same ``position_ids``, not arange's.
    A layout whose model takes no positions (torchtitan, nanoGPT) refuses them."""
    model = MODELS[name](n_layer=4)
    x = _batches(1, rows=2)[0][0][:, :8]
    pos = torch.tensor([0, 1, 2, 3, 12, 13, 14, 15]).expand(2, -1)  # cp 2, rank 0 of a 16-token row: head and tail
    with torch.no_grad():
        ref = logits_of(model(x, position_ids=pos))
        h = x
        for stage in split_model(model, 2):
            h = stage(h, position_ids=pos)
        assert (h - ref).abs().max().item() <= TOL
        assert (h - logits_of(model(x))).abs().max().item() > 100 * TOL  # the positions changed the logits
    for other in ("titan", "nanogpt"):
        with pytest.raises(ValueError, match="places tokens by their index in the sequence: it takes no position_ids"):
            split_model(MODELS[other](n_layer=2), 2)[0](x, position_ids=pos)


def test_unknown_layout_and_wrong_block_types_raise():
    with pytest.raises(ValueError, match=r"layout of Sequential; it splits gpt, hf-llama, hf-gpt2, nanogpt, "
                                         r"torchtitan .*pass the list to PipelineSchedule"):
        split_model(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8)), 2)
    with pytest.raises(ValueError, match=r"block_types=\['Linear'\] but LlamaForCausalLM's model.layers holds "
                                         r"LlamaDecoderLayer"):
        split_model(foreign_models.tiny_llama(), 2, block_types=nn.Linear)
    with pytest.raises(ValueError, match="not divisible by the number of pipeline stages 3"):
        split_model(foreign_models.titan_like(n_layer=4), 3)


# ---- two ranks: PipelineSchedule trains the split model like one process trains the whole --------------------

CASES = [("llama", "1f1b"), ("gpt2", "gpipe"), ("titan", "1f1b")]  # gpt2: tied head on rank 0 and rank 1
STEPS, LR = 3, 1e-2
# the driver's pp branch on the user's model: train() with model._target_ and parallel.pp=2, padded rows
DRIVER = ["model._target_=foreign_models.tiny_llama", "model.n_layer=4", "train.seq_len=32", "train.batch_size=8",
          "train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.log_every=0",
          "parallel.pp_schedule=1f1b", "parallel.n_microbatches=4", "data.variable_length=true"]
PARAM_TOL = 1e-2 * LR


def _loss_fn(logits, targets):
    return token_loss(logits, targets)[0]


def _pipelined_ranks(rank, world_size):
    from curry_train.primitives import PipelineSchedule

    torch.set_num_threads(1)
    out = {}
    for name, kind in CASES:
        stages = split_model(MODELS[name](n_layer=4), world_size)
        sched = PipelineSchedule(kind, 4, stages, None, _loss_fn)
        local = StageModules(sched.modules.values())
        opt = torch.optim.AdamW(local.parameters(), lr=LR)
        losses, grads = [], None
        for x, y in _batches(STEPS):
            opt.zero_grad()
            n = (y != IGNORE_INDEX).sum().item()
            losses.append(sched.train_step(x, y, loss_divisor=n, broadcast_loss=True).item() / n)
            grads = grads or _grads(local)
            opt.step()
        out[name] = (losses, grads, {k: v.detach().clone() for k, v in local.state_dict().items()})
    out["driver"] = [h["loss"] for h in train(load_config([*DRIVER, "parallel.pp=2"]))]
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}


def _single_process(name):
    model = MODELS[name](n_layer=4)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], None
    for x, y in _batches(STEPS):
        opt.zero_grad()
        loss_sum, n = token_loss(logits_of(model(x)), y)
        (loss_sum / n).backward()
        grads = grads or _grads(model)
        opt.step()
        losses.append((loss_sum / n).item())
    return losses, grads, model.state_dict()


@pytest.mark.slow
def test_two_stage_pipeline_and_the_driver_train_foreign_models_like_one_process():
    """Losses of 3 AdamW steps and the first step's gradients equal single-process training to TOL; the weights
    after 3 steps to PARAM_TOL (Adam's m / sqrt(v) turns a 1e-8 gradient difference on a near-zero gradient into
    up to ~lr of update difference, so weights are compared at a fraction of one step's size)."""
    results = launch(_pipelined_ranks, 2, timeout=300)
    for name, _ in CASES:
        ref_losses, ref_grads, ref_state = _single_process(name)
        seen = set()
        for rank_result in results:
            losses, grads, state = rank_result[name]
            assert losses == pytest.approx(ref_losses, abs=TOL), name
            for key, g in grads.items():
                err = (g - ref_grads[key]).abs().max().item()
                assert err <= TOL, f"{name}: {key} gradient differs by {err:.2e}"
            for key, value in state.items():
                err = (value - ref_state[key]).abs().max().item()
                assert err <= PARAM_TOL, f"{name}: {key} differs by {err:.2e} after {STEPS} steps"
            seen |= set(state)
        assert seen == set(ref_state), name
    single = [h["loss"] for h in train(load_config(DRIVER))]
    for rank_result in results:
        assert rank_result["driver"] == pytest.approx(single, abs=TOL)
