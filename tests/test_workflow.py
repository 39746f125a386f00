"""The workflow stage tools (``curry_train.workflow``): preflight asserts, gradient flow, LR range test, kill criterion,
small-scale ablation. Tiny GPTs (1-2 blocks, d=32, sequences of 32) on CPU, one thread; the whole file is quick."""

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from curry_train.data import Batches, load_tokens, split
from curry_train.model import GPT, GPTConfig, token_loss
from curry_train.primitives import GradientAccumulation, apply_recompute
from curry_train.workflow import (GradFlow, KillCriterion, KillRun, ablate, curve_from_history, lr_range_test,
                                  paired_t_test, preflight, preflight_main, student_t_sf, train_run, welch_t_test)
from curry_train.workflow.ablate import betainc, student_t_quantile
from curry_train.workflow.common import Snapshot

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
# the same tiny GPT through the config, for the tools that build from overrides
TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.seq_len=32",
        "train.batch_size=8", "train.warmup_steps=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is fastest, and on a busy machine several are many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gpt(cls=GPT, seed=0):
    torch.manual_seed(seed)
    return cls(CFG)


def random_batch(rows=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, 32), generator=g), torch.randint(0, 256, (rows, 32), generator=g)


@pytest.fixture(scope="module")
def text_batches():
    tokens, _ = split(load_tokens())
    return Batches(tokens, 8, 32, seed=0)


# -- broken models for preflight ---------------------------------------------------------------------------------

class DetachedGPT(GPT):
    """Block 1 reads a detached copy of block 0's output: block 0 and the position table never learn."""

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        x = self.blocks[1](self.blocks[0](x).detach())
        return self.head(self.ln_f(x))


class NaNGPT(GPT):
    """Token 7 produces NaN logits (a log of a negative number, a 0/0 in a custom op...)."""

    def forward(self, idx):
        return super().forward(idx) * torch.where(idx[..., None] == 7, float("nan"), 1.0)


class LeakyGPT(GPT):
    """Each position sees the next token's embedding: an off-by-one in a hand-written shift."""

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        x = x + 0.5 * x.roll(-1, dims=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def leaky_gpt(n_layer: int = 1, n_embd: int = 32, n_head: int = 2, block_size: int = 32):
    """``model._target_=test_workflow.leaky_gpt`` for the CLI test."""
    return LeakyGPT(GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size))


def test_preflight_passes_the_reference_gpt_and_leaves_no_trace():
    model = gpt()
    batch = random_batch()
    model(batch[0]).sum().backward()  # the caller's own gradients must survive
    grads = [p.grad.clone() for p in model.parameters()]
    snap, rng = Snapshot(model), torch.get_rng_state()
    model.eval()
    report = preflight(model, batch)
    assert report.passed, report.markdown()
    assert [c.status for c in report.checks] == ["pass"] * 6
    assert snap.equal() and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model.training and not model.blocks[0].training
    assert "| overfit | pass |" in report.markdown()


def test_preflight_reads_hugging_face_outputs():
    from foreign_models import tiny_llama

    model = tiny_llama(n_embd=32, n_head=2, n_kv_head=1, block_size=32)
    ids = random_batch()[0]
    report = preflight(model, {"input_ids": ids, "labels": ids}, overfit_steps=0)
    assert report.passed, report.markdown()
    assert report["overfit"].status == "skip" and report["causality"].status == "pass"


def test_preflight_names_a_detached_layer():
    report = preflight(gpt(DetachedGPT), random_batch(), overfit_steps=0)
    check = report["gradients"]
    assert check.status == "FAIL" and not report.passed
    assert "no gradient" in check.measured and "blocks.0.attn.qkv.weight" in check.measured
    assert "pos_emb.weight" in check.measured and "blocks.1." not in check.measured
    assert report["causality"].status == "pass" and report["init_loss"].status == "pass"


def test_preflight_catches_nan():
    x, y = random_batch()
    x[0, 5] = 7
    report = preflight(gpt(NaNGPT), (x, y))
    assert report["finite"].status == "FAIL" and "non-finite" in report["finite"].measured
    assert report["gradients"].status == "FAIL" and report["overfit"].status == "FAIL"


def test_preflight_catches_a_causality_leak():
    report = preflight(gpt(LeakyGPT), random_batch(), overfit_steps=0)
    check = report["causality"]
    assert check.status == "FAIL" and "changes when tokens" in check.measured, check
    assert [c.name for c in report.failures] == ["causality"]


def test_preflight_cli(capsys):
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.seq_len=32"]
    assert preflight_main(tiny) == 0
    out = capsys.readouterr().out
    assert "| causality | pass |" in out and "preflight: all checks pass" in out
    leaky = ["model._target_=test_workflow.leaky_gpt", "train.seq_len=32", "--steps", "0"]
    assert preflight_main(leaky) == 1
    assert "| causality | FAIL |" in capsys.readouterr().out


# -- gradient flow ---------------------------------------------------------------------------------------------

LAYERS = ["blocks.0", "blocks.1", "blocks.0.ln1", "blocks.0.attn", "blocks.1.mlp"]


def grad_flow_run(model, x, y, reentrant=False, steps=2):
    gf = GradFlow(model, LAYERS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        if reentrant:  # Hugging Face style: torch.utils.checkpoint around each block's __call__
            h = model.drop(model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1])))
            for block in model.blocks:
                h = checkpoint(block, h, use_reentrant=True)
            logits = model.head(model.ln_f(h))
        else:
            logits = model(x)
        loss_sum, n = token_loss(logits, y)
        (loss_sum / n).backward()
        gf.step()
        opt.step()
    gf.remove()
    return gf


def test_grad_flow_is_the_same_with_and_without_recompute(tmp_path):
    x, y = random_batch()
    base = gpt()
    plain = grad_flow_run(copy.deepcopy(base), x, y)
    recomputed = copy.deepcopy(base)
    apply_recompute(recomputed)
    calls = []  # raw hook: modules inside a checkpointed block run twice per step
    recomputed.blocks[0].ln1.register_forward_hook(lambda *a: calls.append(1))
    recompute = grad_flow_run(recomputed, x, y)
    reentrant = grad_flow_run(copy.deepcopy(base), x, y, reentrant=True)
    assert len(calls) == 4  # 2 steps x (forward + recompute)
    for other in (recompute, reentrant):
        assert len(other.history) == len(plain.history) == 2
        for mine, theirs in zip(plain.history, other.history):
            assert mine["layers"].keys() == theirs["layers"].keys()
            for layer, stats in mine["layers"].items():
                for key, value in stats.items():
                    got = theirs["layers"][layer][key]
                    assert (value is None) == (got is None), (layer, key)
                    if value is not None:
                        assert got == pytest.approx(value, rel=1e-5, abs=1e-9), (layer, key, value, got)
    record = plain.history[-1]["layers"]
    assert all(record[name]["forwards"] == 1 for name in LAYERS)
    assert record["other"]["forwards"] is None and record["other"]["grad_norm"] > 0  # embeddings, ln_f
    assert record["blocks.0.attn"]["out_grad_norm"] > 0 and record["blocks.0"]["grad_zero"] < 0.01
    assert "| blocks.0.ln1 | 1 |" in plain.table()
    png = plain.plot(tmp_path / "flow.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not any(m._forward_hooks for m in recomputed.modules() if m is not recomputed.blocks[0].ln1)


def test_grad_flow_in_the_loop_with_accumulation(text_batches):
    from curry_train.loop import build_optimizer, build_scheduler, run_training_steps

    model = gpt()
    opt = build_optimizer(model, 3e-3)
    with GradFlow(model) as gf:  # default layers: the blocks
        run_training_steps(model, opt, build_scheduler(opt, 1, 3), text_batches, GradientAccumulation(2), 3,
                           progress=False, log_every=0, on_step=gf.on_step)
    assert [r["step"] for r in gf.history] == [0, 1, 2]
    assert list(gf.history[0]["layers"]) == ["blocks.0", "blocks.1", "other"]
    assert all(r["layers"]["blocks.1"]["forwards"] == 2 for r in gf.history)
    assert gf.series("grad_norm")["blocks.0"][0] > 0
    assert not model.blocks[0]._forward_hooks


# -- LR range test -----------------------------------------------------------------------------------------------

def test_lr_range_restores_the_model_and_suggests_a_falling_lr(text_batches, tmp_path):
    model = gpt()
    model(text_batches.global_batch(99)[0]).sum().backward()
    snap = Snapshot(model)
    grads = [p.grad.clone() for p in model.parameters()]
    result = lr_range_test(model, text_batches, lr_min=1e-5, lr_max=30.0, steps=60)
    assert snap.equal() and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert result.diverged_at is not None and result.lr_diverge_tenth == pytest.approx(result.lr_diverge / 10)
    assert result.suggested == min(result.lr_steepest, result.lr_diverge_tenth)
    # in the falling region: after the start, before the minimum, already below the starting loss
    assert result.lrs[0] < result.suggested < result.lr_min_loss
    assert result.smoothed_at(result.suggested) < result.smoothed[0]
    i = result.lrs.index(result.lr_steepest)
    assert result.smoothed[i + 1] < result.smoothed[i - 1]
    assert "**suggested**" in result.markdown()
    assert result.plot(tmp_path / "lr.png").stat().st_size > 0
    # the step is the loop's accumulate_gradients: 2 micro-batches give the same losses as the whole batch
    whole, split_in_two = (lr_range_test(model, text_batches, steps=8, accumulation=k) for k in (1, 2))
    assert whole.losses == pytest.approx(split_in_two.losses, abs=1e-4)


# -- kill criterion ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seed_runs():
    return [train_run([*TINY, f"seed={s}"], 30)["history"] for s in range(4)]


def test_kill_fires_on_a_clearly_worse_run_not_on_seed_noise(seed_runs):
    def criterion():
        return KillCriterion(seed_runs[0], seed_runs[1:], smoothing=0.1)

    same = criterion()
    run = train_run([*TINY, "seed=9"], 30, same.on_step)  # another seed of the baseline config
    assert run["killed"] is None and len(run["history"]) == 30
    assert max(d.gap / d.threshold for d in same.history if d.gap is not None) < 1
    worse = criterion()
    run = train_run([*TINY, "seed=9", "train.lr=1e-5"], 30, worse.on_step)  # 300x too small an LR
    decision = run["killed"]
    assert decision is not None and decision.decision == "kill" and decision.step < 15
    assert decision.gap > decision.threshold and "3 strikes in a row" in decision.reason


def test_kill_rule_on_given_curves():
    base = {0: 5.5, 1000: 4.0, 2000: 3.0}
    seeds = [{0: 5.5, 1000: v, 2000: v - 1} for v in (4.1, 4.0, 3.9)]  # std (ddof 1) 0.1 at 1000 and 2000
    k = KillCriterion(base, seeds, margin=3, patience=2)
    assert k.noise(1000) == pytest.approx(0.1)
    assert k.check(1000, 4.3).decision == "continue"  # gap 0.3 < 3 x 0.1 x sqrt(2)
    assert k.check(1000, 4.5).strikes == 1
    assert k.check(1500, 3.0).strikes == 0  # better than the baseline: the count resets
    k.check(1500, 4.2)
    assert k.check(1600, 4.2).decision == "kill"
    assert k.check(5000, 9.0).decision == "continue"  # past the baseline curve: nothing to compare with
    alone = KillCriterion(base, patience=1)  # no seeds: 2% of the baseline loss
    assert alone.noise(2000) == pytest.approx(0.06)
    with pytest.raises(KillRun, match="step 7: .*non-finite"):
        alone.on_step(7, {"tokens": 100, "loss": math.nan})
    history = [{"step": i, "loss": 5.0 - i, "tokens": 256} for i in range(3)]
    assert curve_from_history(history) == [(256, 5.0), (512, 4.0), (768, 3.0)]


# -- ablation and its statistics ---------------------------------------------------------------------------------

def test_student_t_and_welch():
    assert student_t_sf(2.228138851986274, 10) == pytest.approx(0.05, abs=1e-12)  # t-table values
    assert student_t_sf(12.706204736174707, 1) == pytest.approx(0.05, abs=1e-12)
    assert student_t_sf(2.0, 10) == pytest.approx(0.07338803477074, rel=1e-10)
    assert student_t_quantile(0.975, 4) == pytest.approx(2.7764451051977987, rel=1e-9)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, rel=1e-12)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)
    r = welch_t_test([1, 2, 3, 4], [2, 4, 6, 8.5])  # R: t.test(x, y): t = -1.7127, df = 4.2363, p = 0.1579
    assert (round(r.t, 4), round(r.df, 4), round(r.p, 4)) == (-1.7127, 4.2363, 0.1579)
    same = welch_t_test([3.0, 3.1, 2.9], [3.0, 3.1, 2.9])
    assert same.diff == 0 and same.p == 1.0
    assert paired_t_test([1, 2, 3], [1, 2, 3]).ci == (0.0, 0.0)


def test_ablation_verdicts():
    result = ablate({"base": ["train.lr=3e-4"], "same": ["train.lr=3e-4"], "better_lr": ["train.lr=3e-3"]},
                    seeds=3, steps=20, base_overrides=TINY, min_effect=0.1)
    base, same, better = result.arms
    assert same.values == base.values  # same config and seeds: identical runs
    assert result.verdicts == {"same": "no", "better_lr": "yes"}, result.markdown()
    assert better.mean < base.mean - 0.5 and better.test.p < 0.01
    assert "**yes**" in result.markdown() and "p (welch)" in result.markdown()
    # the same runs, paired seed by seed: identical arms differ by exactly 0
    assert paired_t_test(base.values, same.values).ci == (0.0, 0.0)


BAD = [
    (lambda: preflight(torch.nn.Linear(2, 2), (1, 2)), "batch must be"),
    (lambda: preflight("model", random_batch()), "model must be a torch.nn.Module"),
    (lambda: preflight(gpt(), random_batch(), overfit_steps=-1), "overfit_steps must be an integer >= 0"),
    (lambda: preflight(gpt(), random_batch(), lr=0), "lr must be a number > 0"),
    (lambda: preflight(gpt(), random_batch(), overfit_fraction=1.5), "overfit_fraction must be"),
    (lambda: preflight(gpt(), random_batch(), vocab_size=0), "vocab_size must be a positive integer"),
    (lambda: GradFlow(gpt(), ["blocks.7"]), "layers: GPT has no submodule 'blocks.7'"),
    (lambda: GradFlow(gpt(), 3), "layers must be None"),
    (lambda: lr_range_test(gpt(), [random_batch()], lr_min=1.0, lr_max=0.1), "lr_max must be > lr_min"),
    (lambda: lr_range_test(gpt(), [random_batch()], steps=2), "steps must be an integer >= 5"),
    (lambda: lr_range_test(gpt(), [random_batch()], smoothing=2.0), "smoothing must be a number in"),
    (lambda: lr_range_test(gpt(), 5), "batches must be"),
    (lambda: lr_range_test(gpt(), [random_batch()], accumulation=2), "accumulation=2 needs batches to be"),
    (lambda: KillCriterion({0: 1.0}), "baseline_losses_by_tokens must have at least 2 points"),
    (lambda: KillCriterion({0: 1.0, 1: 0.9}, [{0: 1.0, 1: 0.9}]), "seed_losses must be a list of at least 2"),
    (lambda: KillCriterion({0: 1.0, 1: 0.9}, patience=0), "patience must be a positive integer"),
    (lambda: KillCriterion(None), "baseline_losses_by_tokens must be a curve"),
    (lambda: ablate({"only": []}), "arms must be a dict of at least 2 arms"),
    (lambda: ablate({"a": [], "b": ["seed=3"]}), "'seed=3' is set by ablate"),
    (lambda: ablate({"a": [], "b": []}, seeds=1), "seeds must be an integer >= 2"),
    (lambda: ablate({"a": [], "b": []}, metric="accuracy"), "metric must be one of final_loss, val_loss, min_loss"),
    (lambda: ablate({"a": [], "b": []}, test="mann-whitney"), "test must be one of welch, paired"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_are_one_line_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_the_cli_runs_preflight_and_lr_range(tmp_path, capsys):
    from curry_train.__main__ import main

    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=4"]
    assert main(["preflight", *tiny]) == 0
    assert "preflight: all checks pass" in capsys.readouterr().out
    assert main(["lr-range", "--steps", "30", "--plot", str(tmp_path / "lr.png"), *tiny]) == 0
    assert (tmp_path / "lr.png").stat().st_size > 0
    assert main(["preflight", "--lr", "fast", *tiny]) == 2
    assert capsys.readouterr().err.startswith("error: ")
