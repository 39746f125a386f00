"""A real run on a Hugging Face model (``model._target_``): train 2 steps of a tiny Llama with checkpoint.dir, then
``export`` (its own ``save_pretrained``: the same logits in ``transformers``), ``sample`` (its own ``generate``:
seeded, temperature and top-k honoured; past its context the window slides instead of crashing), ``model.init_from``
of the export (the exported weights, one line for a folder that does not fit) and ``plot`` of a metrics file; and
the validation loss at ``parallel.tp=2`` and ``parallel.cp=2`` equal to one process's."""

import json

import pytest
import torch

from curry_train.__main__ import main
from curry_train.config import load_config
from curry_train.export_hf import init_from
from curry_train.sample import generate, load_run, sample
from curry_train.user_model import build_model

LLAMA = ["model._target_=foreign_models.tiny_llama", "model.n_embd=32"]
RUN = [*LLAMA, "train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.seq_len=32",
       "train.progress=false", "train.log_every=0", "data.max_bytes=100000", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """``(checkpoint dir, export dir)`` of 2 trained steps of tiny_llama, exported by the CLI."""
    pytest.importorskip("transformers")
    from curry_train.train import train

    root = tmp_path_factory.mktemp("hf_run")
    history = train(load_config([*RUN, f"checkpoint.dir={root / 'ck'}"]))
    assert [h["step"] for h in history] == [0, 1]
    assert main(["export", f"checkpoint.dir={root / 'ck'}", "--out", str(root / "hf")]) == 0
    return root / "ck", root / "hf"


@pytest.mark.slow
def test_export_of_a_target_model_is_its_save_pretrained_with_the_trained_weights(hf_run, capsys):
    import transformers
    from foreign_models import tiny_llama

    ck, hf_dir = hf_run
    names = {f.name for f in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    cfg, ours, tokenizer, meta = load_run(ck)
    assert meta["step"] == 2 and type(ours).__name__ == "LlamaForCausalLM"
    untrained = tiny_llama(n_embd=32)  # the factory's init: the checkpoint (and so the export) moved away from it
    assert not torch.equal(ours.lm_head.weight, untrained.lm_head.weight)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok("def f(")["input_ids"] == tokenizer.encode("def f(") == list(b"def f(")
    # a second export into the same folder is one error line
    capsys.readouterr()
    assert main(["export", f"checkpoint.dir={ck}", "--out", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already holds files" in err and "\n" not in err


def _top_k_ids(model, ids, k):
    with torch.no_grad():
        return set(torch.topk(model(torch.tensor([ids])).logits[0, -1], k).indices.tolist())


@pytest.mark.slow
def test_sample_of_a_hf_model_goes_through_its_generate_seeded_with_temperature_and_top_k(hf_run, capsys,
                                                                                           monkeypatch):
    ck, _ = hf_run
    _, model, tokenizer, _ = load_run(ck)
    prompt = list(b"def f(")
    calls = []
    own = type(model).generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return own(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    a, b = (generate(model, prompt, 20, 1.0, 3, seed=5, eot_id=0) for _ in range(2))
    assert a == b and 0 < len(a) <= 20
    assert calls[0]["do_sample"] and calls[0]["temperature"] == 1.0 and calls[0]["top_k"] == 3
    assert calls[0]["max_new_tokens"] == 20 and calls[0]["eos_token_id"] == 0
    assert [generate(model, prompt, 20, 1.0, 3, seed=s, eot_id=0) for s in (6, 7, 8)] != [a] * 3
    for i, t in enumerate(a):  # each id is among the 3 most likely after what came before
        assert t in _top_k_ids(model, prompt + a[:i], 3), (i, t)
    greedy = generate(model, prompt, 8, temperature=0, eot_id=None)
    assert calls[-1]["do_sample"] is False
    x = list(prompt)
    for t in greedy:  # greedy is the argmax at each step
        assert _top_k_ids(model, x, 1) == {t}
        x.append(t)
    assert generate(model, prompt, 8, 1.0, top_k=1, seed=9, eot_id=None) == greedy  # top-k 1 is greedy
    assert generate(model, prompt, 8, 1e-4, top_k=0, seed=9, eot_id=None) == greedy  # so is a cold temperature
    monkeypatch.undo()

    text, meta = sample(ck, "def f(", 12, 0.7, 4, seed=3)
    assert text == sample(ck, "def f(", 12, 0.7, 4, seed=3)[0] and text.startswith("def f(") and meta["step"] == 2
    capsys.readouterr()
    argv = ["sample", f"checkpoint.dir={ck}", "--prompt", "def f(", "--max-new-tokens", "12", "--temperature", "0.7",
            "--top-k", "4", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# {ck}/step-00000002 (step 2), temperature 0.7, top-k 4, seed 3"
    assert out.split("\n", 1)[1] == text + "\n"


def test_sampling_a_hf_model_past_its_context_slides_the_window():
    """GPT-2 has learned positions: its generate past n_positions would index out of range (sample's default is 200
    new ids); the sliding window of the reference GPT takes over there."""
    pytest.importorskip("transformers")
    from foreign_models import tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_embd=32, block_size=16).eval()
    new = generate(model, list(range(1, 11)), 30, 1.0, 5, seed=1, eot_id=None)
    assert len(new) == 30 and new == generate(model, list(range(1, 11)), 30, 1.0, 5, seed=1, eot_id=None)
    assert len(generate(model, list(range(1, 41)), 5, 0.0, eot_id=None)) == 5  # a prompt longer than the context
    fits = generate(model, [1, 2, 3], 6, 0.0, eot_id=None)  # within the context: its own generate, the same greedy
    x = [1, 2, 3]
    for t in fits:
        assert _top_k_ids(model, x, 1) == {t}
        x.append(t)


@pytest.mark.slow
def test_init_from_an_export_loads_the_exported_weights_into_the_target_model(hf_run, capsys):
    from safetensors.torch import load_file

    ck, hf_dir = hf_run
    exported = load_file(str(hf_dir / "model.safetensors"))
    cfg = load_config([*LLAMA, "+model.seed=1", f"model.init_from={hf_dir}"])
    fresh = build_model(cfg)
    assert not torch.equal(fresh.lm_head.weight, exported["lm_head.weight"])
    loaded = init_from(fresh, cfg)
    state = loaded.state_dict()
    assert set(state) == set(exported)
    for key, value in exported.items():
        assert torch.equal(state[key], value), key
    _, ours, _, _ = load_run(ck)
    for key, value in ours.state_dict().items():
        assert torch.equal(state[key], value), key
    # a folder that does not fit the model: one line
    capsys.readouterr()
    for extra, message in [
        (["model.n_layer=3"], "does not fit LlamaForCausalLM: missing ['model.layers.2."),
        (["model.n_embd=64"], "weight has shape (256, 32) in model.init_from, (256, 64) in the model"),
    ]:
        assert main(["train", *LLAMA, *extra, f"model.init_from={hf_dir}", "train.steps=1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_init_from_a_tied_gpt2_save_pretrained_folder(tmp_path):
    pytest.importorskip("transformers")
    from foreign_models import tiny_gpt2

    source = tiny_gpt2(n_layer=1, n_embd=32, seed=3)
    source.save_pretrained(str(tmp_path / "hf"))
    cfg = load_config(["model._target_=foreign_models.tiny_gpt2", "model.n_layer=1", "model.n_embd=32",
                       f"model.init_from={tmp_path / 'hf'}"])
    model = init_from(build_model(cfg), cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def _metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_writes_a_png_of_train_and_val_loss_and_a_missing_file_is_one_line(tmp_path, capsys):
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(10)]
    for r in rows[4::5]:
        r["val_loss"] = r["loss"] + 0.2
    rows.append({"step": 9, "loss": 4.0, "val_loss": 4.1})  # step 9 again (a restarted attempt): counts once
    metrics = _metrics(tmp_path / "m.jsonl", rows)
    out = tmp_path / "plots" / "loss.png"
    assert main(["plot", str(metrics), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: 10 train and 2 validation points"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(out.parent.glob(".*"))  # the temporary file was renamed into place
    assert main(["plot", str(metrics)]) == 0 and (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    for argv, message in [(["plot", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.png")],
                           "none.jsonl: no such metrics file"),
                          (["plot", str(_metrics(tmp_path / "bad.jsonl", [{"lr": 1}]))],
                           "line 1 has no step and loss")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "x.png").exists()


# -- the validation loss under tensor and context parallelism ---------------------------------------------------------

EVAL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "train.seq_len=32", "train.batch_size=8",
        "train.steps=4", "train.warmup_steps=1", "train.progress=false", "train.log_every=0", "train.eval_every=2",
        "train.eval_batches=2", "data.max_bytes=200000"]


def _val_losses(rank, world_size, overrides):
    torch.set_num_threads(1)
    from curry_train.train import train

    return [h.get("val_loss") for h in train(load_config(overrides))]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.cp=2"]], ids=["tp2", "cp2"])
def test_val_loss_is_the_same_at_tp2_and_cp2(layout):
    from curry_train.distributed import launch

    expected = _val_losses(0, 1, EVAL)
    assert [v is not None for v in expected] == [False, True, False, True]
    for rank_losses in launch(_val_losses, 2, [*EVAL, *layout], timeout=240):
        assert [v is not None for v in rank_losses] == [False, True, False, True]
        got = [v for v in rank_losses if v is not None]
        assert got == pytest.approx([v for v in expected if v is not None], abs=1e-5)
