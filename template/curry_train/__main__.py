"""Command line: ``python -m curry_train COMMAND ...`` (``COMMANDS`` below; ``--help`` on each)."""

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
  python -m curry_train bench                                  # every benchmark -> bench-results/<time>/report.md
  python -m curry_train bench --quick                          # every benchmark, reduced settings (make bench)
  python -m curry_train bench loop ga                          # only these
  python -m curry_train gpu-check                              # every GPU-only path, one report (make gpu-check)
  python -m curry_train train model._target_=my_pkg.build model.n_layer=8   # your nn.Module: factory + its kwargs
  python -m curry_train train model._target_=my_pkg.build train.loss._target_=my_pkg.loss   # ... and your loss
  python -m curry_train bench loop ga model._target_=my_pkg.build           # the benches on your model
  python -m curry_train config train.lr=1e-3                   # print the composed config
  python -m curry_train config --check --world-size 4 parallel.dp=4   # validate before torchrun, no launch
  python -m curry_train preflight model=small                  # sanity checks before a long run (exit 1 on a fail)
  python -m curry_train lr-range --plot lr.png                 # LR range test: the suggested LR and its plot
  python -m curry_train ablate --arm base= --arm wide=model.n_embd=128 --seeds 3 --steps 50   # is the idea real?
  python -m curry_train train checkpoint.dir=ckpt checkpoint.every=50 train.spike.enabled=true   # roll back on a loss spike
  python -m curry_train plan --params 7.5e9 --gpus 64          # which layout fits and is fastest, before renting
  python -m curry_train tokenizer --vocab-size 8192 data.path=corpus/ --out tok   # byte-level BPE, offline
  python -m curry_train prepare data.path='corpus/*.jsonl' data.tokenizer=tok --out data   # shards, any size
  python -m curry_train train data.prepared=data data.tokenizer=tok model.vocab_size=8192 train.eval_every=50 \
      train.tensorboard_dir=tb checkpoint.dir=ckpt checkpoint.every=100
  python -m curry_train sample checkpoint.dir=ckpt --prompt "def main(" --max-new-tokens 200
  python -m curry_train export checkpoint.dir=ckpt --out hf_model    # transformers GPT2LMHeadModel folder
  python -m curry_train plot metrics.jsonl --out loss.png
  python -m curry_train scaffold ../my-llm                     # new repo with this code, its tests, make test/bench
  python -m curry_train scaffold --update ../my-llm            # refresh it from this curry_train (edits are kept)
  python -m curry_train add recompute grad_accum --dest ../their-repo   # copy primitives into an existing repo

Overrides are Hydra syntax (key=value); `python -m curry_train config` lists every key.
Your model: model._target_=pkg.module.factory is built with hydra.utils.instantiate, every other model.KEY=VALUE a
keyword argument (no + needed); model(x) on token ids 0..255 returns logits (a tensor, .logits or a tuple), else
name train.loss._target_=pkg.module.fn, fn(model, (x, y)) -> (loss_sum, n_valid). Both are checked before training.
"""


RUN_HELP = {  # the run's own commands (run_cli.py), each with its own --help
    "tokenizer": "train a byte-level BPE tokenizer on data.path (offline), saved in the Hugging Face format",
    "prepare": "tokenize text / JSON lines / Parquet in worker processes into memmapped token shards + val shard",
    "sample": "print text the newest checkpoint writes from --prompt (temperature, top-k, seed)",
    "export": "a checkpoint as a Hugging Face model folder (GPT2LMHeadModel safetensors + config + tokenizer)",
    "plot": "train and validation loss curves of a metrics file (train.metrics_file) as a PNG",
}


def main(argv: list[str] | None = None) -> int:
    """Bad input (config errors, missing files) prints one ``error:`` line and exits 2, no traceback.

    Config errors are raised by ``config.load_config`` / ``config.validate`` before any process group starts."""
    from hydra.errors import HydraException

    from .loop import LossSpikeError, NonFiniteTrainingError
    from .primitives.checkpoint_trust import CheckpointDiskFullError
    from .stopping import Interrupted, Preempted

    try:
        return _main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, HydraException) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # one line, even from a library
        _say(f"error: {'; '.join(lines) or type(e).__name__}")
        return 2
    except (NonFiniteTrainingError, LossSpikeError) as e:  # the run diverged: not the input's fault, but no traceback either
        _say(f"error: {e}")
        return 1
    except CheckpointDiskFullError as e:
        _say(f"error: {e}; the run stopped (checkpoint.on_disk_full=continue trains on without checkpoints)")
        return 1
    except (Interrupted, Preempted) as e:
        _say(str(e))
        if isinstance(e, Preempted):  # every rank stopped at the same step: leave the group cleanly
            from . import distributed

            if distributed.world_size() > 1:
                distributed.exit_cleanly(e.exit_code)
        return e.exit_code


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only under torchrun (every rank meets the same config error)."""
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(line, file=sys.stderr, flush=True)


def bench_params(cfg, names: list[str], quick: bool = False) -> dict[str, dict]:
    """The keyword arguments each bench will run with (``{"ga": {"k": 4}}``: its defaults, ``--quick``'s, rank
    counts from the machine; ``bench.bench_kwargs``): ``validate_bench`` checks the batch splits against them."""
    from .bench import bench_kwargs

    return {name: bench_kwargs(cfg, name, quick) for name in names}


def _add(args) -> int:
    from .scaffold.add import add, listing, summary

    if args.list:
        print(listing())
        return 0
    print(summary(add(args.names, args.dest, args.tests, args.force), args.names))
    return 0


def _scaffold(args, parser) -> int:
    from .scaffold import scaffold, update

    if args.update:
        if args.name or args.description:
            parser.error("--name and --description are set when the repo is created; --update keeps them")
        repo, report = update(args.dest or ".", args.force)
        print(f"updated {repo}")
    else:
        if args.dest is None:
            parser.error("the folder to create is required (or --update to refresh an existing repo)")
        repo, report, git_note = scaffold(args.dest, args.name, args.description, args.force, git=not args.no_git)
        print(f"created {repo} ({git_note})")
    print("\n".join(report.lines(count_new=not args.update)))
    for rel, diff in report.diffs.items():
        print(f"\n--- what this curry-train would change in {rel} (not applied):\n{diff.rstrip()}")
    if not args.update:
        print(f"next: cd {repo} && make test")
    return 0


WORKFLOW = {  # subcommands with their own argument parsing: name -> (module, function)
    "preflight": ("workflow.preflight", "preflight_main"),
    "lr-range": ("workflow.lr_range", "lr_range_main"),
    "plan": ("plan", "plan_main"),
    "ablate": ("workflow.ablate_cli", "ablate_main"),
    "tokenizer": ("run_cli", "tokenizer_main"),
    "prepare": ("run_cli", "prepare_main"),
    "sample": ("run_cli", "sample_main"),
    "export": ("run_cli", "export_main"),
    "plot": ("run_cli", "plot_main"),
    "gpu-check": ("bench.gpu_check", "gpu_check_main"),
}
COMMANDS = ("{train,bench,gpu-check,config,add,scaffold,preflight,lr-range,plan,ablate,tokenizer,prepare,sample,export,"
            "plot}")


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in WORKFLOW:
        import importlib

        module, fn = WORKFLOW[argv[0]]
        return getattr(importlib.import_module(f".{module}", __package__), fn)(argv[1:])
    from .bench import BENCH_HELP, BENCHES, quick_help

    parser = argparse.ArgumentParser(
        prog="python -m curry_train", description="curry_train: LLM-training primitives you can run, test and measure.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar=COMMANDS)
    for name, text in RUN_HELP.items():
        sub.add_parser(name, help=text)
    sub.add_parser("preflight", help="checks before a long run: initial loss, gradients, NaN, overfit one batch, "
                                     "causality (workflow/preflight.py; preflight --help)")
    sub.add_parser("plan", help="memory, bubble, communication and step time per dp x tp x pp x cp layout, ranked, "
                                "with the torchrun command (plan.py; plan --help)")
    sub.add_parser("ablate", help="arms x seeds of short runs, mean +- std and a yes / no / inconclusive verdict per "
                                  "arm (workflow/ablate_cli.py; ablate --help)")
    sub.add_parser("gpu-check", help="every path only a GPU exercises (nccl ranks, bf16 FSDP2 vs DDP, MFU vs the "
                                     "bf16 peak, PyTorch's CP, CUDA memory), one report (bench/gpu_check.py; "
                                     "gpu-check --help)")
    sub.add_parser("lr-range", help="exponential LR sweep and a suggested LR with its plot (workflow/lr_range.py; "
                                    "lr-range --help)")
    p_train = sub.add_parser("train", help="train the configured model", epilog=EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.steps=100 model=small")
    bench_list = "\n".join(textwrap.fill(BENCH_HELP[name], 100, initial_indent=f"  {name:11s} ",
                                          subsequent_indent=" " * 14) for name in BENCHES)
    p_bench = sub.add_parser("bench", help=f"run benchmarks ({', '.join(BENCHES)})",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=f"benches:\n{bench_list}\n\n{quick_help()}\n\nEach run writes a new folder "
                                    "bench.out_dir/<timestamp>/ (default bench-results/): report.md, report.json, "
                                    "PNGs.\nmake bench runs --quick; make bench-full the full settings.")
    p_bench.add_argument("--quick", action="store_true",
                         help="reduced settings (fewer rounds and steps, small batches, N=2, 3 pipeline kinds): "
                              "every bench in under a minute on 2 CPU cores")
    p_bench.add_argument("args", nargs="*", metavar="NAME|OVERRIDE",
                         help=f"bench names (default: all of {', '.join(BENCHES)}) and Hydra overrides")
    p_config = sub.add_parser("config", help="print the composed config: every key, its value and what it allows; "
                                             "--check validates it as train would, without training")
    p_config.add_argument("--check", action="store_true",
                          help="validate as `train` does (one error line, exit 2) instead of printing; run it before "
                               "torchrun so a config error is not first seen once per rank")
    p_config.add_argument("--world-size", type=int, default=1, help="with --check: the torchrun world size (default 1)")
    p_config.add_argument("overrides", nargs="*")
    from .scaffold.add import DEFAULT_TESTS, listing

    p_add = sub.add_parser(
        "add", help="copy primitives (and their tests) into a repository you already have",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{listing()}\n\nRe-running updates the files you have not edited; edited files are left alone and "
               "their diff is printed.\ncurry_train/MANIFEST.json records the version and a hash of every copied file.")
    p_add.add_argument("names", nargs="*", metavar="NAME", help="primitives to copy, or all")
    p_add.add_argument("--dest", default=".", help="the repository (default: the current folder); the package goes "
                                                    "to DEST/curry_train/")
    p_add.add_argument("--tests", help=f"tests folder inside DEST (default: {DEFAULT_TESTS}, or the one used before)")
    p_add.add_argument("--force", action="store_true",
                       help="replace edited files (each kept as <file>.orig) and write into a curry_train/ without a manifest")
    p_add.add_argument("--list", action="store_true", help="list the primitives and exit")
    p_scaffold = sub.add_parser("scaffold", help="start a new training repo with this code and its tests, or --update one")
    p_scaffold.add_argument("dest", nargs="?", help="folder to create (new or empty); with --update the repo (default: .)")
    p_scaffold.add_argument("--update", action="store_true",
                            help="refresh a scaffolded repo's vendored files; edited ones are kept and their diff printed")
    p_scaffold.add_argument("--name", help="project name (default: the folder name)")
    p_scaffold.add_argument("--description", help="one-line project description for README and pyproject")
    p_scaffold.add_argument("--force", action="store_true",
                            help="write into a non-empty folder / replace edited files; each replaced file is kept as "
                                 "<file>.orig")
    p_scaffold.add_argument("--no-git", action="store_true", help="no git init and first commit")
    args = parser.parse_args(argv)

    if args.command == "add":
        return _add(args)
    if args.command == "scaffold":
        return _scaffold(args, p_scaffold)

    from .config import load_config, to_yaml, validate, validate_bench

    if args.command == "bench":
        names = [a for a in args.args if "=" not in a]
        overrides = [a for a in args.args if "=" in a]
        from .bench import QUICK, check_names, run_benches
        from .bench.report import command_line

        check_names(names)
        cfg = load_config([*QUICK["overrides"], *overrides] if args.quick else overrides)  # the user's win
        selected = names or list(BENCHES)
        validate(cfg, world_size=1)  # the benches run in this process (and launch their own ranks)
        validate_bench(cfg, selected, bench_params(cfg, selected, args.quick))
        run_benches(cfg, selected, quick=args.quick, command=command_line(argv))
        return 0
    cfg = load_config(args.overrides)
    if args.command == "config":
        if args.check:
            validate(cfg, world_size=args.world_size)
            print(f"config ok for world size {args.world_size}")
        else:
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
