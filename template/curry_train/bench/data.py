"""``python -m curry_train bench data``: is the data path ever the bottleneck? Two ratios, one run.

1. Loader vs training: a byte-level ``prepare`` of the embedded corpus (``data.max_bytes``) into a temporary folder,
   then ``Batches`` over its memmapped shards (``prepared_data.ShardStream``) delivering the configured model's
   global batches (``train.batch_size`` x ``train.seq_len``), timed against one training step of the configured
   model on those batches (``common.train_step``), in interleaved rounds. Ratio = batches/s of the loader over
   steps/s of training. Target >= 50: the loader costs at most 2% of a step.
2. ``prepare`` vs the ``tokenizers`` library: a byte-level BPE of ``vocab_size`` ids trained on the corpus, then the
   corpus's files tokenized by ``prepare`` (``workers`` processes, shards and index written, process start-up
   included) and by ``Tokenizer.encode_batch`` on the same texts in this process (the library's own threads, all
   cores). Ratio = prepare's tokens/s over encode_batch's. Target >= 0.7. (The token counts differ slightly: prepare
   splits big files at line ends into work units, which can change a merge at the cut.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ..data import Batches
from ..loop import build_optimizer
from ..prepared_data import find_inputs, open_prepared, prepare, prepared_stream
from ..tokenizer import load_tokenizer, train_bpe
from ..user_model import model_name
from .common import build_model_and_batches, interleaved_rounds, user_loss, train_step


def bench_data(cfg, vocab_size: int = 4096, workers: int | None = None, loader_batches: int = 50) -> dict:
    b, t = cfg.bench, cfg.train
    workers = workers or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="curry_train_bench_data_"))
    try:
        prepare(None, tmp / "bytes", "bytes", val_fraction=0.0, workers=1, max_bytes=cfg.data.max_bytes,
                progress=False)
        stream = prepared_stream(open_prepared(tmp / "bytes"))
        loader = Batches(stream, t.batch_size, t.seq_len, seed=cfg.seed)
        model, batches = build_model_and_batches(cfg)
        optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
        loss_fn = user_loss(cfg)
        state = {"loader": 0, "train": 0}

        def run(side: str) -> float:
            t0 = time.perf_counter()
            if side == "loader":
                for _ in range(loader_batches):
                    loader.global_batch(state["loader"])
                    state["loader"] += 1
                return (time.perf_counter() - t0) / loader_batches
            for _ in range(b.steps_per_repeat):
                x, y = loader.global_batch(state["train"])
                train_step(model, optimizer, x, y, loss_fn=loss_fn)
                state["train"] += 1
            return (time.perf_counter() - t0) / b.steps_per_repeat

        for side in ("loader", "train"):
            run(side)
        seconds = interleaved_rounds(run, ("loader", "train"), b.repeats)
        per_batch, per_step = (sorted(seconds[s])[len(seconds[s]) // 2] for s in ("loader", "train"))
        loader_ratio = per_step / per_batch

        files = find_inputs(None, cfg.data.max_bytes)
        texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]  # as prepare reads them
        tok = train_bpe(texts, vocab_size, tmp / "tok")
        t0 = time.perf_counter()
        index = prepare(None, tmp / "bpe", str(tmp / "tok"), val_fraction=0.0, workers=workers,
                        max_bytes=cfg.data.max_bytes, progress=False)
        prepare_s = time.perf_counter() - t0
        library = load_tokenizer(str(tmp / "tok")).tok
        t0 = time.perf_counter()
        n_lib = sum(len(e.ids) for e in library.encode_batch(texts, add_special_tokens=False))
        library_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_prep = index["tokens"]["train"] + index["tokens"]["val"] - index["documents"]  # end-of-text ids not counted
    prepare_ratio = (n_prep / prepare_s) / (n_lib / library_s)
    print(f"data path ({model_name(cfg)}, batch {t.batch_size}x{t.seq_len}, corpus {sum(map(len, texts)) / 1e6:.1f} M "
          f"characters in {len(files)} files, {b.repeats} interleaved rounds)")
    print(f"  memmap loader   : {per_batch * 1e3:8.3f} ms per global batch")
    print(f"  training step   : {per_step * 1e3:8.3f} ms")
    print(f"  loader ratio    : {loader_ratio:8.1f}x   batches/s over steps/s (target >= 50: "
          f"{'PASS' if loader_ratio >= 50 else 'MISS'})")
    print(f"  prepare         : {n_prep / prepare_s:10,.0f} tokens/s ({workers} workers, {index['documents']} docs, "
          f"{tok.vocab_size}-id BPE, start-up and writing included)")
    print(f"  encode_batch    : {n_lib / library_s:10,.0f} tokens/s (tokenizers' own threads)")
    print(f"  prepare ratio   : {prepare_ratio:8.2f}    (target >= 0.7: {'PASS' if prepare_ratio >= 0.7 else 'MISS'})")
    return {"loader_s_per_batch": per_batch, "train_s_per_step": per_step, "loader_ratio": loader_ratio,
            "prepare_tokens_per_s": n_prep / prepare_s, "encode_batch_tokens_per_s": n_lib / library_s,
            "prepare_ratio": prepare_ratio, "token_count_ratio": n_prep / n_lib,
            "targets": {"loader": 50, "prepare": 0.7}}
