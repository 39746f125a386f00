"""Command line: ``python -m curry_train {train,bench,config} [NAME ...] [hydra.overrides=...]``."""

from __future__ import annotations

import argparse
import sys
import textwrap

EPILOG = """examples:
  python -m curry_train train                                  # tiny GPT on the embedded stdlib corpus
  python -m curry_train train model=small train.steps=500 train.gradient_accumulation_steps=4
  python -m curry_train train data.path=/path/to/your.txt
  torchrun --nproc-per-node 2 -m curry_train train             # DDP (gloo on CPU, nccl on GPU)
  python -m curry_train train checkpoint.dir=ckpt checkpoint.every=50   # a rerun resumes from ckpt/latest
  torchrun --nproc-per-node 4 --max-restarts 1 -m curry_train train parallel.dp=2 parallel.pp=2 checkpoint.dir=ckpt checkpoint.every=50
  python -m curry_train bench                                  # every benchmark
  python -m curry_train bench loop ga                          # only these
  python -m curry_train config train.lr=1e-3                   # print the composed config
  python -m curry_train scaffold ../my-llm                     # new repo with this code, its tests, make test/bench

Overrides are Hydra syntax (key=value); `python -m curry_train config` lists every key.
"""


def main(argv: list[str] | None = None) -> int:
    """Bad input (config errors, missing files) prints one ``error:`` line and exits 2, no traceback.

    Config errors are raised by ``config.load_config`` / ``config.validate`` before any process group starts."""
    from hydra.errors import HydraException

    try:
        return _main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, HydraException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # one line, even from a library
        print(f"error: {'; '.join(lines) or type(e).__name__}", file=sys.stderr)
        return 2


def bench_params(names: list[str]) -> dict[str, dict]:
    """Each bench's keyword defaults (``{"ga": {"k": 4}}``), read from its function: ``validate_bench`` needs them."""
    import importlib
    import inspect

    from .bench import BENCHES

    params = {}
    for name in names:
        module, fn = BENCHES[name].split(":")
        signature = inspect.signature(getattr(importlib.import_module(module), fn))
        params[name] = {k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}
    return params


def _main(argv: list[str] | None) -> int:
    from .bench import BENCH_HELP, BENCHES

    parser = argparse.ArgumentParser(
        prog="python -m curry_train", description="curry_train: LLM-training primitives you can run, test and measure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,config,scaffold}")
    p_train = sub.add_parser("train", help="train the configured model", epilog=EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.steps=100 model=small")
    bench_list = "\n".join(textwrap.fill(BENCH_HELP[name], 100, initial_indent=f"  {name:11s} ",
                                          subsequent_indent=" " * 14) for name in BENCHES)
    p_bench = sub.add_parser("bench", help=f"run benchmarks ({', '.join(BENCHES)})",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=f"benches:\n{bench_list}\n\nJSON results (and pipeline PNGs) go to bench.out_dir "
                                    "(default bench-results/); make bench runs them all.")
    p_bench.add_argument("args", nargs="*", metavar="NAME|OVERRIDE",
                         help=f"bench names (default: all of {', '.join(BENCHES)}) and Hydra overrides")
    p_config = sub.add_parser("config", help="print the composed config: every key, its value and what it allows")
    p_config.add_argument("overrides", nargs="*")
    p_scaffold = sub.add_parser("scaffold", help="start a new training repo with this code and its tests")
    p_scaffold.add_argument("dest", help="folder to create (must be new or empty)")
    p_scaffold.add_argument("--name", help="project name (default: the folder name)")
    p_scaffold.add_argument("--description", help="one-line project description for README and pyproject")
    p_scaffold.add_argument("--force", action="store_true", help="write into a non-empty folder")
    args = parser.parse_args(argv)

    if args.command == "scaffold":
        from .scaffold import scaffold

        dest = scaffold(args.dest, args.name, args.description, args.force)
        print(f"created {dest}\nnext: cd {dest} && make test")
        return 0

    from .config import load_config, to_yaml, validate, validate_bench

    if args.command == "bench":
        names = [a for a in args.args if "=" not in a]
        overrides = [a for a in args.args if "=" in a]
        unknown = [n for n in names if n not in BENCHES]
        if unknown:
            parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
        from .bench import run_benches

        cfg, selected = load_config(overrides), names or list(BENCHES)
        validate(cfg, world_size=1)  # the benches run in this process (and launch their own ranks)
        validate_bench(cfg, selected, bench_params(selected))
        run_benches(cfg, selected)
        return 0
    cfg = load_config(args.overrides)
    if args.command == "config":
        print(to_yaml(cfg, docs=True), end="")
        return 0
    from . import distributed
    from .train import train

    train(cfg)
    if distributed.world_size() > 1:
        distributed.exit_cleanly(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
