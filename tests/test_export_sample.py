"""Sample from a checkpoint, export it to Hugging Face (GPT2LMHeadModel: the same logits in transformers) and
start a run from the export (model.init_from)."""

import pytest
import torch

from curry_train.__main__ import main
from curry_train.config import load_config
from curry_train.export_hf import _qkv_to_gpt2, gpt_to_hf, hf_to_gpt, init_from
from curry_train.model import GPT, GPTConfig
from curry_train.primitives.checkpoint import Checkpointer
from curry_train.sample import generate, load_run
from curry_train.tokenizer import byte_tokenizer_json
from curry_train.train_state import data_extra

SHAPE = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.block_size=32"]


def saved_run(tmp_path, overrides=()):
    """A checkpoint of a randomly initialised GPT whose meta records its config, as `train` writes it."""
    cfg = load_config([*SHAPE, *overrides])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_config(cfg.model))
    for p in model.parameters():  # random biases and gains too: a mapping that drops one shows in the logits
        p.data.add_(0.05 * torch.randn_like(p))
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(3, model, extra=data_extra(cfg, 3))
    ckpt.close()
    return tmp_path / "ckpt", model


def test_qkv_per_head_order_maps_to_gpt2_q_k_v_blocks():
    n_head, hd, d = 2, 3, 4
    rows = torch.arange(n_head * 3 * hd).float()[:, None].expand(-1, d)  # row r: head r // 9, part (r // 3) % 3
    out = _qkv_to_gpt2(rows, n_head)[:, 0]
    part, head = (out // hd) % 3, out // (3 * hd)
    assert part.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # q of every head, then k, then v
    assert head.tolist() == ([0] * 3 + [1] * 3) * 3


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_to_hf_and_back_is_the_identity(tied):
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, tie_embeddings=tied))
    hf = gpt_to_hf(model)
    assert ("lm_head.weight" in hf) is not tied and hf["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    back = hf_to_gpt(hf, model.cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


def test_byte_tokenizer_json_is_the_bytes_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(byte_tokenizer_json())
    text = "héllo\x00 wörld 🙂\n\t"
    assert tok.encode(text).ids == list(text.encode())
    assert tok.decode(list(text.encode())) == text


@pytest.mark.slow
def test_sample_is_seeded_greedy_is_the_argmax_and_the_cli_prints_it(tmp_path, capsys):
    directory, model = saved_run(tmp_path)
    cfg, loaded, tokenizer, meta = load_run(directory)
    assert meta["step"] == 3 and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
    ids = tokenizer.encode("def f(")
    a, b = (generate(loaded, ids, 40, 1.0, 20, seed=7) for _ in range(2))
    assert a == b and len(a) == 40 and a != generate(loaded, ids, 40, 1.0, 20, seed=8)
    greedy = generate(loaded, ids, 3, temperature=0)
    with torch.no_grad():
        assert greedy[0] == int(loaded(torch.tensor([ids]))[0, -1].argmax())
    assert main(["sample", f"checkpoint.dir={directory}", "--prompt", "def f(", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"# {directory}/step-00000003 (step 3)") and out[1].startswith("def f(")


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_export_logits_equal_in_transformers_and_import_back(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    directory, model = saved_run(tmp_path, [f"model.tie_embeddings={str(tied).lower()}"])
    assert main(["export", f"checkpoint.dir={directory}", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("héllo")["input_ids"] == list("héllo".encode())
    cfg = load_config([*SHAPE, f"model.tie_embeddings={str(tied).lower()}", f"model.init_from={tmp_path / 'hf'}"])
    fresh = init_from(GPT(GPTConfig.from_config(cfg.model)), cfg)
    with torch.no_grad():
        assert (fresh(ids) - ours).abs().max() < 1e-5


def test_init_from_another_shape_and_bad_folders_are_one_line(tmp_path, capsys, no_launch):
    directory, _ = saved_run(tmp_path)
    assert main(["export", f"checkpoint.dir={directory}", "--out", str(tmp_path / "hf")]) == 0
    cfg = load_config([*SHAPE, "model.n_embd=64", f"model.init_from={tmp_path / 'hf'}"])
    with pytest.raises(ValueError, match=r"has n_embd=32, the model model.n_embd=64: set model.n_embd=32"):
        init_from(GPT(GPTConfig.from_config(cfg.model)), cfg)
    capsys.readouterr()
    for argv, message in [
        (["export", f"checkpoint.dir={tmp_path}/none", "--out", str(tmp_path / "x")], "no checkpoint there"),
        (["export", f"checkpoint.dir={directory}", "--out", str(tmp_path / "hf")], "already holds files"),
        (["train", f"model.init_from={tmp_path}/nope"], "model.init_from="),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
