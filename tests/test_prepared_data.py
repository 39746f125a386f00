"""Tokenizers and prepared data: BPE trained here, shards + index + val shard, memmapped batches equal in-memory
ones, and every bad input one line before any process group."""

import json

import numpy as np
import pytest
import torch

from curry_train.__main__ import main
from curry_train.data import Batches
from curry_train.prepared_data import ShardStream, open_prepared, prepare, prepared_stream
from curry_train.tokenizer import BYTE_EOT, load_tokenizer, train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "tokens", "shard", "memmap", "curry", "train", "loss"]


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) + "." for _ in range(n_docs)]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe(corpus(200), 300, out)
    return out


def test_bpe_is_byte_level_round_trips_and_has_an_end_of_text_id(bpe):
    tok = load_tokenizer(str(bpe))
    assert tok.vocab_size == 300 and tok.eot_id == 0
    text = "gamma shard ünïcode 🙂 never seen"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 300
    assert len(tok.encode("alpha beta gamma delta")) < len("alpha beta gamma delta")  # merges learned
    assert load_tokenizer(str(bpe / "tokenizer.json")).identity == tok.identity
    assert load_tokenizer("bytes").identity["sha256"] is None


def test_prepare_jsonl_shards_index_and_val_shard(tmp_path, bpe):
    docs = corpus(120, seed=1)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    index = prepare(src, tmp_path / "out", str(bpe), val_fraction=0.2, workers=1, shard_tokens=500,
                    progress=False)
    tok = load_tokenizer(str(bpe))
    expected = np.concatenate([np.r_[tok.encode(d), tok.eot_id] for d in docs])
    meta = open_prepared(tmp_path / "out", str(bpe))
    train, val = prepared_stream(meta, "train"), prepared_stream(meta, "val")
    assert index["dtype"] == "uint16" and index["documents"] == len(docs) and len(index["train"]) > 1
    assert len(train) + len(val) == expected.size and len(val) == int(expected.size * 0.2)
    assert torch.equal(torch.cat([train[0:len(train)], val[0:len(val)]]), torch.from_numpy(expected).long())
    assert index["tokens"] == {"train": len(train), "val": len(val)}
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_prepare_parquet_equals_jsonl(tmp_path, bpe):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = corpus(50, seed=2)
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet", row_group_size=16)
    write_jsonl(tmp_path / "b.jsonl", docs, key="body")
    a = prepare(tmp_path / "a.parquet", tmp_path / "pq", str(bpe), "body", 0.1, workers=1, progress=False)
    b = prepare(tmp_path / "b.jsonl", tmp_path / "js", str(bpe), "body", 0.1, workers=1, progress=False)
    assert a["documents"] == b["documents"] == 50
    assert [s["sha256"] for s in a["train"] + a["val"]] == [s["sha256"] for s in b["train"] + b["val"]]


def test_memmapped_batches_equal_in_memory_batches_across_shard_boundaries(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text(" ".join(corpus(40, seed=3)))
    prepare(text, tmp_path / "out", "bytes", val_fraction=0.0, workers=1, shard_tokens=997, progress=False)
    stream = prepared_stream(open_prepared(tmp_path / "out"), "train")
    tokens = torch.frombuffer(bytearray(text.read_bytes() + bytes([BYTE_EOT])), dtype=torch.uint8)
    assert len(stream.maps) > 3 and len(stream) == tokens.numel()
    memmapped, in_memory = Batches(stream, 8, 64, seed=5), Batches(tokens, 8, 64, seed=5)
    for step in (0, 1, 17):
        for a, b in zip(memmapped.global_batch(step), in_memory.global_batch(step)):
            assert torch.equal(a, b)
    assert isinstance(stream, ShardStream)


def big_vocab_tokenizer(path, n=70_000):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(n - 1)}, "<|endoftext|>": n - 1}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_a_vocabulary_above_65536_gets_uint32_shards(tmp_path):
    tok = big_vocab_tokenizer(tmp_path / "big.json")
    (tmp_path / "t.txt").write_text("w69998 w1 w2")
    index = prepare(tmp_path / "t.txt", tmp_path / "out", str(tok), val_fraction=0.0, workers=1, progress=False)
    assert index["dtype"] == "uint32" and index["eot_id"] == 69_999
    assert prepared_stream(open_prepared(tmp_path / "out", str(tok)))[0:4].tolist() == [69_998, 1, 2, 69_999]


def bad_inputs(tmp):
    (tmp / "empty").mkdir()
    (tmp / "data.bin").write_bytes(b"\x00\x01")
    write_jsonl(tmp / "rows.jsonl", ["x y z"] * 3, key="body")
    big_vocab_tokenizer(tmp / "big.json")
    (tmp / "t.txt").write_text("hello " * 400)
    prepare(tmp / "t.txt", tmp / "bytes_data", "bytes", workers=1, progress=False)
    return [
        (["prepare", f"data.path={tmp}/empty", f"--out={tmp}/o"], "the folder holds no file prepare reads"),
        (["prepare", f"data.path={tmp}/data.bin", f"--out={tmp}/o"], ".bin is not a kind prepare reads"),
        (["prepare", f"data.path={tmp}/rows.jsonl", f"--out={tmp}/o", "--no-progress"],
         "a row has no key 'text' (data.text_key); it has: body"),
        (["prepare", f"data.path={tmp}/t.txt", f"data.tokenizer={tmp}/big.json", "--dtype=uint16", f"--out={tmp}/o"],
         "--dtype uint16 holds ids below 65536; the tokenizer has 70000 ids"),
        (["prepare", f"data.path={tmp}/t.txt", f"--out={tmp}/bytes_data"], "already holds files"),
        (["train", f"data.prepared={tmp}/bytes_data", f"data.tokenizer={tmp}/big.json", "model.vocab_size=70000"],
         "was written with the tokenizer bytes (256 ids), not data.tokenizer="),
        (["train", f"data.tokenizer={tmp}/big.json"], "model.vocab_size=256 is smaller than the tokenizer's 70000 ids"),
        (["train", f"data.tokenizer={tmp}/nope"], "no such file or folder"),
        (["train", f"data.prepared={tmp}/empty"], "no index.json there"),
    ]


def test_bad_inputs_are_one_line(tmp_path, capsys, no_launch):
    for argv, message in bad_inputs(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)


@pytest.mark.slow
def test_bench_data_prints_both_ratios(capsys):
    from curry_train.bench.data import bench_data
    from curry_train.config import load_config

    cfg = load_config(["data.max_bytes=300000", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                       "train.batch_size=4", "train.seq_len=32", "bench.repeats=2", "bench.steps_per_repeat=1"])
    result = bench_data(cfg, vocab_size=512, loader_batches=5)
    out = capsys.readouterr().out
    assert "loader ratio" in out and "prepare ratio" in out
    assert result["loader_ratio"] > 1 and result["prepare_ratio"] > 0
    assert result["token_count_ratio"] == pytest.approx(1.0, abs=0.01)  # the same text, cut into work units
