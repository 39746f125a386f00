"""The run's own commands, thin (parse, call, print): ``tokenizer``, ``prepare``, ``sample``, ``export``, ``plot``.

Each takes its flags plus Hydra overrides (``data.path=...``, ``checkpoint.dir=...``); bad input raises one
``ValueError``/``FileNotFoundError`` line, which ``__main__`` prints as ``error: ...`` (exit 2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m curry_train {prog}", description=description)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.path=corpus/ data.tokenizer=tok/")
    return p


def _split(args, parser) -> list[str]:
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"not a key=value override: {' '.join(bad)}")
    return args.overrides


def tokenizer_main(argv: list[str]) -> int:
    from .config import load_config
    from .prepared_data import find_inputs, plan_pieces, read_documents
    from .tokenizer import train_bpe

    p = _parser("tokenizer", "train a byte-level BPE tokenizer on data.path (a file, folder or glob of text, JSON "
                             "lines or Parquet; default: the embedded corpus) and save it in the Hugging Face format")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all: <|endoftext|> + 256 bytes + merges")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(_split(args, p))
    files = find_inputs(cfg.data.path, cfg.data.max_bytes)
    pieces = plan_pieces(files, cfg.data.text_key, chunk_bytes=1 << 24)
    seen = [0]

    def texts():
        for piece in pieces:
            for doc in read_documents(piece, cfg.data.text_key):
                seen[0] += len(doc)
                yield doc

    t0 = time.perf_counter()
    tok = train_bpe(texts(), args.vocab_size, args.out)
    print(f"tokenizer: byte-level BPE, {tok.vocab_size} ids (<|endoftext|> = {tok.eot_id}), trained on "
          f"{seen[0] / 1e6:.2f} M characters of {len(files)} file(s) in {time.perf_counter() - t0:.1f} s -> {args.out}")
    print(f"next: python -m curry_train prepare data.tokenizer={args.out} data.path=... --out DATA_DIR   "
          f"(train with model.vocab_size={tok.vocab_size})")
    return 0


def prepare_main(argv: list[str]) -> int:
    import os

    from .config import load_config
    from .prepared_data import prepare

    p = _parser("prepare", "tokenize data.path (a file, folder or glob of text, JSON lines with data.text_key, or "
                           "Parquet) with data.tokenizer into memmappable token shards + a validation shard")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the shards and index.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: cores)")
    p.add_argument("--dtype", default="auto", help="auto (uint16 below 65,536 ids, else uint32) | uint16 | uint32")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per train shard at most")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(_split(args, p))
    d = cfg.data
    t0 = time.perf_counter()
    index = prepare(d.path, args.out, d.tokenizer, d.text_key, d.val_fraction, args.workers, args.dtype,
                    args.shard_tokens, max_bytes=d.max_bytes, progress=not args.no_progress)
    took = time.perf_counter() - t0
    n = index["tokens"]
    print(f"prepared {index['documents']} documents from {index['files']} file(s): {n['train']:,} train + "
          f"{n['val']:,} val tokens ({index['dtype']}, {len(index['train'])} train shard(s)) in {took:.1f} s "
          f"({(n['train'] + n['val']) / took:,.0f} tokens/s, {args.workers} worker(s)) -> {args.out}")
    print(f"next: python -m curry_train train data.prepared={args.out} data.tokenizer={d.tokenizer} "
          f"model.vocab_size={index['tokenizer']['vocab_size']} train.eval_every=50")
    return 0


def _checkpoint_dir(overrides: list[str]) -> tuple[str | None, list[str]]:
    """``checkpoint.dir=DIR`` out of the overrides; the rest apply to the run's saved config."""
    dirs = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "checkpoint.dir"]
    return (dirs[-1] if dirs else None), [o for o in overrides if o.split("=", 1)[0] != "checkpoint.dir"]


def sample_main(argv: list[str]) -> int:
    from .sample import sample

    p = _parser("sample", "print what the newest intact checkpoint of checkpoint.dir=DIR writes after --prompt "
                          "(other overrides apply to the run's saved config, e.g. data.tokenizer=...)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the K most likely ids (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_intermixed_args(argv)
    directory, rest = _checkpoint_dir(_split(args, p))
    text, meta = sample(directory, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, rest)
    print(f"# {meta['path']} (step {meta['step']}), temperature {args.temperature}, top-k {args.top_k}, "
          f"seed {args.seed}")
    print(text)
    return 0


def export_main(argv: list[str]) -> int:
    from .export_hf import export

    p = _parser("export", "write the newest intact checkpoint of checkpoint.dir=DIR as a Hugging Face model "
                          "folder: GPT2LMHeadModel (model.safetensors + config.json) and the run's tokenizer")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    args = p.parse_intermixed_args(argv)
    directory, rest = _checkpoint_dir(_split(args, p))
    out, meta = export(directory, args.out, rest)
    print(f"exported {meta['path']} (step {meta['step']}) -> {out}: "
          f"{', '.join(sorted(f.name for f in out.iterdir()))}")
    print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer likewise; "
          f"or train from it: python -m curry_train train model.init_from={out}")
    return 0


def plot_main(argv: list[str]) -> int:
    from .run_logging import plot_metrics

    p = argparse.ArgumentParser(prog="python -m curry_train plot",
                                description="train and validation loss curves of a train.metrics_file as a PNG")
    p.add_argument("metrics", help="the JSON-lines file train.metrics_file wrote")
    p.add_argument("--out", help="PNG path (default: METRICS with .png)")
    args = p.parse_args(argv)
    out = args.out or str(Path(args.metrics).with_suffix(".png"))
    n_train, n_val = plot_metrics(args.metrics, out)
    print(f"{out}: {n_train} train and {n_val} validation points")
    return 0
