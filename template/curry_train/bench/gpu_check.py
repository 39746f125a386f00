"""``python -m curry_train gpu-check`` (``make gpu-check``): every path only a GPU exercises, in one call, one report.

The checks (``CHECKS``, in ``gpu_checks``) run one after another, each in a process of its own (its ranks spawned
inside it) under a timeout carved from ``--budget-s``: check i gets ``left x share_i / (shares of i and after)``,
so time a fast check leaves flows to the later ones. A check that raises, exits without a result or runs past its
timeout (its whole process group killed) is one line in the report; the others still run. Each check gives rows of
numbers (or ``skipped`` with its reason for a part this device cannot run). The ranks: one per GPU, nccl.

``DIR/gpu-check.md`` and ``DIR/gpu-check.json`` are written atomically (tmp + ``os.replace``) and the report is
printed; each check's own output is in ``DIR/gpu-check-logs/NAME.log``. Without CUDA the command writes and prints
one line saying it skipped and why, and exits 0. ``--force-cpu`` runs every check's code on CPU instead (CUDA
hidden from the checks; 2 gloo ranks, tiny settings): a test of the checks, whose report says "CPU stand-in, not
GPU numbers". Exit 1 when a check failed or timed out, else 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CHECKS = [  # (name, "module:function", share of the budget, what it runs)
    ("nccl-train", "curry_train.bench.gpu_checks:check_train", 2,
     "train on N ranks with DCP checkpoints; SIGTERM on rank 0 only stops every rank at the same step (the "
     "agreement all-reduce); the resumed run against an uninterrupted one"),
    ("fsdp2-vs-ddp", "curry_train.bench.gpu_checks:check_sharding", 2,
     "bench sharding's ranks: FSDP2 full (fp32, bf16) against DDP (fp32, bf16) at N ranks, step time and per-rank bytes"),
    ("mfu", "curry_train.bench.gpu_checks:check_mfu", 1,
     "bench mfu with a bf16 autocast step: model FLOPs per second over the measured bf16 torch.mm peak"),
    ("cp", "curry_train.bench.gpu_checks:check_cp", 1,
     "PyTorch's context-parallel path (DTensor ring SDPA) and curry_train's ring attention at N ranks against one "
     "process: loss and gradients"),
    ("recompute-memory", "curry_train.bench.gpu_checks:check_recompute", 1,
     "bench recompute: activation and peak memory (CUDA max_memory_allocated) of none, full, selective, every 2nd"),
    ("compose-memory", "curry_train.bench.gpu_checks:check_compose", 2,
     "one composed layout (FSDP2 full, no_shard on one GPU, + bf16 + selective recompute + ga 2) through train: "
     "per-rank model-state bytes against /plan, CUDA peak per rank"),
]
STANDIN_RANKS = 2  # --force-cpu: gloo ranks standing in for the GPUs
RESERVE_S = 5.0  # of the budget, kept for the report
NO_CUDA = "torch.cuda.is_available() is False"


class CheckSkipped(Exception):
    """Raised by a check that cannot run here at all; the message is the one-line reason."""


def environment(force_cpu: bool) -> dict:
    """The machine and software the report names."""
    import platform

    import torch

    cuda = torch.cuda.is_available() and not force_cpu
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
    if cuda:
        version = torch.cuda.nccl.version()  # a tuple on torch 2.x
        env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first and last line of its message (a rank's traceback ends with
    the root exception)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}" if lines else ""
    return f"{type(e).__name__}: {text}".rstrip(": ")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _child(argv: list[str]) -> None:
    """In the check's own process: ``TARGET CTX_JSON RESULT_PATH``; the result JSON is written however it ends."""
    target, ctx, result = argv[0], json.loads(argv[1]), Path(argv[2])
    try:
        module, fn = target.split(":")
        out = {"status": "ok", **getattr(importlib.import_module(module), fn)(ctx)}
    except Exception as e:  # noqa: BLE001 - any failure is the check's one line
        skipped = importlib.import_module("curry_train.bench.gpu_check").CheckSkipped  # not __main__'s copy
        out = {"status": "skipped", "reason": str(e)} if isinstance(e, skipped) else \
            {"status": "failed", "reason": one_line(e)}
    _write(result, json.dumps(out, default=str))
    sys.stdout.flush()
    os._exit(0)  # spawned gloo/nccl ranks are gone; skip interpreter finalisation (its gloo threads can abort it)


def run_one(name: str, target: str, ctx: dict, timeout: float, log_dir: Path, env: dict) -> dict:
    """Run ``target`` in a new process group under ``timeout`` seconds; its result, or one line of why none."""
    log_dir.mkdir(parents=True, exist_ok=True)
    result = log_dir / f"{name}.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", __name__, target, json.dumps({**ctx, "timeout_s": timeout}),
                                 str(result)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its spawned ranks too
            except ProcessLookupError:
                pass
            proc.wait()
    seconds = time.perf_counter() - t0
    if code is None:
        out = {"status": "timed out", "reason": f"timed out after {timeout:.0f} s (its processes killed)"}
    elif result.exists():
        out = json.loads(result.read_text())
    else:
        out = {"status": "failed", "reason": f"exited with code {code} without a result (log: {log_dir / name}.log)"}
    return {"name": name, "seconds": seconds, "timeout_s": timeout, **out}


def run_checks(checks, ctx: dict, budget_s: float, log_dir: Path, env: dict | None = None) -> list[dict]:
    """Each of ``checks`` (``CHECKS``' shape) in turn, with its share of what is left of ``budget_s``."""
    import curry_train

    env = dict(os.environ if env is None else env)
    root = str(Path(curry_train.__file__).resolve().parent.parent)  # the children import this curry_train
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    start, results = time.perf_counter(), []
    for i, (name, target, share, _) in enumerate(checks):
        left = budget_s - RESERVE_S - (time.perf_counter() - start)
        timeout = left * share / sum(c[2] for c in checks[i:])
        if timeout < 1:
            results.append({"name": name, "seconds": 0.0, "timeout_s": max(timeout, 0.0), "status": "timed out",
                            "reason": f"not run: {max(left, 0):.0f} s of the {budget_s:.0f} s budget left"})
            continue
        results.append(run_one(name, target, ctx, timeout, log_dir, env))
    return results


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4g}"
    return "-" if v is None else str(v)


def render(results: list[dict], ctx: dict, env: dict, budget_s: float, seconds: float, checks=CHECKS) -> str:
    """The report: the machine, then per check its status, time, rows (a table), notes and skipped parts."""
    about = {name: what for name, _, _, what in checks}
    if ctx["standin"]:
        where = (f"CPU stand-in (--force-cpu), not GPU numbers: {ctx['ranks']} gloo ranks on CPU, tiny settings; "
                 f"torch {env['torch']} (CUDA build {env['cuda']})")
    else:
        where = (f"GPU: {ctx['ranks']} x {', '.join(sorted(set(env['gpus'])))}; torch {env['torch']}, CUDA "
                 f"{env['cuda']}, NCCL {env.get('nccl')}, cuDNN {env.get('cudnn')}; ranks: {ctx['ranks']} nccl")
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "skipped", "failed", "timed out")}
    lines = ["# gpu-check", "", where, "",
             f"{len(results)} checks in {seconds:.1f} s of a {budget_s:.0f} s budget: "
             + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    for r in results:
        lines += ["", f"## {r['name']}: {r['status']} ({r['seconds']:.1f} s of {r['timeout_s']:.0f} s)", "",
                  about.get(r["name"], r["name"])]
        if r.get("reason"):
            lines += ["", f"{r['status']}: {r['reason']}"]
        rows = r.get("rows") or []
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
        extra = [f"- {note}" for note in r.get("notes") or []]
        extra += [f"- skipped {part}: {why}" for part, why in (r.get("skipped") or {}).items()]
        if extra:
            lines += ["", *extra]
    return "\n".join(lines) + "\n"


def gpu_check_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m curry_train gpu-check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="every path only a GPU exercises, each check in its own process under a share of the budget: "
                    "one report",
        epilog="checks:\n" + "\n".join(textwrap.fill(what, 110, initial_indent=f"  {n:17s}", subsequent_indent=" " * 19)
                                      for n, _, _, what in CHECKS)
               + "\n\nWithout CUDA it writes one line saying it skipped (exit 0). Exit 1 when a check failed or timed "
                 "out.")
    p.add_argument("--out", default="bench-results", help="folder for gpu-check.md, gpu-check.json and "
                                                          "gpu-check-logs/ (default: bench-results)")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for every check together (default 480)")
    p.add_argument("--force-cpu", action="store_true",
                   help=f"run every check on CPU ({STANDIN_RANKS} gloo ranks, tiny settings, CUDA hidden): tests the "
                        "checks; the report says CPU stand-in, not GPU numbers")
    args = p.parse_args(argv)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0 seconds, got {args.budget_s:g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.force_cpu)
    if not args.force_cpu and not env["gpus"]:
        line = (f"gpu-check: skipped, {NO_CUDA} (torch {env['torch']}, CUDA build {env['cuda']}): no check ran; "
                "--force-cpu runs them on CPU as a test")
        _write(out / "gpu-check.md", line + "\n")
        _write(out / "gpu-check.json", json.dumps({"skipped": NO_CUDA, "environment": env}, indent=1))
        print(line)
        return 0
    n = STANDIN_RANKS if args.force_cpu else len(env["gpus"])
    ctx = {"device": "cpu" if args.force_cpu else "cuda", "ranks": n, "backend": "gloo" if args.force_cpu else "nccl",
           "standin": args.force_cpu}
    child_env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.force_cpu else {}))
    t0 = time.perf_counter()
    print(f"gpu-check: {len(CHECKS)} checks, {args.budget_s:.0f} s budget, logs in {out / 'gpu-check-logs'}",
          flush=True)
    results = run_checks(CHECKS, ctx, args.budget_s, out / "gpu-check-logs", child_env)
    seconds = time.perf_counter() - t0
    text = render(results, ctx, env, args.budget_s, seconds)
    _write(out / "gpu-check.json", json.dumps({"environment": env, "context": ctx, "budget_s": args.budget_s,
                                               "seconds": seconds, "checks": results}, indent=1, default=str))
    _write(out / "gpu-check.md", text)
    print(text, end="")
    return 1 if any(r["status"] in ("failed", "timed out") for r in results) else 0


if __name__ == "__main__":
    _child(sys.argv[1:])
