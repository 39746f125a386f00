"""The whole run on a ~200 KB corpus this test writes: BPE tokenizer -> prepare (JSON lines + Parquet, 2 worker
processes) -> train 60 steps with eval_every (the validation loss falls) -> a run killed after step 30 resumes to
the same final losses -> sample -> export -> the same logits in transformers -> import back. A quick smoke of the
same path (tiny sizes, one process) runs in `make test`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from curry_train.__main__ import main
from curry_train.config import load_config
from curry_train.data import stdlib_files
from curry_train.train import train

MODEL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=64", "train.seq_len=64",
         "train.batch_size=8", "train.progress=false", "train.log_every=0"]


def write_corpus(folder, n_bytes: int) -> int:
    """Python source files of the stdlib as documents: half as JSON lines, half as Parquet (key/column 'text')."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs, total = [], 0
    for f in stdlib_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        if 2_000 < len(text) < 20_000:
            docs.append(text)
            total += len(text)
        if total >= n_bytes:
            break
    folder.mkdir()
    half = len(docs) // 2
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:half]))
    pq.write_table(pa.table({"text": docs[half:]}), folder / "b.parquet", row_group_size=8)
    return len(docs)


def prepared(tmp_path, n_bytes, vocab, workers):
    n_docs = write_corpus(tmp_path / "corpus", n_bytes)
    tok, data = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "--vocab-size", str(vocab), f"data.path={tmp_path / 'corpus'}", "--out", str(tok)]) == 0
    assert main(["prepare", f"data.path={tmp_path / 'corpus'}", f"data.tokenizer={tok}", "--out", str(data),
                 "--workers", str(workers), "--no-progress"]) == 0
    index = json.loads((data / "index.json").read_text())
    assert index["documents"] == n_docs and index["tokenizer"]["vocab_size"] == vocab
    return tok, data


def test_smoke_tokenizer_prepare_train_with_eval(tmp_path):
    tok, data = prepared(tmp_path, 30_000, 300, workers=1)
    history = train(load_config([*MODEL, f"data.prepared={data}", f"data.tokenizer={tok}", "model.vocab_size=300",
                                 "train.steps=4", "train.eval_every=2", "train.eval_batches=1"]))
    assert [h["step"] for h in history if "val_loss" in h] == [1, 3]


@pytest.mark.slow
def test_the_whole_path(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok, data = prepared(tmp_path, 200_000, 512, workers=2)
    run = [*MODEL, f"data.prepared={data}", f"data.tokenizer={tok}", "model.vocab_size=512", "train.steps=60",
           "train.warmup_steps=5", "train.eval_every=10", "train.eval_batches=4", "checkpoint.every=10"]
    whole = train(load_config([*run, f"checkpoint.dir={tmp_path / 'ck_whole'}"]))
    vals = [h["val_loss"] for h in whole if "val_loss" in h]
    assert len(vals) == 6 and vals == sorted(vals, reverse=True) and vals[-1] < vals[0] - 0.1, vals

    # the same run, SIGKILLed once its step-30 checkpoint exists, then resumed to the end
    ck = tmp_path / "ck_killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "curry_train", "train", *run, f"checkpoint.dir={ck}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (ck / "step-00000030").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (ck / "step-00000030").is_dir() and not (ck / "step-00000060").is_dir()
    resumed = train(load_config([*run, f"checkpoint.dir={ck}"]))
    assert resumed[0]["step"] in (30, 40, 50)
    assert resumed[-1]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-6)
    assert resumed[-1]["val_loss"] == pytest.approx(whole[-1]["val_loss"], abs=1e-6)

    capsys.readouterr()
    assert main(["sample", f"checkpoint.dir={ck}", "--prompt", "def ", "--max-new-tokens", "30", "--seed", "1"]) == 0
    text = capsys.readouterr().out.splitlines()[1:]
    assert text[0].startswith("def ") and len("\n".join(text)) > len("def ")

    assert main(["export", f"checkpoint.dir={ck}", "--out", str(tmp_path / "hf")]) == 0
    from curry_train.sample import load_run

    _, ours, tokenizer, _ = load_run(ck)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tokenizer.encode("import os\nprint(os.getcwd())\n" * 3)[:64]])
    assert hf_tok("import os\n")["input_ids"] == tokenizer.encode("import os\n")
    with torch.no_grad():
        logits = ours(ids)
        assert (hf(ids).logits - logits).abs().max() < 1e-5
    back = train(load_config([*MODEL, f"data.prepared={data}", f"data.tokenizer={tok}", "model.vocab_size=512",
                              "train.steps=1", "train.lr=1e-12", "train.warmup_steps=0",
                              f"model.init_from={tmp_path / 'hf'}"]))
    fresh = train(load_config([*MODEL, f"data.prepared={data}", f"data.tokenizer={tok}", "model.vocab_size=512",
                               "train.steps=1"]))
    assert back[0]["loss"] < fresh[0]["loss"] - 0.5  # starts where the exported run ended, not from scratch
